"""A sweep as recorded in MLflow: its parent run, objectives and the table of its runs.

Read through `tracking` (the only mlflow importer); the table itself is `front.sweep_table`.
Used by the sweep's `best` verb and by analysis/ (reports, plots).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prelora_ray import metrics as M
from prelora_ray import tracking
from prelora_ray.front import sweep_table

DEFAULT_OBJECTIVES = [(M.FINAL_VAL_ACC, "max"), (M.MEAN_EPOCH_TIME_S, "min")]  # sweeps that logged none


@dataclass(kw_only=True)
class SweepRecord:
    """One sweep as read from MLflow: the parent run, its objectives and the table of its runs."""

    name: str
    """The sweep's name (its tag on every run of the sweep)."""
    experiment_id: str
    """The MLflow experiment holding the sweep."""
    parent_run_id: str
    """The sweep's parent MLflow run."""
    objectives: list[tuple[str, str]]
    """(metric, "max" or "min") per objective, as the sweep logged them."""
    table: pd.DataFrame
    """One row per child run: see front.sweep_table."""
    params: dict[str, str]
    """The parent run's params (strings, as MLflow stores them)."""
    alpha: float = 0.05
    """The significance level of the table's verdicts and front (the sweep file's `alpha`)."""
    hits: dict[str, np.ndarray] = field(default_factory=dict)
    """Each finished run's val_correct.npy by run id (none for runs logged before it)."""


def list_sweeps(uri: str, experiment: str) -> pd.DataFrame:
    """The sweeps (parent runs) of an experiment, newest first."""
    exp = tracking.experiment_id(uri, experiment)
    if exp is None:
        raise ValueError(f"--experiment {experiment!r}: no such MLflow experiment in {uri}")
    runs = tracking.runs(uri, exp, role="parent")
    return runs.sort_values("start_time", ascending=False).reset_index(drop=True) if len(runs) else runs


def load_sweep(uri: str, experiment: str, sweep: str | None = None) -> SweepRecord:
    """A sweep by name (default: the newest in the experiment) with its table of runs."""
    parents = list_sweeps(uri, experiment)
    if sweep is not None and len(parents):
        parents = parents[parents[f"tags.{M.SWEEP_TAG}"] == sweep]
    if parents.empty:
        raise ValueError(
            f"--sweep {sweep!r}: no such sweep in experiment {experiment!r}"
            if sweep
            else f"--experiment {experiment!r} holds no sweep"
        )
    parent = parents.iloc[0]
    params = {k[len("params.") :]: v for k, v in parent.items() if k.startswith("params.") and isinstance(v, str)}
    objectives = [tuple(o) for o in json.loads(params.get("objectives", "[]"))] or list(DEFAULT_OBJECTIVES)
    runs = tracking.runs(uri, parent["experiment_id"], parent=parent["run_id"])
    alpha = float(params.get("alpha", 0.05))  # sweeps logged before the key: the default
    hits = run_hits(uri, runs)
    repeated = repeat_hits(uri, parent["experiment_id"], parent[f"tags.{M.SWEEP_TAG}"], runs, hits)
    return SweepRecord(
        name=parent[f"tags.{M.SWEEP_TAG}"],
        experiment_id=parent["experiment_id"],
        parent_run_id=parent["run_id"],
        objectives=objectives,
        table=sweep_table(runs, objectives, _sampled(params), hits=hits, alpha=alpha, repeats=repeated),
        params=params,
        alpha=alpha,
        hits=hits,
    )


def run_hits(uri: str, runs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each FINISHED run's val_correct.npy (per-image correctness) by run id; runs logged without one are left out."""
    out: dict[str, np.ndarray] = {}
    if runs.empty:
        return out
    with tempfile.TemporaryDirectory(prefix="prelora-") as folder:
        for _, run in runs[runs["status"] == "FINISHED"].iterrows():
            target = Path(folder) / str(run["run_id"])
            target.mkdir()
            try:
                path = tracking.download_artifact(uri, run["run_id"], M.VAL_CORRECT_ARTIFACT, target)
            except Exception:  # logged before per-image correctness (or the artifact store lost it)
                continue
            out[str(run["run_id"])] = np.load(path).astype(bool)
    return out


def repeat_hits(
    uri: str, experiment_id: str, sweep: str, runs: pd.DataFrame, hits: dict[str, np.ndarray]
) -> dict[str, dict[int, np.ndarray]]:
    """{run id: {seed: val_correct.npy}} of each FINISHED run of `runs` with its own hits and those of its FINISHED
    repeats (`repeats:`; nested runs with role `repeat`), keyed by the seed each trained with after the fork (the
    run's own `seed` param for repeat 0). Empty when the sweep (or scan) `sweep` has no repeats: its tables are then
    exactly those of a sweep without the key."""
    reps = tracking.runs(uri, experiment_id, role="repeat", status="FINISHED", tags={M.SWEEP_TAG: sweep})
    if reps.empty or runs.empty:
        return {}
    out: dict[str, dict[int, np.ndarray]] = {}
    for _, run in runs[runs["status"] == "FINISHED"].iterrows():
        if str(run["run_id"]) in hits:
            out[str(run["run_id"])] = {int(float(run.get("params.seed", 0))): hits[str(run["run_id"])]}
    for rep_id, rep_hits in run_hits(uri, reps).items():
        rep = reps[reps["run_id"] == rep_id].iloc[0]
        of = rep.get(f"tags.{M.REPEAT_OF_TAG}")
        if of in out:
            out[of][int(rep[f"tags.{M.REPEAT_SEED_TAG}"])] = rep_hits
    return out if any(len(v) > 1 for v in out.values()) else {}


def _sampled(params: dict[str, str]) -> list[str]:
    """The sweep's sampled keys from its parent's `parameters` param (none if absent or unreadable)."""
    try:
        keys = json.loads(params.get("parameters", "[]"))
    except ValueError:
        return []
    return [str(k) for k in keys] if isinstance(keys, list) else []
