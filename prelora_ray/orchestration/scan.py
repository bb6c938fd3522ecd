"""`prelora-ray scan` on Ray: the trunk, one fork per candidate switch epoch (a Ray Tune grid over
`prelora.switch_at_epoch`), the grid replay, and the scan's MLflow parent with `scan.csv` and `scan.png`.

It is a fork-mode sweep without sampled parameters, on the same core (sweep.py, driver.py, results.py): the trunk
runs ahead as a Ray task (or is reused, by name, when the experiment holds the finished `<scan>_baseline`), and each
point is a `fork_trial`. The same name again adds points to the scan's table.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from prelora_ray import fork, tracking
from prelora_ray import metrics as M
from prelora_ray import scan as S
from prelora_ray.config import TrainSettings
from prelora_ray.front import NOISE_COLUMNS, noise_columns
from prelora_ray.orchestration import driver
from prelora_ray.orchestration.console import SweepConsole, trial_error
from prelora_ray.orchestration.ray_hooks import apply_console
from prelora_ray.orchestration.results import epoch_totals, run_train_config, with_repeats, write_train_config
from prelora_ray.orchestration.sweep import Sweep, final_report, make_sweep, trial_resources
from prelora_ray.orchestration.trunk import trunk_dir
from prelora_ray.search_space import DEFAULT_OBJECTIVES, TRIAL_EXECUTORS, Objective, SearchSpace
from prelora_ray.significance import check_repeats, paired_difference
from prelora_ray.sweep_record import repeat_hits, run_hits

log = logging.getLogger("prelora_ray")
SCAN_ROLE = "scan"  # ROLE_TAG of a scan's parent run (a sweep's is "parent": `best --sweep` never picks a scan)


def make_scan(
    cfg: TrainSettings,
    *,
    name: str | None,
    tracking_uri: str | None,
    storage_path: str | None,
    experiment: str | None = None,
    trial_executor: str | None = None,
    verbose: bool = False,
    repeats: int = 1,
) -> Sweep:
    """The scan as a fork-mode sweep without sampled parameters; everything cheap is checked before Ray starts.
    `repeats`: data-order seeds per point and for the trunk's continuation (orchestration/repeats.py)."""
    repeats = check_repeats(repeats, "--repeats")
    executor = trial_executor or ("tune" if cfg.cluster.num_workers == 1 else "ray_train")
    if executor not in TRIAL_EXECUTORS:
        raise ValueError(f"--trial-executor {executor!r} is invalid: one of {', '.join(TRIAL_EXECUTORS)}")
    if executor == "tune" and cfg.cluster.num_workers != 1:
        raise ValueError(
            f"--trial-executor tune trains one worker per point; cluster.num_workers is {cfg.cluster.num_workers}"
        )
    if cfg.prelora.window_unit != "epoch":
        raise ValueError(
            "prelora.window_unit='step' is invalid for a scan: the trunk records one snapshot per epoch; use epoch"
        )
    base = cfg.replace(
        **{"strategy": "prelora", "prelora.switch_at_epoch": None, "name": None, "tracking.run_name": None}
    )
    space = SearchSpace(
        name=name or f"scan-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        path="scan",
        base=base,
        parameters=[],
        objectives=[Objective(**o) for o in DEFAULT_OBJECTIVES],
        trial_executor=executor,
        fork=True,
        fork_every=1,
        repeats=repeats,
    )
    return make_sweep(
        space,
        name=space.name,
        tracking_uri=tracking_uri,
        storage_path=storage_path,
        experiment=experiment,
        verbose=verbose,
    )


def point_name(sweep: Sweep, switch_epoch: int) -> str:
    """A point's MLflow run and Ray Train run name."""
    return f"{sweep.name}_switch{switch_epoch:03d}"


def point_fn(config: dict[str, Any], sweep: Sweep) -> None:
    """The Tune trainable of one point: fork the trunk and switch at the end of `switch_epoch`."""
    from ray import tune

    from prelora_ray.orchestration.forking import fork_trial

    apply_console(sweep.verbose)
    epoch = int(config["switch_epoch"])
    cfg = sweep.space.base.replace(**{"prelora.switch_at_epoch": epoch})
    summary = fork_trial(sweep, cfg, point_name(sweep, epoch), {M.SCAN_TAG: sweep.name})
    tune.report(final_report(summary))


