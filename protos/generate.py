"""Regenerate the Python stubs from the .proto sources: ``python -m protos.generate``.

The generated ``*_pb2*.py`` files are committed (users need no protoc) and never edited by hand;
``--check`` regenerates into a temporary folder and fails when the committed stubs differ, which
is what the test suite runs.
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

ROOT = Path(__file__).resolve().parent.parent  # the repository root: imports are protos.edgespec.v1
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def _generated_names(proto: Path) -> list[str]:
    stem = proto.stem
    return [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpc_tools) over every .proto, writing stubs under ``out_root``."""
    from grpc_tools import protoc  # test extra: only needed to regenerate

    written: list[Path] = []
    for proto in PROTOS:
        rel = proto.relative_to(ROOT)
        args = [
            "protoc",
            f"-I{ROOT}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            str(rel),
        ]
        # grpc_tools resolves the well-known types from its own include folder.
        import grpc_tools

        args.insert(1, f"-I{Path(grpc_tools.__file__).parent / '_proto'}")
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {rel}")
        written += [out_root / rel.parent / name for name in _generated_names(proto)]
    return written


def check() -> list[str]:
    """Names of committed stubs that differ from a fresh generation (empty: up to date)."""
    stale: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            committed = ROOT / fresh.relative_to(tmp)
            if not committed.exists() or not filecmp.cmp(fresh, committed, shallow=False):
                stale.append(str(committed.relative_to(ROOT)))
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate the gRPC/protobuf Python stubs.")
    ap.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        stale = check()
        for name in stale:
            logger.error("stale: %s (run python -m protos.generate)", name)
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            dest = ROOT / fresh.relative_to(tmp)
            shutil.copyfile(fresh, dest)
            logger.info("wrote %s", dest.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
