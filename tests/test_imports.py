"""The module graph of `mechcopy`: no import cycle, counting imports inside functions too (only those
under `if TYPE_CHECKING:` are left out), so the layers stay layers."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The `mechcopy` modules `path` imports anywhere in its code, except under `if TYPE_CHECKING:`.
    `from mechcopy.x import y` counts as importing `mechcopy.x.y` where that is a module, else `mechcopy.x`."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules and m != name}


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = {_module_name(p, root): p for p in (root / "mechcopy").rglob("*.py")}
    return {name: imports_of(path, set(files), root) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    graph = module_graph()
    assert len(graph) > 30 and "mechcopy.evaluation" in graph["mechcopy.suite"]   # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, cycle", [
    ("import mechcopy.b\n", ["mechcopy.a", "mechcopy.b", "mechcopy.a"]),
    ("def f():\n    from mechcopy import b\n", ["mechcopy.a", "mechcopy.b", "mechcopy.a"]),   # inside a function
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mechcopy.b import X\n", None),
])
def test_the_cycle_finder(tmp_path, source, cycle):
    """A cycle through an import inside a function is found; one under `if TYPE_CHECKING:` is not one."""
    pkg = tmp_path / "mechcopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(source)
    (pkg / "b.py").write_text("from mechcopy.a import thing\n")
    modules = {"mechcopy", "mechcopy.a", "mechcopy.b"}
    files = {"mechcopy": pkg / "__init__.py", "mechcopy.a": pkg / "a.py", "mechcopy.b": pkg / "b.py"}
    graph = {m: imports_of(path, modules, tmp_path) for m, path in files.items()}
    assert find_cycle(graph) == cycle


@pytest.mark.parametrize("path", ["analyses/replication.py", "mechcopy/organisms/method.py", "mechcopy/find.py"])
def test_the_method_is_written_once(path):
    """The study, the organisms and `find` run the method's steps (`mechcopy.method`); none of them
    attributes, scores or sweeps k itself."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"copy_scores", "sweep_k", "integrated_gradients", "grad_x_act", "self_consistency"} - (
        {"self_consistency"} if path == "analyses/replication.py" else set())      # the study's own audit stages
    steps = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Name) and n.value.id == "method"}
    assert {"attribute", "score"} <= steps and steps <= {"prompts", "attribute", "score", "choose_k", "decide",
                                                         "held_out_text", "evaluated", "Probe"}
