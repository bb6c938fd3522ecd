"""Repeats (`repeats: N` in a sweep file, `prelora-ray scan --repeats N`): each forked segment trained with N seeds.

The binomial interval of one run covers the test-sample noise (which images the validation set holds), not the
training noise (which batches, augmentations and adapter inits a run drew). A repeat measures the second: repeat r
(1..N-1) of a trial is the trial's config with `seed` = seed_r = seed + r * 1000003 (`significance.repeat_seed`),
forked from the same trunk checkpoint as the trial (same weights, optimizer state and switch), with its RNGs
restarted from seed_r at the fork (`ForkFrom.reseed`): its data order (the DistributedSampler's seed), augmentation,
dropout and its adapters' initial A are its own. Repeat 0 is the trial's own run, unchanged. The baseline is repeated
the same way: its repeat r is full training forked from the trunk's checkpoint at `fork.repeat_fork_epoch` with
seed_r, trained after the trunk in the trunk's own Ray task, so a trial's repeat r and the baseline's share their
seed (paired per seed: `significance.compare_repeated`).

Each repeat is an MLflow run nested under the run it repeats (`<run>_rep<r>`, role `repeat`, tags `prelora.repeat`,
`prelora.repeat_seed`, `prelora.repeat_of`). A repeat goes through the same result registry as trials (its reuse key
holds its seed), so twin trials train each repeat once; a finished repeat is never trained again (a resumed trial
finds its FINISHED run by name). A trial whose result is the trunk's (it never switches, a `full` trial) takes the
baseline's repeats. Optuna sees the mean of the N final accuracies.

This module holds the repeats' runs and the baseline's side (called by orchestration/trunk.py); a trial's side is
`forking.trial_repeats`.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

from prelora_ray import fork, tracking
from prelora_ray import metrics as M
from prelora_ray.config import TrainSettings
from prelora_ray.orchestration.ray_hooks import apply_console
from prelora_ray.orchestration.sweep import Sweep, final_report, fit_sweep_run
from prelora_ray.orchestration.train import PreparedRun, prepare_run
from prelora_ray.orchestration.worker_spec import ForkFrom
from prelora_ray.significance import repeat_seed
from prelora_ray.storage import Location

log = logging.getLogger("prelora_ray")


def repeat_name(run_name: str, repeat: int) -> str:
    """The MLflow run (and storage) name of a run's repeat `repeat` (>= 1)."""
    return f"{run_name}_rep{repeat}"


def baseline_repeat_key(repeat: int) -> str:
    """The result registry's key of the baseline's repeat `repeat` (trials that take the trunk's result wait on it)."""
    return f"baseline-rep{repeat}"


def finished_run(sweep: Sweep, name: str) -> dict[str, Any] | None:
    """The metrics of the FINISHED run `name` (a repeat trained before a resume), or None."""
    run_id = tracking.find_run(sweep.tracking_uri, sweep.experiment_id, name, status="FINISHED")
    if run_id is None:
        return None
    return {**tracking.run_metrics(sweep.tracking_uri, run_id), "run_id": run_id}


def prepare_repeat(sweep: Sweep, cfg: TrainSettings, name: str, of: PreparedRun, repeat: int) -> PreparedRun:
    """The repeat's MLflow run, nested under the run it repeats."""
    return prepare_run(
        sweep.run_config(cfg, name),
        parent_run_id=of.mlflow_run_id,
        extra_tags={
            M.ROLE_TAG: "repeat",
            M.SWEEP_TAG: sweep.name,
            M.REPEAT_TAG: str(repeat),
            M.REPEAT_SEED_TAG: str(cfg.seed),
            M.REPEAT_OF_TAG: of.mlflow_run_id or "",
        },
    )