class ScanConsole(SweepConsole):
    """A table line per point as it finishes (speed-up against the trunk's epochs recorded so far)."""

    def __init__(self, sweep: Sweep) -> None:
        super().__init__(sweep)
        self.sweep = sweep
        self.header_shown = False

    def run_name(self, trial: Any) -> str:
        """The point's run name."""
        return f"{self.sweep_name}_switch{int(trial.config['switch_epoch']):03d}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Nothing: the point's own process says when it forks."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Its row of the table."""
        history = fork.read_history(trunk_dir(self.sweep))
        trunk_s = fork.summarize(history)[M.MEAN_EPOCH_TIME_S] if history else float("nan")
        if not self.header_shown:
            log.info("point  %s", S.TABLE_HEADER)
            self.header_shown = True
        log.info(
            "point  %s", S.format_row(S.point_row(int(trial.config["switch_epoch"]), trial.last_result or {}, trunk_s))
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A point that failed for good."""
        log.error("point %s: FAILED: %s", self.run_name(trial), trial_error(trial))


def _console(sweep: Sweep) -> Any:
    from ray.tune import Callback

    class TuneScanConsole(ScanConsole, Callback):
        pass

    return TuneScanConsole(sweep)


def run_scan(
    sweep: Sweep, candidates: list[int], grid: list[S.GridSetting], *, address: str | None = None
) -> dict[str, Any]:
    """Trunk, forks, replay; logs scan.csv, grid.csv and scan.png to the parent; returns the table's parts."""
    from ray import tune

    space = sweep.space
    params = {
        "candidates": json.dumps(candidates),
        "grid": json.dumps([g.__dict__ for g in grid]),
        "trial_executor": space.trial_executor,
        "epochs": space.base.epochs,
        "alpha": space.alpha,
        **({"repeats": space.repeats} if space.repeats > 1 else {}),
    }
    tags = {M.ROLE_TAG: SCAN_ROLE, M.SWEEP_TAG: sweep.name, M.SCAN_TAG: sweep.name}
    run = driver.start(sweep, params=params, tags=tags, address=address, concurrent=len(candidates), baseline=False)
    tracking.log_text(
        sweep.tracking_uri, sweep.parent_run_id, yaml.safe_dump(space.base.to_dict(), sort_keys=False), "config.yaml"
    )
    if run.baseline_ref is None:
        log.info("scan %s: reusing its finished trunk %s_baseline (%s)", sweep.name, sweep.name, trunk_dir(sweep))
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(point_fn, sweep=sweep), trial_resources(space)),
        param_space={"switch_epoch": tune.grid_search(candidates)},
        tune_config=tune.TuneConfig(
            trial_dirname_creator=lambda t: point_name(sweep, int(t.config["switch_epoch"])),
            reuse_actors=space.trial_executor == "tune",
        ),
        run_config=driver.run_config(sweep, [_console(sweep)]),
    )
    results = tuner.fit()
    driver.finish(run, results)
    history = fork.read_history(trunk_dir(sweep))
    if len(history) < space.base.epochs:
        error = fork.read_status(trunk_dir(sweep)).get("error")
        raise RuntimeError(f"the trunk {sweep.name}_baseline did not finish: {error}")
    trunk = S.trunk_row(history)
    rows, failed = [], []
    for r in results:
        epoch = int(r.config["switch_epoch"])
        if r.error is not None:
            failed.append(epoch)
            continue
        rows.append(S.point_row(epoch, r.metrics or {}, trunk[M.MEAN_EPOCH_TIME_S]))
    rows += earlier_points(sweep, set(candidates), trunk[M.MEAN_EPOCH_TIME_S])
    landings = S.grid_landings(space.base, history, grid)
    table = _log_parent(sweep, trunk, rows, landings, run.wall_s)
    if M.REPEATS in table:  # the console's trunk row as scan.csv's: its mean over the baseline's repeats
        trunk = {**trunk, M.FINAL_VAL_ACC: float(table.loc[table["switch_epoch"] < 0, M.FINAL_VAL_ACC].iloc[0])}
    return {"trunk": trunk, "rows": rows, "landings": landings, "failed": failed}


