"""The trunk of a fork-mode sweep or scan: the `full` baseline run ahead of the trials as a Ray task, its records
(history, checkpoints, status) written to `<storage>/<sweep>/trunk` through `prelora_ray.fork`, where every node's
trials read them."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prelora_ray import fork, tracking
from prelora_ray.config import MODULE_FAMILIES, TrainSettings
from prelora_ray.orchestration.ray_hooks import apply_console
from prelora_ray.orchestration.repeats import baseline_repeats, baseline_repeats_done
from prelora_ray.orchestration.sweep import Sweep, baseline_task, run_one
from prelora_ray.orchestration.train import PreparedRun
from prelora_ray.orchestration.worker_spec import TrunkRecords
from prelora_ray.storage import Location

log = logging.getLogger("prelora_ray")
POLL_S = 1.0  # how often a waiting trial or driver reads the trunk's records


class TrunkFailed(RuntimeError):
    """The trunk a trial waits for has failed: the trial fails with the trunk's error (`--resume` retries)."""


def trunk_dir(sweep: Sweep) -> Location:
    """Where the sweep's trunk keeps its history, checkpoints and status."""
    return sweep.folder / "trunk"


def trunk_config(base: TrainSettings) -> TrainSettings:
    """The trunk: the baseline (full training) with the norms of every module family recorded."""
    return base.replace(strategy="full", **{"prelora.modules": list(MODULE_FAMILIES)})


def baseline_done(sweep: Sweep) -> bool:
    """The sweep's baseline (its trunk in fork mode) has a FINISHED MLflow run."""
    name = f"{sweep.name}_baseline"
    return tracking.find_run(sweep.tracking_uri, sweep.experiment_id, name, status="FINISHED") is not None


def run_trunk(sweep: Sweep) -> dict[str, Any]:
    """The trunk's Ray task: run (or resume) it; its status file tells waiting trials when it fails. With `repeats: N`
    the task then trains the baseline's repeats (orchestration/repeats.py; a finished trunk is not trained again)."""
    apply_console(sweep.verbose)
    folder = trunk_dir(sweep)
    if sweep.space.repeats > 1 and baseline_done(sweep):
        summary: dict[str, Any] = {}
    else:
        summary = _train_trunk(sweep, folder)
    if sweep.space.repeats > 1:
        run_id = fork.read_status(folder).get("run_id") or tracking.find_run(
            sweep.tracking_uri, sweep.experiment_id, f"{sweep.name}_baseline", status="FINISHED"
        )
        try:
            baseline_repeats(sweep, run_id, folder, trunk_config(sweep.space.base))
        except Exception as exc:  # the trunk itself is fine: trials fork on; the table pairs what finished
            log.warning("sweep %s: a repeat of the baseline failed: %s: %s", sweep.name, type(exc).__name__, exc)
    return summary


def _train_trunk(sweep: Sweep, folder: Location) -> dict[str, Any]:
    fork.write_status(folder, "running")

    def started(run: PreparedRun) -> None:
        fork.write_status(folder, "running", run_id=run.mlflow_run_id)

    try:
        summary = run_one(
            sweep,
            trunk_config(sweep.space.base),
            f"{sweep.name}_baseline",
            "baseline",
            {"fork.trunk": "true"},
            False,
            start=TrunkRecords(folder=folder.uri, every=sweep.space.fork_every),
            on_prepared=started,
        )
    except BaseException as exc:
        mark_trunk_failed(folder, exc)
        raise
    fork.write_status(folder, "finished", run_id=fork.read_status(folder).get("run_id", ""))
    return summary


def mark_trunk_failed(folder: Location, exc: BaseException) -> None:
    """Record the trunk's failure unless it already is (the Ray task and the sweep driver both may)."""
    status = fork.read_status(folder)
    if status.get("state") != "failed":
        fork.write_status(folder, "failed", error=f"{type(exc).__name__}: {exc}", run_id=status.get("run_id", ""))


def start_trunk(sweep: Sweep) -> Any:
    """Start (or resume) the trunk as a Ray task, or None when it already finished; a watcher marks it failed if the
    task dies without a word."""
    import ray

    folder = trunk_dir(sweep)
    if baseline_done(sweep):
        status = fork.read_status(folder)
        if status.get("state") != "finished":
            fork.write_status(folder, "finished", run_id=status.get("run_id", ""))
        if sweep.space.repeats <= 1:
            return None
        if baseline_repeats_done(sweep):
            return None
    if not baseline_done(sweep):  # now, not when the task starts: a failed trunk's old status must not end a wait
        fork.write_status(folder, "running")
    ref = baseline_task(sweep.space, run_trunk).remote(sweep)

    def watch() -> None:
        try:
            ray.get(ref)
        except Exception as exc:  # the task's own handler may not have run (its process was killed)
            mark_trunk_failed(folder, exc)

    threading.Thread(target=watch, name="trunk-watcher", daemon=True).start()
    log.info(
        "sweep %s: fork mode, the trunk (%s_baseline) runs ahead of the trials; records in %s",
        sweep.name,
        sweep.name,
        folder,
    )
    return ref


def wait_for_trunk_start(sweep: Sweep) -> None:
    """Until the trunk has written an epoch (its workers hold their resources: a resumed trunk rewrites its
    history), finished, or failed."""
    folder = trunk_dir(sweep)
    history = folder / fork.HISTORY_FILE
    before = history.mtime_ns()
    while history.mtime_ns() == before and fork.read_status(folder).get("state") not in ("finished", "failed"):
        time.sleep(POLL_S)
