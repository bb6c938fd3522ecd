"""What a finished sweep leaves: the Pareto table on its parent run, the epochs it trained, and the train config of a
picked run written for the final long run (`prelora-ray best`, for sweeps and scans alike)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from prelora_ray import metrics as M
from prelora_ray import tracking
from prelora_ray.config import TrainSettings
from prelora_ray.front import (
    ACC_HI,
    ACC_LO,
    EARLY_STOPPED,
    FRONT,
    P_VS_BASELINE,
    SPEEDUP,
    SPEEDUP_HI,
    SPEEDUP_LO,
    VERDICT,
    knee_point,
    speedup_at_equal_accuracy,
    sweep_table,
)
from prelora_ray.orchestration.sweep import Sweep
from prelora_ray.significance import compare_accuracy, paired_difference
from prelora_ray.sweep_record import load_sweep, repeat_hits, run_hits

PICKS = ("knee", "max-acc", "min-time", "fastest-within=<points>", "fastest-not-worse[=<points>]")


def finish_sweep(sweep: Sweep) -> pd.DataFrame:
    """Tag Pareto trials, log the Pareto table as a CSV artifact of the parent, return the table."""
    runs = tracking.runs(sweep.tracking_uri, sweep.experiment_id, parent=sweep.parent_run_id)
    objectives = [(o.metric, o.mode) for o in sweep.space.objectives]
    hits = run_hits(sweep.tracking_uri, runs)
    table = sweep_table(
        runs,
        objectives,
        [p.key for p in sweep.space.parameters],
        hits=hits,
        alpha=sweep.space.alpha,
        repeats=repeat_hits(sweep.tracking_uri, sweep.experiment_id, sweep.name, runs, hits),
    )
    for _, row in table.iterrows():
        if row["role"] == "trial":
            tracking.set_tags(sweep.tracking_uri, row["run_id"], {M.PARETO_TAG: str(bool(row[M.PARETO_TAG])).lower()})
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    tracking.log_text(sweep.tracking_uri, sweep.parent_run_id, buf.getvalue(), "pareto.csv")
    counts = {
        "trials": int((table["role"] == "trial").sum()) if len(table) else 0,
        "pareto_trials": int(table[M.PARETO_TAG].sum()) if len(table) else 0,
        **epoch_totals(with_repeats(sweep, runs), sweep.space.base.epochs),
    }
    tracking.log_metrics(sweep.tracking_uri, sweep.parent_run_id, counts)
    return table


def with_repeats(sweep: Sweep, runs: pd.DataFrame) -> pd.DataFrame:
    """The sweep's child runs and, with `repeats:`, their repeats (nested one level deeper), for the epoch totals."""
    if sweep.space.repeats <= 1:
        return runs
    reps = tracking.runs(sweep.tracking_uri, sweep.experiment_id, role="repeat", tags={M.SWEEP_TAG: sweep.name})
    return pd.concat([runs, reps], ignore_index=True) if len(reps) else runs


def epoch_totals(runs: pd.DataFrame, epochs: int) -> dict[str, int]:
    """Epochs the sweep's finished runs trained, and what the same trials and baseline cost from scratch."""
    column = f"tags.{M.EPOCHS_TRAINED_TAG}"
    if runs.empty or column not in runs:
        return {M.EPOCHS_TRAINED_TOTAL: 0, M.EPOCHS_NAIVE_TOTAL: 0}
    done = runs[runs["status"] == "FINISHED"]
    trained = pd.to_numeric(done[column], errors="coerce").fillna(epochs)
    return {M.EPOCHS_TRAINED_TOTAL: int(trained.sum()), M.EPOCHS_NAIVE_TOTAL: int(len(done) * epochs)}


def check_pick(pick: str) -> None:
    """A one-line error for an unknown --pick rule or a margin that is not a number >= 0 (before anything is read)."""
    if pick in PICKS[:3] or pick == "fastest-not-worse":
        return
    rule, _, value = pick.partition("=")
    if rule not in ("fastest-within", "fastest-not-worse"):
        raise ValueError(f"--pick {pick!r} is invalid: one of {', '.join(PICKS)}")
    try:
        points = float(value)
    except ValueError:
        raise ValueError(f"--pick {pick!r}: give points of accuracy, e.g. {rule}=0.5") from None
    if not points >= 0:
        raise ValueError(f"--pick {pick!r}: the points must be a number >= 0")


