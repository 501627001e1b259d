"""The house rules of the code: no import circles inside the package, and the library's sizes (modules at most 500
lines, classes at most 250, function bodies at most 60) in ``litgpt_plop/``, ``callbacks/`` and ``benchmarks/``."""

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "litgpt_plop"
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_BODY_LINES = 500, 250, 60


def package_modules(root: Path = REPO_ROOT / PACKAGE) -> dict[str, Path]:
    """``litgpt_plop.x.y`` -> its file (a package by its ``__init__.py``)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Which package modules each module imports, at any depth of its code (``from a import b`` counts ``a.b``
    when that is a module)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first search meets (empty: the imports form a DAG)."""
    state: dict[str, str] = {}
    path: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_inside_the_package():
    modules = package_modules()
    assert "litgpt_plop.race.runner" in modules and "litgpt_plop.commands.training" in modules
    assert cycles(import_graph(modules)) == []


def oversized(path: Path) -> list[str]:
    text = path.read_text()
    found = [f"{path}: {len(text.splitlines())} lines"] if len(text.splitlines()) > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
            found.append(f"{path}:{node.name}: class of {node.end_lineno - node.lineno + 1} lines")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # the docstring
                body = body[1:]
            if body and node.end_lineno - body[0].lineno + 1 > MAX_BODY_LINES:
                found.append(f"{path}:{node.name}: body of {node.end_lineno - body[0].lineno + 1} lines")
    return found


def test_modules_classes_and_functions_within_the_librarys_sizes():
    paths = [p for folder in ("litgpt_plop", "callbacks", "benchmarks") for p in sorted((REPO_ROOT / folder).rglob("*.py"))]
    assert len(paths) > 60
    assert [line for path in paths for line in oversized(path)] == []


def test_the_size_check_names_a_long_function(tmp_path):
    source = tmp_path / "long.py"
    source.write_text('def f():\n    """Doc."""\n' + "    x = 1\n" * 61 + "\n\ndef g():\n" + "    y = 2\n" * 60)
    assert oversized(source) == [f"{source}:f: body of 61 lines"]
