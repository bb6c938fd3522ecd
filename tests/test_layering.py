"""One direction of dependencies: analysis/ depends on the package, never the other way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prelora_ray"


def _imports_analysis(node: ast.AST) -> bool:
    """Whether an import statement imports analysis or one of its modules."""
    if isinstance(node, ast.Import):
        return any(a.name == "analysis" or a.name.startswith("analysis.") for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return (
            node.level == 0
            and node.module is not None
            and (node.module == "analysis" or node.module.startswith("analysis."))
        )
    return False


def _optional_imports(tree: ast.AST) -> set[int]:
    """ids of import nodes inside a `try:` whose handlers catch ImportError (optional extras)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            found.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return found


def test_importing_the_sweep_imports_no_analysis_module() -> None:
    code = (
        "import sys, prelora_ray.orchestration.tune; "
        "print(sorted(m for m in sys.modules if m == 'analysis' or m.startswith('analysis.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_package_module_imports_analysis() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        # the CLI's optional `pareto` verb is the one allowed exception, and only behind ImportError
        allowed = _optional_imports(tree) if path == PACKAGE / "cli.py" else set()
        offenders += [
            f"{path.relative_to(PACKAGE.parent)}:{n.lineno}"
            for n in ast.walk(tree)
            if _imports_analysis(n) and id(n) not in allowed
        ]
    assert not offenders, f"prelora_ray/ must not import analysis/: {offenders}"


def test_the_static_check_sees_a_plain_import() -> None:
    assert _imports_analysis(ast.parse("from analysis.pareto import knee_point").body[0])
    assert _imports_analysis(ast.parse("import analysis.runs").body[0])
    assert not _imports_analysis(ast.parse("from prelora_ray.front import knee_point").body[0])


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in conftest.py or a helper module (builders, sweeps, servers), never in a test module."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in getattr(node, "names", [])]
            )
            if isinstance(node, ast.Import | ast.ImportFrom) and any(n.startswith("tests.test_") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, (
        f"import shared helpers from tests/builders.py, sweeps.py, servers.py or conftest.py: {offenders}"
    )
