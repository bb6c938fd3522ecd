"""A trial of a fork-mode sweep on Ray: it waits for, forks from or reuses the trunk (orchestration/trunk.py).

A trial's driver (a Tune function trainable) replays Algorithm 1 on the trunk's history, waits until the trunk
has the checkpoint it needs, then trains from it (in its own process, or with a TorchTrainer). Twins (the same
switch, ranks and post-switch settings) train once: the first claims the result, the others reuse it. The
records live on storage every node sees (a bucket, or a shared mount: `prelora_ray.storage`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prelora_ray import fork, tracking
from prelora_ray import metrics as M
from prelora_ray.config import TrainSettings
from prelora_ray.orchestration.ray_hooks import apply_console
from prelora_ray.orchestration.repeats import (
    baseline_repeat_key,
    finished_run,
    prepare_repeat,
    repeat_name,
    with_mean,
)
from prelora_ray.orchestration.sweep import Sweep, final_report, fit_sweep_run
from prelora_ray.orchestration.train import PreparedRun, end_run, log_summary, prepare_run
from prelora_ray.orchestration.trunk import POLL_S, TrunkFailed, trunk_dir
from prelora_ray.orchestration.worker_spec import ForkFrom
from prelora_ray.significance import repeat_seed

log = logging.getLogger("prelora_ray")
PROGRESS_EVERY_S = 30.0
CLAIM_BEAT_S = 10.0  # how often a trial that trains a result renews its claim
CLAIM_STALE_S = 90.0  # a claim unchanged this long (nine beats missed): its owner died without a word


def claim_or_wait(
    registry: fork.ResultRegistry,
    key: str,
    owner: str,
    *,
    stale_s: float = CLAIM_STALE_S,
    poll_s: float = POLL_S,
) -> dict[str, Any] | None:
    """None: `owner` trains the key (a new claim, its own from before a restart, or one taken over from a twin that
    stopped beating). Else the finished twin's record, waited for rather than trained twice."""
    seen, since = None, time.monotonic()
    while (holder := registry.claim(key, owner)) is not None:
        if holder.get("state") == "finished":
            return holder
        if holder != seen:  # the twin beat (or the key changed hands): it lives
            seen, since = holder, time.monotonic()
        elif time.monotonic() - since > stale_s:  # measured on this clock only: no skew between nodes
            log.warning(
                "trial %s: its twin %s claimed the same result and has not been heard from for %.0f s; "
                "training it here",
                owner,
                holder.get("owner"),
                stale_s,
            )
            registry.take_over(key, owner)
            return None
        time.sleep(poll_s)
    return None


