"""Reading sweeps and runs from MLflow into pandas (nothing is read from Ray's result folders).

The sweep record and its table live in the package (prelora_ray.sweep_record, prelora_ray.front)
because the sweep's `best` verb reads them too; they are re-exported here. What only analysis
needs (per-epoch histories, ranks, standalone runs) is below.
"""

from __future__ import annotations

import json

import pandas as pd

from prelora_ray import metrics as M
from prelora_ray import tracking
from prelora_ray.front import TRIAL_METRICS, format_front, sweep_table, trial_strategies
from prelora_ray.sweep_record import SweepRecord, list_sweeps, load_sweep

__all__ = [
    "TRIAL_METRICS",
    "SweepRecord",
    "format_front",
    "trial_strategies",
    "list_sweeps",
    "load_sweep",
    "metric_history",
    "metric_keys",
    "run_ranks",
    "strategy_runs",
    "sweep_table",
]


def strategy_runs(uri: str, experiment: str, *, tags: dict[str, str] | None = None) -> pd.DataFrame:
    """Standalone `prelora-ray train` runs (no parent, no sweep role) of an experiment, for comparing strategies;
    `tags`: only runs with these tag values (e.g. {"strategy": "lte"})."""
    exp = tracking.experiment_id(uri, experiment)
    if exp is None:
        raise ValueError(f"--experiment {experiment!r}: no such MLflow experiment in {uri}")
    return tracking.runs(uri, exp, tags=tags, top_level=True)


def metric_history(uri: str, run_id: str, keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Per-epoch values of the given metrics of one run: index epoch, one column per key."""
    series = {}
    for key in keys:
        hist = tracking.metric_history(uri, run_id, key)
        if hist:
            by_step: dict[int, float] = {}
            for step, _, value in sorted(hist, key=lambda m: m[1]):
                by_step[step] = value  # a resumed run may re-log an epoch: the latest wins
            series[key] = pd.Series(by_step)
    frame = pd.DataFrame(series)
    frame.index.name = M.EPOCH
    return frame.sort_index()


def metric_keys(uri: str, run_id: str, prefix: str) -> list[str]:
    """Metric names of a run starting with prefix (e.g. 'norm/')."""
    return sorted(k for k in tracking.run_metrics(uri, run_id) if k.startswith(prefix))


def run_ranks(uri: str, run_id: str) -> dict[str, list[int]]:
    """The ranks per family and layer of a run (its ranks.json artifact); {} when it never switched."""
    try:
        data = json.loads(tracking.download_text(uri, run_id, "ranks.json"))
    except Exception:  # no such artifact: the run never switched, or predates ranks.json
        return {}
    return data.get(M.RANKS) or {}
