"""The layers of docs/architecture.md, read from the code's imports (lazy ones inside functions included): imports
go down, no recipe imports another, only the command line imports ``fastdistill.run``, and no import circle crosses
a folder."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = {"fastdistill": ROOT / "fastdistill", "fastdistill.kernels": ROOT / "kernels"}

# rank of each top-level part: a module may import its own rank or a larger one, never a smaller
RANKS = {"run": 0, "__main__": 0, "api": 1, "recipes": 2, "make_augmented": 2, "eval": 3, "artifacts": 3,
         "teachers": 3, "config": 4, "data": 5, "models": 5, "losses": 5, "kernels": 5, "engine": 6, "profiling": 6,
         "console": 6, "configs": 6, "__init__": 1}


def _modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in PACKAGE.items():
        for path in folder.rglob("*.py"):
            if prefix == "fastdistill" and path.relative_to(folder).parts[0] == "kernels":
                continue  # the symlinked copy of kernels/ in a development checkout
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((prefix, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """fastdistill modules ``name`` imports (``from a import b`` counts as ``a.b`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            # the package root only carries __version__ and the lazy API names
            if target.startswith("fastdistill.") and target != name:
                out.add(target)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_go_down_the_layers():
    up = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
          if a != "fastdistill" and RANKS[_part(b)] < RANKS[_part(a)]]
    assert not up, "imports that go up a layer:\n" + "\n".join(sorted(up))


def test_only_the_command_line_imports_run():
    users = [a for a, targets in GRAPH.items() if "fastdistill.run" in targets and _part(a) not in ("run", "__main__")]
    assert not users, f"import fastdistill.run: {users}"


def test_no_recipe_imports_another():
    crossings = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                 if a.startswith("fastdistill.recipes.") and b.startswith("fastdistill.recipes.")]
    assert not crossings, "recipes importing recipes (use the registry, recipes.get_recipe):\n" + "\n".join(crossings)


def test_no_import_circle_crosses_a_folder():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len({_part(m) for m in component}) > 1:
                circles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not circles, f"import circles across folders: {circles}"


@pytest.mark.parametrize("name", ["fastdistill.teachers", "fastdistill.eval.linear_probe",
                                  "fastdistill.data.generated", "fastdistill.recipes.kd_multi"])
def test_the_graph_sees_the_modules_that_used_to_cross(name):
    # the checks above read real edges: these modules import fastdistill code
    assert GRAPH[name], f"no imports read from {name}"
