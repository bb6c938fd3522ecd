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
from prelora_ray.tracking import search_runs

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
    "search_runs",
    "strategy_runs",
    "sweep_table",
]


def strategy_runs(uri: str, experiment: str, filter_string: str = "") -> pd.DataFrame:
    """Standalone `prelora-ray train` runs (no parent) of an experiment, for comparing strategies."""
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"--experiment {experiment!r}: no such MLflow experiment in {uri}")
    runs = search_runs(uri, [exp.experiment_id], filter_string)
    if "tags.mlflow.parentRunId" in runs:
        runs = runs[runs["tags.mlflow.parentRunId"].isna()]
    if f"tags.{M.ROLE_TAG}" in runs:
        runs = runs[runs[f"tags.{M.ROLE_TAG}"].isna()]
    return runs.reset_index(drop=True)


def metric_history(uri: str, run_id: str, keys: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """Per-epoch values of the given metrics of one run: index epoch, one column per key."""
    client = tracking.client(uri)
    series = {}
    for key in keys:
        hist = client.get_metric_history(run_id, key)
        if hist:
            by_step: dict[int, float] = {}
            for m in sorted(hist, key=lambda m: m.timestamp):
                by_step[m.step] = m.value  # a resumed run may re-log an epoch: the latest wins
            series[key] = pd.Series(by_step)
    frame = pd.DataFrame(series)
    frame.index.name = M.EPOCH
    return frame.sort_index()


def metric_keys(uri: str, run_id: str, prefix: str) -> list[str]:
    """Metric names of a run starting with prefix (e.g. 'norm/')."""
    return sorted(k for k in tracking.client(uri).get_run(run_id).data.metrics if k.startswith(prefix))


def run_ranks(uri: str, run_id: str) -> dict[str, list[int]]:
    """The ranks per family and layer of a run (its ranks.json artifact); {} when it never switched."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = tracking.client(uri).download_artifacts(run_id, "ranks.json", tmp)
        except Exception:
            return {}
        data = json.loads(Path(path).read_text())
    return data.get(M.RANKS) or {}