@contextlib.contextmanager
def claim_heartbeat(
    registry: fork.ResultRegistry, key: str, owner: str, *, every_s: float = CLAIM_BEAT_S
) -> Iterator[None]:
    """While the owner trains, a thread renews its claim every `every_s`, so twins waiting on it know it lives."""
    stop = threading.Event()

    def beat() -> None:
        count = 0
        while not stop.wait(every_s):
            count += 1
            try:
                registry.beat(key, owner, count)
            except (
                Exception
            ) as exc:  # storage hiccup: the next beat may get through; a waiter allows for several misses
                log.warning("trial %s: could not renew its claim (%s)", owner, type(exc).__name__)

    thread = threading.Thread(target=beat, name="claim-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def wait_for_plan(sweep: Sweep, cfg: TrainSettings, run_name: str) -> fork.ForkPlan:
    """Poll the trunk until the trial's switch epoch and its checkpoint are known (or the trunk failed)."""
    folder = trunk_dir(sweep)
    last_note = time.monotonic()
    while True:
        status = fork.read_status(folder)  # before the plan: a trunk finished by then has written all its history
        plan = fork.plan_fork(cfg, folder)
        if plan is not None:
            return plan
        if status.get("state") == "failed":
            raise TrunkFailed(
                f"the trunk {sweep.name}_baseline failed, so {run_name} cannot fork: {status.get('error')}"
            )
        if status.get("state") == "finished":
            raise TrunkFailed(f"the trunk {sweep.name}_baseline finished but its history in {folder} is incomplete")
        if (
            sweep.verbose and time.monotonic() - last_note > PROGRESS_EVERY_S
        ):  # else the driver shows the trunk's progress
            log.info("%s waits for the trunk (epoch %d/%d)", run_name, len(fork.read_history(folder)), cfg.epochs)
            last_note = time.monotonic()
        time.sleep(POLL_S)


def _prepare(sweep: Sweep, cfg: TrainSettings, run_name: str, tags: dict[str, str]) -> PreparedRun:
    return prepare_run(
        sweep.run_config(cfg, run_name),
        parent_run_id=sweep.parent_run_id,
        extra_tags={M.ROLE_TAG: "trial", M.SWEEP_TAG: sweep.name, **tags},
    )


def _copy_once(run: PreparedRun, copy: Callable[[], None]) -> None:
    """Copy curves into the trial's run once: a resumed or retried trial does not copy them again."""
    if tracking.run_tags(run.tracking_uri, run.mlflow_run_id).get(M.FORK_COPIED_TAG) == "true":
        return
    copy()
    tracking.set_tags(run.tracking_uri, run.mlflow_run_id, {M.FORK_COPIED_TAG: "true"})


def _copy_trunk_epochs(run: PreparedRun, history: list[dict[str, Any]]) -> None:
    """The trunk's per-epoch metrics in the trial's run."""
    _copy_once(run, lambda: tracking.log_history(run.tracking_uri, run.mlflow_run_id, history))


def _set_tags(run: PreparedRun, tags: dict[str, str]) -> None:
    tracking.set_tags(run.tracking_uri, run.mlflow_run_id, tags)


def fork_trial(sweep: Sweep, cfg: TrainSettings, run_name: str, tags: dict[str, str]) -> dict[str, Any]:
    """One trial of a fork-mode sweep: never switches (the trunk's result), reuses a twin's, or forks and trains.

    Its MLflow run exists from the start, so a trial waiting for the trunk shows (RUNNING), and one
    whose trunk failed ends FAILED with the trunk's error. With `repeats: N` (N > 1) the trial then trains its
    repeats 1..N-1 (orchestration/repeats.py) and returns their mean accuracy.
    """
    run, plan, history, summary = _fork_trial(sweep, cfg, run_name, tags)
    if sweep.space.repeats <= 1:
        return summary
    return trial_repeats(sweep, cfg, run, plan, history, summary)


def _fork_trial(
    sweep: Sweep, cfg: TrainSettings, run_name: str, tags: dict[str, str]
) -> tuple[PreparedRun, fork.ForkPlan, list[dict[str, Any]], dict[str, Any]]:
    """The trial's own run (repeat 0): its MLflow run, its plan, the trunk's history and its summary."""
    folder = trunk_dir(sweep)
    run = _prepare(sweep, cfg, run_name, tags)
    try:
        plan = wait_for_plan(sweep, cfg, run_name)
    except BaseException as exc:
        end_run(run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    history = fork.read_history(folder)
    set_fork_tags(run, plan, fork.read_status(folder).get("run_id", ""))
    if plan.never:
        return run, plan, history, _never(run, cfg, run_name, history, plan.why)
    if plan.mode == "scratch":  # shares no epochs with the trunk: the trial trains whole
        log.info("trial %s: trains from scratch (%s)", run_name, plan.why)
        _set_tags(run, {M.FORK_EPOCH_TAG: "0"})
        return run, plan, history, fit_sweep_run(sweep, run, in_trial=True, tune_callback=True)
    return run, plan, history, train_fork(sweep, cfg, run, plan, history)


def set_fork_tags(run: PreparedRun, plan: fork.ForkPlan, trunk_run_id: str) -> None:
    """The trunk's run and the replayed switch epoch ("never": the trial takes the trunk's result) on the run."""
    switch_tag = "never" if plan.never else str(plan.switch.epoch) if plan.switch is not None else None
    _set_tags(run, {M.FORK_TRUNK_RUN_TAG: trunk_run_id, **({M.FORK_SWITCH_TAG: switch_tag} if switch_tag else {})})


def train_fork(
    sweep: Sweep,
    cfg: TrainSettings,
    run: PreparedRun,
    plan: fork.ForkPlan,
    history: list[dict[str, Any]],
    *,
    in_trial: bool = True,
    reseed: bool = False,
) -> dict[str, Any]:
    """Reuse a finished twin's result (same reuse key), or train `run` from the trunk's checkpoint of `plan`.

    `in_trial`: the trial's own run (reports and checkpoints to its Tune trial under `trial_executor: tune`); a
    repeat is not (its checkpoints are its own folder's). `reseed`: a repeat's RNGs restart from its seed at the fork.
    """
    folder = trunk_dir(sweep)
    key = fork.reuse_key(cfg, plan.switch)
    registry = fork.ResultRegistry(folder / "results")
    _set_tags(run, {M.FORK_EPOCH_TAG: str(plan.fork_epoch)})
    twin = claim_or_wait(registry, key, run.name)
    if twin is not None:
        return _reuse(run, run.name, twin)
    if plan.switch is not None:
        log.info(
            "trial %s: forked from the trunk at epoch %d (its switch epoch %d, replayed on the trunk's history)",
            run.name,
            plan.fork_epoch,
            plan.switch.epoch,
        )
    else:
        log.info(
            "trial %s (%s): forked from the trunk at epoch %d (full training before it is the trunk's)",
            run.name,
            cfg.strategy,
            plan.fork_epoch,
        )
    try:
        copied = history[: plan.fork_epoch]
        if plan.switch is not None:
            copied = switch_marked(copied, plan.switch.epoch, cfg.prelora.warmup)
        _copy_trunk_epochs(run, with_event_defaults(copied, cfg))
        start = ForkFrom(folder=folder.uri, checkpoint=plan.checkpoint, epoch=plan.fork_epoch, reseed=reseed)
        with claim_heartbeat(registry, key, run.name):
            summary = fit_sweep_run(sweep, run, in_trial=in_trial, tune_callback=in_trial, start=start)
    except BaseException as exc:
        registry.fail(key, run.name, f"{type(exc).__name__}: {exc}")
        raise

    registry.finish(key, run.name, run_id=run.mlflow_run_id, report=final_report(summary))
    return summary


def trial_repeats(
    sweep: Sweep,
    cfg: TrainSettings,
    run: PreparedRun,
    plan: fork.ForkPlan,
    history: list[dict[str, Any]],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Train (or find) the trial's repeats 1..N-1 after its own run; returns its summary with the mean accuracy."""
    accuracies = [float(summary.get(M.FINAL_VAL_ACC, math.nan))]
    for repeat in range(1, sweep.space.repeats):
        apply_console(sweep.verbose)  # a run trained in this process leaves its own console settings
        cfg_r = cfg.replace(seed=repeat_seed(cfg.seed, repeat))
        name = repeat_name(run.name, repeat)
        done = finished_run(sweep, name)
        if done is not None:
            log.info("trial %s: repeat %d (seed %d) finished before; not trained again", run.name, repeat, cfg_r.seed)
            accuracies.append(float(done.get(M.FINAL_VAL_ACC, math.nan)))
            continue
        rep = prepare_repeat(sweep, cfg_r, name, run, repeat)
        set_fork_tags(rep, plan, fork.read_status(trunk_dir(sweep)).get("run_id", ""))
        log.info("trial %s: repeat %d of %d (seed %d)", run.name, repeat, sweep.space.repeats - 1, cfg_r.seed)
        try:
            if plan.never:  # the trial is the trunk: its repeats are the baseline's
                result = _reuse(rep, name, wait_for_baseline_repeat(sweep, repeat))
            elif plan.mode == "scratch":
                tracking.set_tags(rep.tracking_uri, rep.mlflow_run_id, {M.FORK_EPOCH_TAG: "0"})
                result = fit_sweep_run(sweep, rep, in_trial=False, tune_callback=False)
            else:
                result = train_fork(sweep, cfg_r, rep, plan, history, in_trial=False, reseed=True)
        except BaseException as exc:  # the trial fails with it (its own run stays FINISHED); --resume retries it
            end_run(rep, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", f"{type(exc).__name__}: {exc}")
            raise
        accuracies.append(float(result.get(M.FINAL_VAL_ACC, math.nan)))
    return with_mean(sweep, run, summary, accuracies)


def wait_for_baseline_repeat(sweep: Sweep, repeat: int) -> dict[str, Any]:
    """The baseline's repeat `repeat` once the trunk's task has trained it (its registry record), or TrunkFailed."""
    registry = fork.ResultRegistry(trunk_dir(sweep) / "results")
    while True:
        record = registry.read(baseline_repeat_key(repeat))
        if record is not None and record.get("state") == "finished":
            return record
        if record is not None and record.get("state") == "failed":
            raise TrunkFailed(f"the baseline's repeat {repeat} failed: {record.get('error')}")
        if fork.read_status(trunk_dir(sweep)).get("state") == "failed":
            raise TrunkFailed(f"the trunk {sweep.name}_baseline failed before its repeat {repeat}")
        time.sleep(POLL_S)


def with_event_defaults(history: list[dict[str, Any]], cfg: TrainSettings) -> list[dict[str, Any]]:
    """The trunk's records with the trial's strategy's event metrics (e.g. relora_merges = 0) where the trunk has none,
    as a run of the trial's strategy logs them for its full-training epochs."""
    from prelora_ray.strategies import build

    defaults = build(cfg).event_metrics()
    return [{**defaults, **record} for record in history]


def switch_marked(history: list[dict[str, Any]], switch_epoch: int, warmup: int) -> list[dict[str, Any]]:
    """The trunk's records as the trial's own.

    The record of its switch epoch carries the switch (and a w = 0 freeze).
    """
    out = [dict(h) for h in history]
    for record in out:
        if int(record[M.EPOCH]) == switch_epoch:
            record[M.SWITCH_EPOCH] = switch_epoch
            record[M.FREEZE_EPOCH] = switch_epoch if warmup == 0 else -1
    return out


def _never(
    run: PreparedRun, cfg: TrainSettings, run_name: str, history: list[dict[str, Any]], why: str
) -> dict[str, Any]:
    """The trial is the trunk (the test never passes on it, or a `full` trial): it trains nothing."""
    log.info("trial %s: %s; its result is the trunk's (0 epochs trained)", run_name, why)
    _set_tags(run, {M.FORK_EPOCH_TAG: str(cfg.epochs)})
    _copy_trunk_epochs(run, history)
    summary = {**fork.summarize(history), "history": history, "epochs_trained": 0}
    log_summary(run, summary)
    end_run(run, "FINISHED")
    return summary


def copy_val_correct(run: PreparedRun, source_run_id: str) -> None:
    """The twin's val_correct.npy in the trial's run (a twin logged before per-image correctness has none)."""
    with tempfile.TemporaryDirectory(prefix="prelora-") as folder:
        try:
            path = tracking.download_artifact(run.tracking_uri, source_run_id, M.VAL_CORRECT_ARTIFACT, folder)
        except Exception:  # none to copy: the twin predates per-image correctness, or MLflow is unreachable
            log.warning("%s: run %s has no %s to copy", run.name, source_run_id, M.VAL_CORRECT_ARTIFACT)
            return
        tracking.log_file(run.tracking_uri, run.mlflow_run_id, path)


def _reuse(run: PreparedRun, run_name: str, holder: dict[str, Any]) -> dict[str, Any]:
    """Same switch epoch, ranks and post-switch config as a finished trial: its result, nothing trained."""
    log.info(
        "trial %s: same switch epoch (%s), ranks and settings as %s; reusing its result (0 epochs trained)",
        run_name,
        holder.get("report", {}).get(M.SWITCH_EPOCH, "?"),
        holder.get("owner"),
    )
    _set_tags(run, {M.FORK_REUSED_TAG: holder["run_id"], M.EPOCHS_TRAINED_TAG: "0"})
    _copy_once(run, lambda: tracking.copy_metrics(run.tracking_uri, holder["run_id"], run.mlflow_run_id))
    try:
        text = tracking.download_text(run.tracking_uri, holder["run_id"], "ranks.json")
        tracking.log_text(run.tracking_uri, run.mlflow_run_id, text, "ranks.json")
    except Exception:  # the twin's artifact is missing: the metrics still say it all
        log.warning("%s: could not copy ranks.json from run %s", run_name, holder["run_id"])
    copy_val_correct(run, holder["run_id"])
    end_run(run, "FINISHED")
    return {**holder["report"], "epochs_trained": 0}