def earlier_points(sweep: Sweep, now: set[int], trunk_time_s: float) -> list[dict[str, Any]]:
    """Rows of the points an earlier run of the same scan finished (the same name reuses its trunk and extends the
    scan: its table holds every point scanned so far); points scanned again now are left to this run."""
    runs = tracking.runs(
        sweep.tracking_uri, sweep.experiment_id, parent=sweep.parent_run_id, role="trial", status="FINISHED"
    )
    rows = []
    for _, run in runs.iterrows():
        tag = run.get(f"tags.{M.FORK_SWITCH_TAG}")
        if not isinstance(tag, str) or not tag.isdigit() or int(tag) in now:
            continue
        epoch = int(tag)
        result = {
            k: run.get(f"metrics.{k}")
            for k in (
                M.FINAL_VAL_ACC,
                M.BEST_VAL_ACC,
                M.MEAN_EPOCH_TIME_S,
                M.TRAINABLE_FRACTION,
                M.VAL_N,
                M.VAL_CORRECT,
            )
            if pd.notna(run.get(f"metrics.{k}"))
        }
        for key in ("speedup", "speedup_lo", "speedup_hi"):
            if pd.notna(run.get(f"metrics.{key}")):
                result[key] = run.get(f"metrics.{key}")
        trained = run.get(f"tags.{M.EPOCHS_TRAINED_TAG}")
        rows.append(
            S.point_row(
                epoch, {**result, "epochs_trained": int(trained) if isinstance(trained, str) else -1}, trunk_time_s
            )
        )
    return rows


def scan_frame(
    trunk: dict[str, Any],
    rows: list[dict[str, Any]],
    landings: list[dict[str, Any]],
    runs: pd.DataFrame | None = None,
    alpha: float = 0.05,
    hits: dict[str, Any] | None = None,
    repeats: dict[str, dict[int, Any]] | None = None,
) -> pd.DataFrame:
    """scan.csv: the trunk (switch_epoch -1) and one row per point, with the grid settings landing there, and the
    noise columns of `front.noise_columns` (each point against the trunk, paired on the images; plausible or
    dominated in accuracy and speed-up) where the scan's MLflow runs (`runs`, their `hits`) are given. With `repeats`
    (sweep_record.repeat_hits) `final_val_acc` is each point's mean over its seeds, with the columns `repeats` and
    `val_acc_sd`, and the noise columns are over seeds (front.noise_columns)."""
    frame = pd.DataFrame([trunk, *sorted(rows, key=lambda r: r["switch_epoch"])], columns=list(S.TABLE_COLUMNS))
    frame["grid_settings"] = [
        " ".join(g["setting"] for g in landings if g["switch_epoch"] == e) for e in frame["switch_epoch"]
    ]
    ids = point_run_ids(runs) if runs is not None else {}
    table = frame.assign(
        run_id=[ids.get(int(e), "") for e in frame["switch_epoch"]],
        role=["baseline" if e < 0 else "trial" for e in frame["switch_epoch"]],
        status="FINISHED",
    )
    table = noise_columns(table, [(M.FINAL_VAL_ACC, "max"), ("speedup", "max")], hits or {}, alpha, repeats=repeats)
    for column in NOISE_COLUMNS:
        frame[column] = table[column]
    if repeats:
        for column in (M.FINAL_VAL_ACC, M.REPEATS, M.VAL_ACC_SD):
            frame[column] = table[column]
    return frame


def point_run_ids(runs: pd.DataFrame) -> dict[int, str]:
    """The MLflow run of each scanned switch epoch (FINISHED, the newest), and the trunk's at -1."""
    out: dict[int, str] = {}
    if runs.empty:
        return out
    done = runs[runs["status"] == "FINISHED"].sort_values("start_time")
    for _, run in done.iterrows():
        tag = run.get(f"tags.{M.FORK_SWITCH_TAG}")
        if run.get(f"tags.{M.ROLE_TAG}") == "baseline":
            out[-1] = str(run["run_id"])
        elif isinstance(tag, str) and tag.isdigit():
            out[int(tag)] = str(run["run_id"])
    return out


