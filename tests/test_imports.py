"""No import circles in prelora_ray/, and the light modules stay light.

The import graph is built statically (ast) over every module of the package: module-level and
function-level imports alike (a function-level import that closes a circle is still a circle, only a
later one), `if TYPE_CHECKING:` blocks excepted (they never run). An import of a submodule is an edge to
that submodule only, not to the packages above it: a package importing its own modules is how packages
are built. Dynamic imports (importlib, entry points) are not seen. The test fails naming every strongly
connected component of more than one module, in two cases: the orchestration subpackage's own circles,
and every other one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prelora_ray"
ORCHESTRATION = "prelora_ray.orchestration"


def _module_name(path: Path, root: Path) -> str:
    """`prelora_ray/strategies/base.py` -> `prelora_ray.strategies.base`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`) blocks."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                found.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring for what counts)."""
    root = package_dir.parent
    files = {_module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                base = base if node.level else node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target not in files and "." in target:  # `import a.b.c` of a name inside a.b: the module a.b
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return sorted(found)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    """A circle as its modules and the imports between them."""
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
    return f"{' <-> '.join(component)} (imports: {'; '.join(edges)})"


@pytest.mark.parametrize(
    "scope",
    [
        pytest.param("package", id="package-outside-orchestration"),
        pytest.param("orchestration", id="orchestration"),
    ],
)
def test_no_import_circle(scope):
    graph = import_graph(PACKAGE)
    inside = [c for c in circles(graph) if all(m.startswith(ORCHESTRATION) for m in c)]
    found = inside if scope == "orchestration" else [c for c in circles(graph) if c not in inside]
    assert not found, "import circles in prelora_ray/:\n" + "\n".join(_describe(c, graph) for c in found)


def test_the_graph_sees_function_level_and_relative_imports_but_not_type_checking_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.sub import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\nimport pkg.d\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a", "pkg.d"} and graph["pkg.d"] == set()
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]


def _loaded_after(statement: str) -> set[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {name.split(".")[0] for name in json.loads(out.stdout.strip().splitlines()[-1])}


def test_the_config_and_the_strategy_registry_load_no_torch():
    # config.py reads every strategy's section through the registry before anything heavy is loaded
    statement = (
        "from prelora_ray.config import TrainSettings; from prelora_ray.strategies import REGISTRY; "
        "import prelora_ray.fork, prelora_ray.search_space; "
        "TrainSettings.load(None, ['strategy=lte']).flat(); [c.summary_line({}) for c in REGISTRY.values()]"
    )
    loaded = _loaded_after(statement)
    heavy = {"torch", "peft", "transformers", "ray", "mlflow", "numpy", "pandas"}
    assert not heavy & loaded, f"imported {sorted(heavy & loaded)}"
