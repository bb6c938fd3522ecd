"""What a finished sweep leaves: the Pareto table on its parent run, the epochs it trained, and the train config of a
picked run written for the final long run (`prelora-ray best`, for sweeps and scans alike)."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import yaml

from prelora_ray import metrics as M
from prelora_ray import tracking
from prelora_ray.config import TrainSettings
from prelora_ray.front import knee_point, speedup_at_equal_accuracy, sweep_table
from prelora_ray.orchestration.sweep import Sweep
from prelora_ray.sweep_record import load_sweep

PICKS = ("knee", "max-acc", "min-time", "fastest-within=<points>")


def finish_sweep(sweep: Sweep) -> pd.DataFrame:
    """Tag Pareto trials, log the Pareto table as a CSV artifact of the parent, return the table."""
    runs = tracking.runs(sweep.tracking_uri, sweep.experiment_id, parent=sweep.parent_run_id)
    objectives = [(o.metric, o.mode) for o in sweep.space.objectives]
    table = sweep_table(runs, objectives, [p.key for p in sweep.space.parameters])
    for _, row in table.iterrows():
        if row["role"] == "trial":
            tracking.set_tags(sweep.tracking_uri, row["run_id"], {M.PARETO_TAG: str(bool(row[M.PARETO_TAG])).lower()})
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    tracking.log_text(sweep.tracking_uri, sweep.parent_run_id, buf.getvalue(), "pareto.csv")
    counts = {
        "trials": int((table["role"] == "trial").sum()) if len(table) else 0,
        "pareto_trials": int(table[M.PARETO_TAG].sum()) if len(table) else 0,
        **epoch_totals(runs, sweep.space.base.epochs),
    }
    tracking.log_metrics(sweep.tracking_uri, sweep.parent_run_id, counts)
    return table


def epoch_totals(runs: pd.DataFrame, epochs: int) -> dict[str, int]:
    """Epochs the sweep's finished runs trained, and what the same trials and baseline cost from scratch."""
    column = f"tags.{M.EPOCHS_TRAINED_TAG}"
    if runs.empty or column not in runs:
        return {M.EPOCHS_TRAINED_TOTAL: 0, M.EPOCHS_NAIVE_TOTAL: 0}
    done = runs[runs["status"] == "FINISHED"]
    trained = pd.to_numeric(done[column], errors="coerce").fillna(epochs)
    return {M.EPOCHS_TRAINED_TOTAL: int(trained.sum()), M.EPOCHS_NAIVE_TOTAL: int(len(done) * epochs)}


def check_pick(pick: str) -> None:
    """A one-line error for an unknown --pick rule (before anything is read)."""
    if not (pick in PICKS[:3] or pick.startswith("fastest-within=")):
        raise ValueError(f"--pick {pick!r} is invalid: one of {', '.join(PICKS)}")


def pick_row(table: pd.DataFrame, objectives: list[tuple[str, str]], pick: str) -> pd.Series:
    """The trial chosen from a sweep's table by a --pick rule."""
    check_pick(pick)
    front = table[table[M.PARETO_TAG]].reset_index(drop=True)
    if front.empty:
        raise ValueError("the sweep has no finished trial on its Pareto front")
    if pick == "knee":
        values = front[[m for m, _ in objectives]].astype(float).to_numpy()
        return front.iloc[knee_point(values, [d for _, d in objectives])]
    if pick == "max-acc":
        return front.loc[front[M.FINAL_VAL_ACC].astype(float).idxmax()]
    if pick == "min-time":
        return front.loc[front[M.MEAN_EPOCH_TIME_S].astype(float).idxmin()]
    try:
        points = float(pick.split("=", 1)[1])
    except ValueError:
        raise ValueError(f"--pick {pick!r}: give points of accuracy, e.g. fastest-within=0.5") from None
    base = table[(table["role"] == "baseline") & (table["status"] == "FINISHED")]
    if base.empty:
        raise ValueError(f"--pick {pick!r} needs the sweep's finished baseline run")
    trials = table[(table["role"] == "trial") & (table["status"] == "FINISHED")].reset_index(drop=True)
    idx, _ = speedup_at_equal_accuracy(
        trials[M.FINAL_VAL_ACC].astype(float).tolist(),
        trials[M.MEAN_EPOCH_TIME_S].astype(float).tolist(),
        float(base[M.FINAL_VAL_ACC].iloc[0]),
        float(base[M.MEAN_EPOCH_TIME_S].iloc[0]),
        within_points=points,
    )
    if idx is None:
        raise ValueError(f"--pick {pick!r}: no trial within {points} points of the baseline's accuracy")
    return trials.iloc[idx]


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
    row = pick_row(record.table, record.objectives, pick)
    cfg = run_train_config(uri, row["run_id"], f"run {row['run_id']} config.yaml")
    header = (
        f"# prelora-ray best --pick {pick}: trial {row['run_name']} (MLflow run {row['run_id']}) "
        f"of sweep {record.name}\n"
        f"# strategy {cfg.strategy}, final_val_acc {row[M.FINAL_VAL_ACC]:.4f}, "
        f"mean_epoch_time_s {row[M.MEAN_EPOCH_TIME_S]:.4f}, switch epoch {row[M.SWITCH_EPOCH]}\n"
    )
    write_train_config(out, header, cfg)
    return row, cfg