def with_mean(sweep: Sweep, run: PreparedRun, summary: dict[str, Any], accuracies: list[float]) -> dict[str, Any]:
    """The summary Optuna sees: `final_val_acc` the mean over the repeats (`val_acc_sd` their spread, `repeats` N);
    the run it repeats gets them as the metrics val_acc_mean, val_acc_sd and repeats, and the tag prelora.repeats."""
    mean = statistics.fmean(accuracies)
    sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    numbers = {M.VAL_ACC_MEAN: mean, M.VAL_ACC_SD: sd, M.REPEATS: float(len(accuracies))}
    if run.mlflow_run_id:
        tracking.log_metrics(run.tracking_uri, run.mlflow_run_id, numbers, step=run.cfg.epochs)
        tracking.set_tags(run.tracking_uri, run.mlflow_run_id, {M.REPEATS_TAG: str(len(accuracies))})
    return {**summary, M.FINAL_VAL_ACC: mean, M.VAL_ACC_SD: sd, M.REPEATS: len(accuracies)}


def baseline_repeats_done(sweep: Sweep) -> bool:
    """Every repeat of the baseline has a FINISHED run (true when the sweep has no repeats)."""
    return all(
        tracking.find_run(
            sweep.tracking_uri, sweep.experiment_id, repeat_name(f"{sweep.name}_baseline", r), status="FINISHED"
        )
        is not None
        for r in range(1, sweep.space.repeats)
    )


def baseline_repeats(sweep: Sweep, baseline_run_id: str, folder: Location, cfg: TrainSettings) -> None:
    """In the trunk's task, after the trunk (its records in `folder`, its config `cfg`): the baseline's repeats 1..N-1,
    full training forked from the trunk's checkpoint at `fork.repeat_fork_epoch` with seed_r, each recorded in the
    result registry for the trials that take the trunk's result (orchestration/forking.py waits on it)."""
    epoch = fork.repeat_fork_epoch(cfg, sweep.space.fork_every)
    history = fork.read_history(folder)
    registry = fork.ResultRegistry(folder / "results")
    name0 = f"{sweep.name}_baseline"
    of = PreparedRun(cfg=cfg, name=name0, tracking_uri=sweep.tracking_uri, mlflow_run_id=baseline_run_id)
    accuracies = [float(history[-1][M.VAL_ACC])] if history else [math.nan]
    for repeat in range(1, sweep.space.repeats):
        apply_console(sweep.verbose)
        cfg_r = cfg.replace(seed=repeat_seed(cfg.seed, repeat))
        name = repeat_name(name0, repeat)
        key = baseline_repeat_key(repeat)
        done = finished_run(sweep, name)
        if done is not None:
            log.info("baseline %s: repeat %d (seed %d) finished before; not trained again", name0, repeat, cfg_r.seed)
            accuracies.append(float(done.get(M.FINAL_VAL_ACC, math.nan)))
            if (registry.read(key) or {}).get("state") != "finished":
                registry.finish(key, name, run_id=done.pop("run_id"), report=done)
            continue
        rep = prepare_repeat(sweep, cfg_r, name, of, repeat)
        log.info("baseline %s: repeat %d (seed %d) forked from the trunk at epoch %d", name0, repeat, cfg_r.seed, epoch)
        tracking.set_tags(
            rep.tracking_uri,
            rep.mlflow_run_id,
            {M.FORK_TRUNK_RUN_TAG: baseline_run_id, M.FORK_EPOCH_TAG: str(epoch)},
        )
        try:
            if tracking.run_tags(rep.tracking_uri, rep.mlflow_run_id).get(M.FORK_COPIED_TAG) != "true":
                tracking.log_history(rep.tracking_uri, rep.mlflow_run_id, history[:epoch])
                tracking.set_tags(rep.tracking_uri, rep.mlflow_run_id, {M.FORK_COPIED_TAG: "true"})
            start = ForkFrom(
                folder=folder.uri, checkpoint=fork.checkpoint_path(folder, epoch).uri, epoch=epoch, reseed=True
            )
            summary = fit_sweep_run(sweep, rep, in_trial=False, tune_callback=False, start=start)
        except BaseException as exc:
            registry.fail(key, name, f"{type(exc).__name__}: {exc}")
            raise
        registry.finish(key, name, run_id=rep.mlflow_run_id, report=final_report(summary))
        accuracies.append(float(summary.get(M.FINAL_VAL_ACC, math.nan)))
    with_mean(sweep, of, {}, accuracies)
