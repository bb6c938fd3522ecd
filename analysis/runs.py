"""Reading sweeps and runs from MLflow into pandas (nothing is read from Ray's result folders).

Depends on nothing in prelora_ray but its metric and tag names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from prelora_ray import metrics as M

TRIAL_METRICS = (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.FINAL_VAL_ACC, M.BEST_VAL_ACC, M.MEAN_EPOCH_TIME_S, M.PEAK_MEM_MB, M.TRAINABLE_FRACTION, M.TOTAL_TRAIN_TIME_S)


@dataclass(kw_only=True)
class SweepRecord:
    """One sweep as read from MLflow: the parent run, its objectives and the table of its runs."""

    name: str
    experiment_id: str
    parent_run_id: str
    objectives: list[tuple[str, str]]
    table: pd.DataFrame  # one row per child run: see sweep_table
    params: dict[str, str]


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def search_runs(uri: str, experiment_ids: list[str], filter_string: str = "") -> pd.DataFrame:
    """mlflow.search_runs into pandas for a store (sets the tracking URI, never an experiment)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_ids, filter_string=filter_string, output_format="pandas", max_results=50000)


def _num(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def sweep_table(runs: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """One row per run: role, status, switch parameters, objectives, speed-up over the baseline, Pareto flag.

    The front is computed over FINISHED trials only (failed trials never reach it; the baseline is
    the reference point, not a candidate).
    """
    from analysis.pareto import pareto_mask

    if runs.empty:
        return pd.DataFrame(columns=["run_id", "run_name", "role", "status", M.PARETO_TAG, "speedup"])
    rows = []
    for _, r in runs.iterrows():
        row: dict[str, Any] = {
            "run_id": r["run_id"],
            "run_name": r.get("tags.mlflow.runName"),
            "role": r.get(f"tags.{M.ROLE_TAG}"),
            "sweep": r.get(f"tags.{M.SWEEP_TAG}"),
            "status": r.get("status"),
            "strategy": r.get("params.strategy"),
        }
        for key in M.SWITCH_PARAMS:  # the full baseline never switches: its switch params mean nothing
            row[key] = _num(r.get(f"params.{key}")) if row["strategy"] != "full" else float("nan")
        for key in TRIAL_METRICS + tuple(m for m, _ in objectives):
            row[key] = r.get(f"metrics.{key}")
        rows.append(row)
    table = pd.DataFrame(rows)
    base = table[(table["role"] == "baseline") & (table["status"] == "FINISHED")]
    base_time = float(base[M.MEAN_EPOCH_TIME_S].iloc[0]) if len(base) else float("nan")
    table["speedup"] = base_time / table[M.MEAN_EPOCH_TIME_S].astype(float)
    table[M.PARETO_TAG] = False
    ok = (table["role"] == "trial") & (table["status"] == "FINISHED")
    if ok.any():
        values = table.loc[ok, [m for m, _ in objectives]].astype(float).to_numpy()
        table.loc[ok, M.PARETO_TAG] = pareto_mask(values, [d for _, d in objectives])
    first, mode = objectives[0]
    return table.sort_values([M.PARETO_TAG, first], ascending=[False, mode == "min"]).reset_index(drop=True)


def format_front(table: pd.DataFrame) -> str:
    """The console table of the Pareto trials and the baseline."""
    if table.empty:
        return "no finished trials"
    shown = table[(table[M.PARETO_TAG]) | (table["role"] == "baseline")]
    cols = ["run_name", "role", *M.SWITCH_PARAMS, M.SWITCH_EPOCH, M.FINAL_VAL_ACC, M.MEAN_EPOCH_TIME_S, "speedup"]
    out = shown[[c for c in cols if c in shown.columns]].rename(columns=lambda c: c.replace("prelora.", ""))
    return out.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def list_sweeps(uri: str, experiment: str) -> pd.DataFrame:
    """The sweeps (parent runs) of an experiment, newest first."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"--experiment {experiment!r}: no such MLflow experiment in {uri}")
    runs = search_runs(uri, [exp.experiment_id], f"tags.`{M.ROLE_TAG}` = 'parent'")
    return runs.sort_values("start_time", ascending=False).reset_index(drop=True) if len(runs) else runs


def load_sweep(uri: str, experiment: str, sweep: str | None = None) -> SweepRecord:
    """A sweep by name (default: the newest in the experiment) with its table of runs."""
    parents = list_sweeps(uri, experiment)
    if sweep is not None and len(parents):
        parents = parents[parents[f"tags.{M.SWEEP_TAG}"] == sweep]
    if parents.empty:
        raise ValueError(f"--sweep {sweep!r}: no such sweep in experiment {experiment!r}" if sweep else f"--experiment {experiment!r} holds no sweep")
    parent = parents.iloc[0]
    params = {k[len("params."):]: v for k, v in parent.items() if k.startswith("params.") and isinstance(v, str)}
    objectives = [tuple(o) for o in json.loads(params.get("objectives", "[]"))] or [(M.FINAL_VAL_ACC, "max"), (M.MEAN_EPOCH_TIME_S, "min")]
    runs = search_runs(uri, [parent["experiment_id"]], f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    return SweepRecord(
        name=parent[f"tags.{M.SWEEP_TAG}"],
        experiment_id=parent["experiment_id"],
        parent_run_id=parent["run_id"],
        objectives=objectives,
        table=sweep_table(runs, objectives),
        params=params,
    )


def strategy_runs(uri: str, experiment: str, filter_string: str = "") -> pd.DataFrame:
    """Standalone `prelora-ray train` runs (no parent) of an experiment, for comparing strategies."""
    client = _client(uri)
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
    client = _client(uri)
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
    return sorted(k for k in _client(uri).get_run(run_id).data.metrics if k.startswith(prefix))


def run_ranks(uri: str, run_id: str) -> dict[str, list[int]]:
    """The ranks per family and layer of a run (its ranks.json artifact); {} when it never switched."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = _client(uri).download_artifacts(run_id, "ranks.json", tmp)
        except Exception:
            return {}
        data = json.loads(Path(path).read_text())
    return data.get(M.RANKS) or {}