def _log_parent(
    sweep: Sweep, trunk: dict[str, Any], rows: list[dict[str, Any]], landings: list[dict[str, Any]], wall_s: float
) -> pd.DataFrame:
    uri, parent = sweep.tracking_uri, sweep.parent_run_id
    runs = tracking.runs(uri, sweep.experiment_id, parent=parent)
    hits = run_hits(uri, runs)
    repeated = repeat_hits(uri, sweep.experiment_id, sweep.name, runs, hits)
    table = scan_frame(trunk, rows, landings, runs, sweep.space.alpha, hits, repeated)
    for name, frame in (("scan.csv", table), ("grid.csv", pd.DataFrame(landings))):
        buf = io.StringIO()
        frame.to_csv(buf, index=False)
        tracking.log_text(uri, parent, buf.getvalue(), name)
    with tempfile.TemporaryDirectory(prefix="prelora-") as tmp:
        noted = table.set_index("switch_epoch")
        extra = [c for c in NOISE_COLUMNS if c in noted]

        def with_noise(row: dict[str, Any]) -> dict[str, Any]:
            return {**row, **noted.loc[row["switch_epoch"], extra].to_dict()}

        png = S.plot_scan(
            with_noise(trunk),
            [with_noise(r) for r in rows],
            landings,
            Path(tmp) / "scan.png",
            title=f"scan {sweep.name}: {sweep.space.base.model.preset} on {sweep.space.base.data.name}",
        )
        tracking.log_file(uri, parent, png)
    tracking.log_metrics(
        uri,
        parent,
        {
            **epoch_totals(with_repeats(sweep, runs), sweep.space.base.epochs),
            "scan_wall_time_s": wall_s,
            "points": len(rows),
        },
    )
    tracking.end_run(uri, parent, "FINISHED")
    return table


def load_scan(uri: str, experiment: str, name: str) -> tuple[str, TrainSettings, pd.DataFrame, pd.DataFrame]:
    """A finished scan's parent run id, train config, scan table and grid table (from its MLflow artifacts)."""
    exp = tracking.experiment_id(uri, experiment)
    if exp is None:
        raise ValueError(f"--experiment {experiment!r} does not exist in {uri}")
    parents = tracking.runs(uri, exp, role=SCAN_ROLE, tags={M.SCAN_TAG: name})
    if parents.empty:
        raise ValueError(f"--scan {name!r}: no such scan in experiment {experiment!r}")
    run_id = parents.sort_values("start_time", ascending=False)["run_id"].iloc[0]
    try:
        table = pd.read_csv(io.StringIO(tracking.download_text(uri, run_id, "scan.csv")))
        grid = pd.read_csv(io.StringIO(tracking.download_text(uri, run_id, "grid.csv")))
    except Exception:
        raise ValueError(
            f"--scan {name!r} has no scan.csv: it did not finish (run it again with the same --name)"
        ) from None
    return run_id, run_train_config(uri, run_id, f"scan {name} config.yaml"), table, grid


PICK_RULE = "earliest-within=<points> or earliest-not-worse[=<points>]"


def check_scan_pick(pick: str) -> float:
    """The points of a scan's --pick rule (0 for a bare earliest-not-worse), or a one-line error."""
    rule, _, value = pick.partition("=")
    if rule not in ("earliest-within", "earliest-not-worse") or (rule == "earliest-within" and not value):
        raise ValueError(f"--pick {pick!r} is invalid with --scan: {PICK_RULE}")
    try:
        points = float(value or 0)
    except ValueError:
        raise ValueError(f"--pick {pick!r}: give points of accuracy, e.g. {rule}=0.5") from None
    if not points >= 0:
        raise ValueError(f"--pick {pick!r}: the points must be >= 0")
    return points


