"""The run summary's keys are declared in one place (prelora_ray/summary.py): what the loop returns and every key the
worker and the driver add are in RunSummary, with the declared types."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from prelora_ray.config import TrainSettings
from prelora_ray.summary import RunSummary
from prelora_ray.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DECLARED = typing.get_type_hints(RunSummary)


def _added_keys(path: Path) -> set[str]:
    """String keys assigned into a variable named `summary` in a module (`summary["key"] = ...`)."""
    keys = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "summary"
                    and isinstance(target.slice, ast.Constant)
                    and isinstance(target.slice.value, str)
                ):
                    keys.add(target.slice.value)
    return keys


def test_the_loops_summary_has_only_declared_keys_of_the_declared_types():
    cfg = TrainSettings.load(
        None,
        [
            "model.preset=vit-digits",
            "tracking.enabled=false",
            "prelora.switch_at_epoch=1",
            "prelora.k=2",
            "prelora.m=1",
            "prelora.warmup=0",
            "epochs=3",
        ],
    )
    summary = train(cfg)
    assert set(summary) <= set(DECLARED), set(summary) - set(DECLARED)
    for key, value in summary.items():
        hint = DECLARED[key]
        origin = typing.get_origin(hint) or hint
        if origin is typing.Union or str(origin) == "types.UnionType":
            origin = tuple(typing.get_origin(a) or a for a in typing.get_args(hint))
        assert isinstance(value, origin), (key, value, hint)
    assert summary["switch_epoch"] == 1 and summary["ranks"]


def test_what_the_worker_and_the_driver_add_is_declared():
    for module in (
        "prelora_ray/orchestration/worker.py",
        "prelora_ray/orchestration/train.py",
        "prelora_ray/trainer.py",
    ):
        added = _added_keys(ROOT / module)
        assert added, module  # the scan sees the assignments
        assert added <= set(DECLARED), (module, added - set(DECLARED))
