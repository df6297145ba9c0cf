"""The project's import graph has no cycles, counting imports inside functions (which hide a cycle
from Python but not from a reader), and the layers import downwards only: infrastructure
(`common`) from nothing of ours, the model (`minbert`) from `common`, tasks from both, trainers from
all three; `scripts/` are entry points that nothing imports.

Edges are explicit imports (`import a.b`, `from a.b import c`: to `a.b`, and to `a.b.c` where
that is a module), as import-linter and pydeps count them; the parent packages Python also runs are
not edges. Run this file (`python tests/test_imports.py`) to print the graph's cycles."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "minbert", "tasks", "trainers", "reports")
LAYERS = {"common": 0, "minbert": 1, "tasks": 2, "trainers": 3, "reports": 4}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES if (ROOT / pkg).is_dir()
            for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w), comp.append(w)
            on.discard(v), comp.append(v)
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    top = lambda m: LAYERS[m.split(".")[0]]  # noqa: E731
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if top(b) > top(a))


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_layers_import_downwards_only():
    assert upward_imports(import_graph()) == []


def test_the_check_finds_a_hidden_cycle(tmp_path):
    """The oracle can fail: a function-level import that closes a loop is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_nothing_imports_a_script():
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text())
        named = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        named |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom)}
        assert not named & (scripts | {"scripts"}), f"{name} imports a script"


def test_scripts_are_entry_points():
    """No script edits sys.path or imports another script: shared code lives in the packages."""
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    for path in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text())
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"
        named = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names}
        named |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom)}
        assert not named & scripts, f"{path.name} imports a script"


if __name__ == "__main__":
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} import edges")
    for comp in cycles(graph):
        print("cycle:", " <-> ".join(comp))
    for edge in upward_imports(graph):
        print("upward:", edge)
