"""Regenerate the Python stubs from the .proto sources: ``python -m edgespec.protos.generate``.

Run from a checkout (it writes into the checkout's ``protos/`` folder). The generated
``*_pb2*.py`` files are committed (users need no protoc) and never edited by hand; ``--check``
regenerates into a temporary folder and fails when the committed stubs differ, which is what the
test suite runs.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

# The checkout's protos/ folder (resolved: in an editable install this file is a link to it).
PROTOS_DIR = Path(__file__).resolve().parent
# Each .proto is compiled under its package-relative name (edgespec/v1/edgespec.proto): the name
# reflection and other languages see. protoc then names the generated Python modules after that
# path (`edgespec.v1.edgespec_pb2`), while they are imported from this package: the module paths
# in the generated code are rewritten to start with this prefix.
MODULE_PREFIX = "edgespec.protos"


def _protos() -> list[Path]:
    return sorted(p.relative_to(PROTOS_DIR) for p in PROTOS_DIR.rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpc_tools) over every .proto; writes the stubs under ``out_root`` at the same
    relative paths as in ``protos/`` and returns them."""
    import grpc_tools  # test extra: only needed to regenerate
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        include, out = Path(tmp) / "in", Path(tmp) / "out"
        for rel in _protos():
            staged = include / rel
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(PROTOS_DIR / rel, staged)
        out.mkdir()
        for rel in _protos():
            args = ["protoc", f"-I{well_known}", f"-I{include}", f"--python_out={out}"]
            args += [f"--pyi_out={out}", f"--grpc_python_out={out}", str(rel)]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {rel}")
            module = ".".join(rel.parent.parts)  # e.g. edgespec.v1
            for name in (f"{rel.stem}_pb2.py", f"{rel.stem}_pb2.pyi", f"{rel.stem}_pb2_grpc.py"):
                dest = out_root / rel.parent / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                code = (out / rel.parent / name).read_text()
                dest.write_text(_prefix_modules(code, module, rel.stem))
                written.append(dest)
    return written


def _prefix_modules(code: str, module: str, stem: str) -> str:
    """Generated code with the stubs of package `module` imported from, and named as,
    ``MODULE_PREFIX.module``: the ``from X import`` lines and the quoted module name of
    ``<stem>_pb2`` (not the quoted service names, which stay proto names)."""
    code = code.replace(f"from {module} import", f"from {MODULE_PREFIX}.{module} import")
    return code.replace(f"'{module}.{stem}_pb2'", f"'{MODULE_PREFIX}.{module}.{stem}_pb2'")


def check() -> list[str]:
    """Names of committed stubs that differ from a fresh generation (empty: up to date)."""
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            committed = PROTOS_DIR / fresh.relative_to(tmp)
            if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                stale.append(f"protos/{committed.relative_to(PROTOS_DIR)}")
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the gRPC/protobuf Python stubs.")
    ap.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        stale = check()
        for name in stale:
            logger.error("stale: %s (run python -m edgespec.protos.generate)", name)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            dest = PROTOS_DIR / fresh.relative_to(tmp)
            shutil.copyfile(fresh, dest)
            logger.info("wrote protos/%s", dest.relative_to(PROTOS_DIR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
