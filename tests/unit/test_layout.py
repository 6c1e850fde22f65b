"""The house's shape, as docs/architecture.md states it: packages by stage whose imports only
point down the mail path, with no cycle, and no module, class or function over its size."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parents[2] / "relay"
# Lowest first: a package imports only itself and the packages before it. Siblings on one
# level (delivery and intake) never import each other.
LEVELS = (
    ("mail",),
    ("config",),
    ("observe",),
    ("spool",),
    ("suppression",),
    ("delivery", "intake", "history", "hooks", "bounces"),
    ("schedule",),
    ("ops",),
    ("api",),
    ("daemon",),
    ("cli",),
)
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 400, 250, 40
REASON = "# long:"  # a comment line just above a longer function says why it is long


def modules() -> list[Path]:
    return sorted(RELAY.rglob("*.py"))


def name_of(path: Path) -> str:
    parts = path.relative_to(RELAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports(path: Path) -> set[str]:
    """The relay modules path imports, TYPE_CHECKING blocks and function bodies included."""
    known = {name_of(p) for p in modules()}
    out: set[str] = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in out if name in known and name != "relay"}


def level(module: str) -> int | None:
    package = module.split(".")[1] if module.count(".") else None
    return next((i for i, names in enumerate(LEVELS) if package in names), None)


def test_every_package_is_on_a_level() -> None:
    packages = {p.name for p in RELAY.iterdir() if (p / "__init__.py").exists()}
    placed = {name for names in LEVELS for name in names}
    assert packages == placed, "add the package to LEVELS and to docs/architecture.md"


@pytest.mark.parametrize("path", modules(), ids=name_of)
def test_imports_point_down_the_mail_path(path: Path) -> None:
    here = name_of(path)
    own = level(here)
    if own is None:
        return  # relay/__init__ and __main__ stand above every stage
    wrong = [
        name
        for name in sorted(imports(path))
        if (there := level(name)) is not None
        and (there > own or (there == own and name.split(".")[1] != here.split(".")[1]))
    ]
    assert not wrong, f"{here} imports {wrong}: a stage imports only the ones below it"


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name_of(p): imports(p) for p in modules()}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, "import cycle: " + " -> ".join((*path, node))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, (*path, node))
        done.add(node)

    for node in sorted(graph):
        visit(node, ())


@pytest.mark.parametrize("path", modules(), ids=name_of)
def test_sizes(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE, f"{name_of(path)}: {len(lines)} lines"
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            assert size <= MAX_CLASS, f"class {node.name}: {size} lines"
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            reason = lines[first - 2].strip().startswith(REASON) if first > 1 else False
            assert size <= MAX_FUNCTION or reason, f"{node.name}(): {size} lines, no {REASON}"


@pytest.mark.parametrize("path", modules(), ids=name_of)
def test_every_module_says_what_it_is(path: Path) -> None:
    docstring = ast.get_docstring(tree(path))
    assert docstring, f"{name_of(path)} has no docstring"