def _margin(pick: str) -> float:
    return float(pick.partition("=")[2] or 0)


def pick_row(
    table: pd.DataFrame,
    objectives: list[tuple[str, str]],
    pick: str,
    *,
    hits: Mapping[str, np.ndarray] | None = None,
    alpha: float = 0.05,
) -> pd.Series:
    """The trial chosen from a sweep's table by a --pick rule; its `pick_note` says when the choice was within noise.

    `knee` and `max-acc` choose among the plausible trials (front.noise_columns; the Pareto trials for sweeps logged
    before it); `max-acc` takes the fastest of the trials indistinguishable in accuracy from the most accurate one.
    `fastest-not-worse[=X]`: the fastest trial whose accuracy is not significantly below the baseline's by more than
    X points (the paired interval of significance.paired_difference; X = 0: its verdict is not `worse`).
    """
    check_pick(pick)
    hits = hits or {}
    trials = table[(table["role"] == "trial") & (table["status"] == "FINISHED")]
    if EARLY_STOPPED in trials:  # stopped at a rung: never picked
        trials = trials[~trials[EARLY_STOPPED].astype(bool)]
    trials = trials.reset_index(drop=True)
    note = ""
    if pick.startswith("fastest-not-worse"):
        return _fastest_not_worse(table, trials, pick, hits, alpha)
    if pick.startswith("fastest-within="):
        return _fastest_within(table, trials, pick)
    has_front = FRONT in trials and (trials[FRONT] != "").any()
    front = trials[trials[FRONT] == "plausible"] if has_front else trials[trials[M.PARETO_TAG].astype(bool)]
    front = front.reset_index(drop=True)
    if front.empty:
        raise ValueError("the sweep has no finished trial on its Pareto front")
    if pick == "min-time":
        return _noted(front.loc[front[M.MEAN_EPOCH_TIME_S].astype(float).idxmin()], note)
    if pick == "knee":
        values = front[[m for m, _ in objectives]].astype(float).to_numpy()
        row = front.iloc[knee_point(values, [d for _, d in objectives])]
        if has_front and len(front) > 1:
            note = f"the knee of the {len(front)} plausible trials (the others are within noise of the front)"
        return _noted(row, note)
    best = front.loc[front[M.FINAL_VAL_ACC].astype(float).idxmax()]
    if str(best["run_id"]) in hits:
        ties = front[
            [
                str(r) in hits
                and compare_accuracy(hits[str(r)], hits[str(best["run_id"])], alpha) == "indistinguishable"
                for r in front["run_id"]
            ]
        ]
        if len(ties) > 1:
            fastest = ties.loc[_speed(ties).idxmax()]
            note = f"{len(ties)} trials are indistinguishable in accuracy (p >= {alpha:g}); took the fastest"
            return _noted(fastest, note)
    return _noted(best, note)


def _speed(rows: pd.DataFrame) -> pd.Series:
    """Larger is faster: the run's speed-up where the table has one, else minus its mean epoch time."""
    if SPEEDUP in rows and rows[SPEEDUP].notna().all():
        return rows[SPEEDUP].astype(float)
    return -rows[M.MEAN_EPOCH_TIME_S].astype(float)


def _noted(row: pd.Series, note: str) -> pd.Series:
    row = row.copy()
    row["pick_note"] = note
    return row


def _baseline(table: pd.DataFrame, pick: str) -> pd.Series:
    base = table[(table["role"] == "baseline") & (table["status"] == "FINISHED")]
    if base.empty:
        raise ValueError(f"--pick {pick!r} needs the sweep's finished baseline run")
    return base.iloc[0]


def _fastest_not_worse(
    table: pd.DataFrame, trials: pd.DataFrame, pick: str, hits: Mapping[str, np.ndarray], alpha: float
) -> pd.Series:
    base = _baseline(table, pick)
    base_hits = hits.get(str(base["run_id"]))
    if base_hits is None:
        raise ValueError(
            f"--pick {pick!r} needs the runs' val_correct.npy, which this sweep did not log (it predates it): "
            "use fastest-within=POINTS"
        )
    margin = _margin(pick) / 100
    if margin == 0 and M.REPEATS in trials:  # a sweep with repeats: its verdicts are over seeds (front.noise_columns)
        allowed = trials[trials[VERDICT].isin(["indistinguishable", "better"])]
        if allowed.empty:
            raise ValueError(f"--pick {pick!r}: every finished trial is significantly worse than the baseline")
        row = allowed.loc[_speed(allowed).idxmax()]
        return _noted(
            row,
            f"the fastest of {len(allowed)} of {len(trials)} trials not significantly worse than the baseline "
            "(paired per seed over their repeats)",
        )
    ok = [
        str(r) in hits
        and hits[str(r)].size == base_hits.size
        and paired_difference(hits[str(r)], base_hits, alpha)[2] >= -margin
        for r in trials["run_id"]
    ]
    allowed = trials[ok]
    if allowed.empty:
        raise ValueError(f"--pick {pick!r}: every finished trial is significantly worse than the baseline")
    row = allowed.loc[_speed(allowed).idxmax()]
    return _noted(
        row, f"the fastest of {len(allowed)} of {len(trials)} trials not significantly worse than the baseline"
    )


