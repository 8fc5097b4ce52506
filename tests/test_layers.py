"""The package's layers hold: no import circle, nothing imports upward, no module over 600 lines.

Every import counts, also the ones inside functions (the lazy imports that keep `sparsify`
fast are still dependencies). A module's layer is its folder (math/, files/, trust/, ...); the
modules at the top of the package (config, limits, errors, output, entry) are their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedsrd_cli

PACKAGE = Path(fedsrd_cli.__file__).resolve().parent
TOP_MODULES = {"__init__", "config", "limits", "errors", "output", "entry"}
# What each folder may import besides itself and the small modules at the top.
MAY_IMPORT = {
    "math": set(),
    "files": {"math", "privacy"},
    "privacy": {"math"},
    "trust": {"math", "files"},
    "algorithms": {"math", "files", "privacy", "trust"},
    "site": {"math", "files", "privacy", "trust", "algorithms"},
    "suites": {"math", "files", "privacy", "trust", "algorithms", "site"},
    "simulation": {"math", "files", "privacy", "trust", "algorithms", "site", "suites"},
    "cli": {"math", "files", "privacy", "trust", "algorithms", "site", "suites", "simulation"},
    "flower": {"math", "files", "privacy", "trust", "algorithms", "site", "suites", "simulation"},
}
# The small modules at the top import only each other, except these edges.
TOP_MAY_IMPORT = {"config": {"privacy"}, "entry": {"cli"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative.with_suffix(".py")).is_file() or (PACKAGE.parent / relative).is_dir()


def import_graph() -> dict[str, set[str]]:
    """fedsrd_cli module -> the fedsrd_cli modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("fedsrd_cli")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                if not base.startswith("fedsrd_cli"):
                    continue
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
        graph[name] = edges - {name}
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def test_no_import_circle() -> None:
    """Every strongly connected component of the import graph is a single module (Tarjan)."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    assert not circles, "import circles among: " + "; ".join(", ".join(c) for c in circles)


def test_nothing_imports_upward() -> None:
    wrong = []
    for module, edges in import_graph().items():
        layer = _layer(module)
        for target in edges:
            other = _layer(target)
            if other == layer or other in TOP_MODULES:
                continue
            allowed = TOP_MAY_IMPORT.get(layer, set()) if layer in TOP_MODULES else MAY_IMPORT[layer]
            if other not in allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_only_the_small_modules_sit_at_the_top() -> None:
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == TOP_MODULES
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(MAY_IMPORT)


def test_every_folder_says_what_it_holds() -> None:
    for folder in MAY_IMPORT:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), (
            f"{folder}/__init__.py: say what lives there and what it may import"
        )


def test_no_module_over_600_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, long
