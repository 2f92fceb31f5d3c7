"""The package tree is the architecture: layers, one way down, and no import cycles.

``ckptdiff/`` is layered, lowest first: the foundation (the modules at its top level), ``runtime``, ``metrics``,
``io``, ``engine``, ``analyses``, ``gate``, ``render``, ``cli``. A module may import its own layer and the layers
below it, never one above, and no chain of imports inside ``ckptdiff`` may come back to where it started. Every
import counts: at module level, deferred inside a function, or only for type checking.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ckptdiff"
LAYERS = ("", "runtime", "metrics", "io", "engine", "analyses", "gate", "render", "cli")  # "": the foundation
MAX_TOP_LEVEL = 8


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("ckptdiff", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _owner(name: str) -> str:
    """The module an imported dotted name lives in: the longest prefix that is a module of the package."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path) -> set[str]:
    """The ckptdiff modules ``module`` imports, wherever the import stands."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(_owner(a.name) for a in node.names if a.name.split(".")[0] == "ckptdiff")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join([*here[: len(here) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base.split(".")[0] != "ckptdiff":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else _owner(base))
    found.discard(module)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def layer_of(module: str) -> int:
    """The layer index of a module: its first package below ``ckptdiff``, or the foundation."""
    parts = module.split(".")
    if module == "ckptdiff.__main__":  # the entry point: `python -m ckptdiff` runs the CLI
        return LAYERS.index("cli")
    if len(parts) == 1 or (len(parts) == 2 and MODULES[module].name != "__init__.py"):
        return 0
    return LAYERS.index(parts[1])


def test_every_subpackage_is_a_layer() -> None:
    packages = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(LAYERS[1:])


def test_no_import_points_up_a_layer() -> None:
    upward = sorted(
        f"{m} ({LAYERS[layer_of(m)] or 'foundation'}) imports {t} ({LAYERS[layer_of(t)] or 'foundation'})"
        for m, targets in GRAPH.items()
        for t in targets
        if t != "ckptdiff" and layer_of(t) > layer_of(m)
    )
    assert not upward, "\n".join(upward)


def _cycle_from(start: str) -> list[str] | None:
    """A shortest import chain from ``start`` back to itself, if there is one (breadth-first)."""
    paths = {t: [start, t] for t in GRAPH[start]}
    frontier = list(paths)
    while frontier:
        nxt = []
        for m in frontier:
            for t in sorted(GRAPH[m]):
                if t == start:
                    return [*paths[m], t]
                if t not in paths:
                    paths[t] = [*paths[m], t]
                    nxt.append(t)
        frontier = nxt
    return None


def test_no_import_cycles() -> None:
    cycles = {" -> ".join(c) for m in GRAPH if m != "ckptdiff" and (c := _cycle_from(m))}
    assert not cycles, "\n".join(sorted(cycles))


def test_the_top_level_stays_small() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


def test_the_root_package_imports_nothing_eagerly() -> None:
    """``import ckptdiff`` loads no layer: the API is lazy, so ``ckptdiff --help`` stays fast."""
    assert GRAPH["ckptdiff"] == set()


@pytest.mark.parametrize(
    ("source", "expect"),
    [
        ("from ckptdiff.render.text import Report\n", {"ckptdiff.render.text"}),
        ("def f():\n    from ckptdiff.engine import pipeline\n", {"ckptdiff.engine.pipeline"}),
        ("import ckptdiff.io.source as s\n", {"ckptdiff.io.source"}),
        ("from ..render import text\n", {"ckptdiff.render.text"}),
    ],
)
def test_the_scanner_sees_every_form_of_import(tmp_path: Path, source: str, expect: set[str]) -> None:
    """The test above is only as good as its reading of imports: deferred, aliased and relative ones count."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert _imports("ckptdiff.analyses.probe", path) == expect


def test_the_tests_mirror_the_package() -> None:
    """Each test folder is named for the layer it tests (whole-project tests stay at the top of tests/)."""
    tests = Path(__file__).resolve().parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders <= set(LAYERS[1:]), sorted(folders - set(LAYERS[1:]))
