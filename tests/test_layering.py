"""The package's shape: one installed name, and an import graph without cycles.

The layers themselves (which layer may import which) are an import-linter contract in
pyproject.toml, checked by `make lint`; this module checks what a layers contract cannot see:
cycles between modules of one layer, imports inside functions included (grimp reads every import
statement, wherever it sits).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import grimp
import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(root: str) -> None:
        # Iterative DFS: the graph is deep enough to make recursion fragile.
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in graph.modules:
                    continue  # an external package
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("edgespec", exclude_type_checking_imports=True)
    assert len(graph.modules) > 40  # the whole package was found, not an empty shell
    cycles = _cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle() -> None:
    """Negative control: the finder reports a cycle that is there."""
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.a", "pkg.b", "pkg.c"):
        graph.add_module(name)
    graph.add_import(importer="pkg.a", imported="pkg.b")
    graph.add_import(importer="pkg.b", imported="pkg.c")
    graph.add_import(importer="pkg.c", imported="pkg.a")
    assert _cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_every_package_folder_is_installed() -> None:
    """Each folder with an __init__.py under a mapped folder is listed in pyproject's packages."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert all(name == "edgespec" or name.startswith("edgespec.") for name in listed)
    for name, folder in config["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            sub = ".".join((name, *rel.parts))
            assert sub in listed, f"{init.parent} has an __init__.py but {sub} is not installed"


@pytest.mark.slow
def test_wheel_installs_one_name(tmp_path: Path) -> None:
    """The built wheel holds one top-level import name, `edgespec` (plus its dist-info)."""
    # Built from a copy: setuptools writes build/ beside the sources.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(
        ".*", "build", "*.egg-info", "__pycache__", "tests", "experiments"
    )
    shutil.copytree(REPO, source, ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("edgespec-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"edgespec"}
    for expected in (
        "edgespec/core/demo_models/target/model.safetensors",
        "edgespec/protos/edgespec/v1/edgespec.proto",
        "edgespec/edge/__init__.py",
        "edgespec/py.typed",
    ):
        assert expected in names
