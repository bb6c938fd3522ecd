"""One tracking facade: no module of prelora_ray/ or analysis/ but prelora_ray/tracking.py imports mlflow, holds an
MlflowClient or writes an MLflow search filter (they ask `tracking.runs(parent=..., role=..., status=...)`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACADE = ROOT / "prelora_ray" / "tracking.py"
# a search filter: an entity attribute compared with a quoted value (tags.`x` = 'y', attributes.status = '...')
FILTER = re.compile(r"""(tags|attributes|params|metrics)\.[\w.`{}\[\]"']*\s*(=|!=|<>|<=|>=|<|>|LIKE|ILIKE)\s*'""")
CLIENT = re.compile(r"\bMlflowClient\b|^\s*(import mlflow|from mlflow)|tracking\._(client|search)\b")


def offenders(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each line that writes a filter or reaches for MLflow itself."""
    return [
        (i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if FILTER.search(line) or CLIENT.search(line)
    ]


def test_the_detector_sees_filters_and_clients():
    bad = (
        "q = f\"tags.`{M.ROLE_TAG}` = '{role}' and attributes.status = 'RUNNING'\"\n"
        "c = MlflowClient(uri)\nimport mlflow\n"
    )
    assert [n for n, _ in offenders(bad)] == [1, 2, 3]
    assert not offenders('column = f"tags.{M.ROLE_TAG}"\nruns = tracking.runs(uri, exp, role="trial")\n')


@pytest.mark.parametrize(
    "path",
    sorted(p for d in ("prelora_ray", "analysis") for p in (ROOT / d).rglob("*.py") if p != FACADE),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_only_the_facade_talks_to_mlflow(path):
    found = offenders(path.read_text())
    assert not found, f"{path.relative_to(ROOT)}: use prelora_ray.tracking instead of: {found}"