def _fastest_within(table: pd.DataFrame, trials: pd.DataFrame, pick: str) -> pd.Series:
    points = _margin(pick)
    base = _baseline(table, pick)
    idx, _ = speedup_at_equal_accuracy(
        trials[M.FINAL_VAL_ACC].astype(float).tolist(),
        trials[M.MEAN_EPOCH_TIME_S].astype(float).tolist(),
        float(base[M.FINAL_VAL_ACC]),
        float(base[M.MEAN_EPOCH_TIME_S]),
        within_points=points,
    )
    if idx is None:
        raise ValueError(f"--pick {pick!r}: no trial within {points} points of the baseline's accuracy")
    return _noted(trials.iloc[idx], "")


def pick_header(row: pd.Series, alpha: float) -> str:
    """The exported config's comment lines on the pick's uncertainty (empty for a sweep logged before it)."""
    lines = []
    if pd.notna(row.get(ACC_LO)):
        lines.append(
            f"# final_val_acc {row[M.FINAL_VAL_ACC]:.4f}, {100 * (1 - alpha):g}% interval [{row[ACC_LO]:.4f}, "
            f"{row[ACC_HI]:.4f}] over {int(row[M.VAL_N])} images; against the baseline: p {row[P_VS_BASELINE]:.3g}, "
            f"{row[VERDICT]}"
        )
    if pd.notna(row.get(SPEEDUP_LO)):
        lines.append(f"# speedup {row[SPEEDUP]:.3f} [{row[SPEEDUP_LO]:.3f}, {row[SPEEDUP_HI]:.3f}]")
    if row.get("pick_note"):
        lines.append(f"# {row['pick_note']}")
    return "".join(line + "\n" for line in lines)


def run_train_config(uri: str, run_id: str, source: str) -> TrainSettings:
    """The train config a run logged (its config.yaml artifact)."""
    return TrainSettings.from_dict(yaml.safe_load(tracking.download_text(uri, run_id, "config.yaml")), source=source)


def write_train_config(out: str | Path, header: str, cfg: TrainSettings) -> None:
    """A train config for the final run: the picked settings, with the sweep's names and places back at their
    defaults (the new run gets its own name, store and storage), under a comment header saying where it came from."""
    defaults = TrainSettings()
    cfg = cfg.replace(
        **{
            "name": None,
            "tracking.run_name": None,
            "tracking.uri": None,
            "output_dir": defaults.output_dir,
            "cluster.storage_path": defaults.cluster.storage_path,
        }
    )
    Path(out).write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def export_best(
    uri: str, experiment: str, sweep: str | None, pick: str, out: str | Path
) -> tuple[pd.Series, TrainSettings]:
    """Write the train config of the picked trial to `out`; returns (the trial's row, the config)."""
    check_pick(pick)
    record = load_sweep(uri, experiment, sweep)
    row = pick_row(record.table, record.objectives, pick, hits=record.hits, alpha=record.alpha)
    cfg = run_train_config(uri, row["run_id"], f"run {row['run_id']} config.yaml")
    header = (
        f"# prelora-ray best --pick {pick}: trial {row['run_name']} (MLflow run {row['run_id']}) "
        f"of sweep {record.name}\n"
        f"# strategy {cfg.strategy}, final_val_acc {row[M.FINAL_VAL_ACC]:.4f}, "
        f"mean_epoch_time_s {row[M.MEAN_EPOCH_TIME_S]:.4f}, switch epoch {row[M.SWITCH_EPOCH]}\n"
        + pick_header(row, record.alpha)
    )
    write_train_config(out, header, cfg)
    return row, cfg
