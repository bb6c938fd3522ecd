"""The sweep driver's side of Ray Tune, shared by `prelora-ray tune` and `prelora-ray scan`: the parent MLflow run,
Ray, the trunk (or the baseline) running ahead, Ray Tune's RunConfig, a Tuner started or restored, and the end of
the run (the baseline waited for, lost trials ended, the study reconciled, the parent ended)."""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

from prelora_ray import tracking
from prelora_ray.orchestration.console import SweepConsole, TrunkProgress, objectives_text
from prelora_ray.orchestration.ray_compat import restored_run_config
from prelora_ray.orchestration.study import mark_lost_trials, reconcile_study
from prelora_ray.orchestration.sweep import (
    Sweep,
    baseline_task,
    quiet_libraries,
    run_one,
    trials_could_starve_the_trunk,
)
from prelora_ray.orchestration.train import init_ray
from prelora_ray.orchestration.trunk import baseline_done, start_trunk, wait_for_trunk_start

log = logging.getLogger("prelora_ray")


@dataclass(kw_only=True)
class DriverRun:
    """One invocation of a sweep's driver: what runs beside Ray Tune, and since when."""

    sweep: Sweep
    started: float = field(default_factory=time.perf_counter)
    baseline_ref: Any = None  # the trunk's or baseline's Ray task, if this driver started one
    progress: TrunkProgress | None = None  # the trunk's progress lines

    @property
    def wall_s(self) -> float:
        """Seconds since the driver started its sweep."""
        return time.perf_counter() - self.started


def start(
    sweep: Sweep, *, params: dict[str, Any], tags: dict[str, str], address: str | None, concurrent: int, baseline: bool
) -> DriverRun:
    """Open the parent run (or reopen it: same name), start or join Ray, start the trunk (fork mode) or the baseline.

    `concurrent`: how many trials may wait at once (fork mode with trial_executor tune: if they and the trunk cannot
    all be placed, the trunk's workers are placed first). `baseline`: a non-fork sweep runs its baseline too."""
    sweep.parent_run_id = tracking.start_run(
        sweep.tracking_uri, sweep.experiment_id, sweep.name, params=params, tags=tags
    )
    init_ray(address, verbose=sweep.verbose)
    run = DriverRun(sweep=sweep)
    space = sweep.space
    if space.fork:  # the baseline is the trunk every trial forks from: it always runs, ahead of them
        run.baseline_ref = start_trunk(sweep)
        if run.baseline_ref is not None:
            run.progress = TrunkProgress(sweep).start()
            if trials_could_starve_the_trunk(space, concurrent):
                # its trials hold their CPUs while they wait for it: its workers must be placed first, or
                # the waiting trials could take every CPU and wait for a trunk that never starts
                wait_for_trunk_start(sweep)
    elif baseline and not baseline_done(sweep):
        full = space.base.replace(strategy="full")
        run.baseline_ref = baseline_task(space, run_one).remote(
            sweep, full, f"{sweep.name}_baseline", "baseline", {}, False
        )
    quiet_libraries(sweep.verbose)
    return run


def run_config(sweep: Sweep, callbacks: list[Any]) -> Any:
    """Ray Tune's RunConfig of the sweep: its storage (the same filesystem as everything else), retries, console."""
    from ray import tune

    ray_path, ray_fs = sweep.storage.ray_storage()
    cluster = sweep.space.base.cluster
    return tune.RunConfig(
        name=sweep.name,
        storage_path=ray_path,
        storage_filesystem=ray_fs,
        # a trial's driver lost with its node is retried (same name: its TorchTrainer resumes from
        # its checkpoint, its MLflow run is reused) as often as its workers may be
        failure_config=tune.FailureConfig(max_failures=cluster.max_failures, fail_fast=False),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=cluster.checkpoints_to_keep),  # trial_executor tune
        callbacks=callbacks,
        verbose=1 if sweep.verbose else 0,  # Tune's status and result tables: --verbose
    )


def has_tune_state(sweep: Sweep) -> bool:
    """Ray Tune saved a snapshot of the sweep's trials (a driver that died before its first one left none)."""
    return any(c.name.startswith("experiment_state-") for c in sweep.folder.children())


def restore(sweep: Sweep, trainable: Any, callbacks: list[Any]) -> Any:
    """Ray Tune's Tuner of an interrupted sweep, with this driver's console; the trials the dead driver had begun after
    Tune's last snapshot are marked lost now (their Optuna trials FAIL), so that the study counts only what will finish
    and Tune starts trials in their place (optuna_search.TaggedOptunaSearch's max_trials)."""
    from ray import tune

    _, ray_fs = sweep.storage.ray_storage()
    # in fork mode, trials that failed because the trunk did are tried again with the resumed trunk
    tuner = tune.Tuner.restore(
        sweep.folder.path,
        trainable=trainable,
        resume_unfinished=True,
        resume_errored=sweep.space.fork,
        storage_filesystem=ray_fs,
    )
    mark_lost_trials(sweep, {run_name(r) for r in tuner.get_results() if r.path}, at_end=False)
    config = restored_run_config(tuner)  # the restored RunConfig is the pickled one: give it this run's console
    if config is not None:
        config.verbose = 1 if sweep.verbose else 0
        config.callbacks = [c for c in config.callbacks or [] if not isinstance(c, SweepConsole)] + list(callbacks)
    return tuner


def run_name(result: Any) -> str:
    """The MLflow run name of a Ray Tune result: its trial folder's name."""
    return posixpath.basename(result.path.rstrip("/"))


def finish(run: DriverRun, results: Any) -> None:
    """Wait for the baseline, stop the progress lines, end lost trials' runs and reconcile the study."""
    sweep = run.sweep
    if run.baseline_ref is not None:
        import ray

        try:
            baseline = ray.get(run.baseline_ref)
        except Exception as exc:  # the baseline failed: the sweep's trials still count
            log.warning("the full-training baseline failed: %s", exc)
        else:
            if run.progress is None:  # in fork mode, the trunk's progress said it
                metrics = [o.metric for o in sweep.space.objectives]
                log.info("baseline %s_baseline: finished: %s", sweep.name, objectives_text(baseline, metrics))
    if run.progress is not None:
        run.progress.stop()
    mark_lost_trials(sweep, {run_name(r) for r in results if r.path})
    reconcile_study(sweep)