def pick_switch_epoch(table: pd.DataFrame, pick: str, hits: dict[int, Any] | None = None, alpha: float = 0.05) -> int:
    """The earliest scanned switch close enough to the trunk.

    `earliest-within=X`: its final val_acc is within X percentage points of the trunk's. `earliest-not-worse[=X]`:
    its accuracy is not significantly below the trunk's by more than X points (paired on the images:
    significance.paired_difference; X = 0: the scan table's verdict is not `worse`). `hits`: each switch epoch's
    val_correct.npy (-1: the trunk's), needed for X > 0.
    """
    points = check_scan_pick(pick)
    points_rows = table[table["switch_epoch"] >= 0]
    if pick.startswith("earliest-not-worse"):
        if points == 0 and "verdict" in table and points_rows["verdict"].fillna("").astype(str).ne("").any():
            ok = points_rows[points_rows["verdict"].isin(["indistinguishable", "better"])]
        elif hits and -1 in hits:
            ok = points_rows[
                [
                    int(e) in hits and paired_difference(hits[int(e)], hits[-1], alpha)[2] >= -points / 100
                    for e in points_rows["switch_epoch"]
                ]
            ]
        else:
            raise ValueError(
                f"--pick {pick!r} needs the points' val_correct.npy, which this scan did not log (it predates it): "
                "use earliest-within=POINTS"
            )
        if ok.empty:
            raise ValueError(f"--pick {pick!r}: every scanned switch epoch is significantly worse than the trunk")
        return int(ok["switch_epoch"].min())
    trunk_acc = float(table.loc[table["switch_epoch"] < 0, M.FINAL_VAL_ACC].iloc[0])
    ok = points_rows[points_rows[M.FINAL_VAL_ACC] >= trunk_acc - points / 100 - 1e-12]
    if ok.empty:
        raise ValueError(
            f"--pick {pick!r}: no scanned switch epoch is within {points} points of the trunk's accuracy "
            f"{trunk_acc:.4f}"
        )
    return int(ok["switch_epoch"].min())


def export_scan_config(
    uri: str, experiment: str, name: str, *, switch_epoch: int | None, pick: str | None, out: str | Path
) -> tuple[int, str, TrainSettings]:
    """Write a train config that switches at the chosen epoch: a grid setting's thresholds when one lands there,
    else `prelora.switch_at_epoch`. Returns (the epoch, how it switches there, the config)."""
    if (switch_epoch is None) == (pick is None):
        raise ValueError("with --scan give --switch-epoch E or --pick earliest-within=POINTS")
    if pick is not None:
        check_scan_pick(pick)
    parent, cfg, table, grid = load_scan(uri, experiment, name)
    hits: dict[int, Any] = {}
    if pick is not None and pick.startswith("earliest-not-worse="):
        runs = tracking.runs(uri, tracking.experiment_id(uri, experiment), parent=parent)
        by_run = run_hits(uri, runs)
        hits = {e: by_run[r] for e, r in point_run_ids(runs).items() if r in by_run}
    alpha = float(tracking.run_params(uri, parent).get("alpha", 0.05)) if pick is not None else 0.05
    epoch = switch_epoch if switch_epoch is not None else pick_switch_epoch(table, pick, hits, alpha)
    landing = grid[grid["switch_epoch"] == epoch]
    if len(landing):
        g = landing.iloc[0]
        setting = S.GridSetting(
            name=str(g["setting"]), tau=float(g["tau"]), zeta=float(g["zeta"]), k=int(g["k"]), m=int(g["m"])
        )
        out_cfg, how = (
            setting.config(cfg),
            f"grid setting {setting.name} (tau={setting.tau:g}, zeta={setting.zeta:g}, k={setting.k}, m={setting.m}) "
            "lands there",
        )
    else:
        out_cfg, how = (
            cfg.replace(**{"prelora.switch_at_epoch": epoch}),
            "prelora.switch_at_epoch (no grid setting lands there)",
        )
    row = table[table["switch_epoch"] == epoch]
    measured = (
        f"final_val_acc {float(row[M.FINAL_VAL_ACC].iloc[0]):.4f}, "
        f"mean_epoch_time_s {float(row[M.MEAN_EPOCH_TIME_S].iloc[0]):.4f}"
        if len(row)
        else "not a scanned point"
    )
    if len(row) and "acc_lo" in row and pd.notna(row["acc_lo"].iloc[0]):
        r = row.iloc[0]
        measured += (
            f"\n# final_val_acc interval [{r['acc_lo']:.4f}, {r['acc_hi']:.4f}] over {int(r[M.VAL_N])} images; "
            f"against the trunk: p {r['p_vs_baseline']:.3g}, {r['verdict']}"
        )
    header = f"# prelora-ray best --scan {name}: switch at epoch {epoch} via {how}\n# scan point: {measured}\n"
    write_train_config(out, header, out_cfg)
    return epoch, how, out_cfg
