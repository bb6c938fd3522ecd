"""Sweeps: Ray Tune + Optuna over PreLoRA's hyperparameters, one TorchTrainer per trial, MLflow runs.

One parent MLflow run per sweep; one child per trial and one for the `full` baseline. The Optuna
study lives in its own storage (`optuna_storage`; by default sqlite beside the MLflow store), so
`--resume` continues a sweep (Tuner.restore) without repeating finished trials, also after the
driver died: a restored trial reuses its deterministic name, hence its checkpoints and MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from prelora_ray import metrics as M
from prelora_ray import storage, tracking
from prelora_ray.config import TrainSettings
from prelora_ray.front import format_front, sweep_table  # noqa: F401 (format_front re-exported for the CLI)
from prelora_ray.orchestration.console import SweepConsole, TrunkProgress, console_callback, objectives_text
from prelora_ray.orchestration.ray_hooks import apply_console
from prelora_ray.orchestration.train import PreparedRun, fit_in_trial, fit_run, init_ray, preflight, prepare_run
from prelora_ray.search_space import SearchSpace, check_optuna_storage
from prelora_ray.storage import Location, location
from prelora_ray.sweep_record import load_sweep
from prelora_ray.tracking import search_runs

log = logging.getLogger("prelora_ray")

ROLE_TAG, SWEEP_TAG, PARETO_TAG, SWITCH_PARAMS = M.ROLE_TAG, M.SWEEP_TAG, M.PARETO_TAG, M.SWITCH_PARAMS


@dataclass(kw_only=True)
class Sweep:
    """Where a sweep lives: its space, names, storage and MLflow parent run."""

    space: SearchSpace
    name: str
    experiment: str
    tracking_uri: str
    storage_path: str  # a local path or a bucket's URI (prelora_ray.storage)
    parent_run_id: str = ""
    experiment_id: str = ""
    verbose: bool = False  # Tune's tables, every run's line per epoch, Ray Train's dumps (`--verbose`)
    optuna_storage: str | None = None  # --optuna-storage, else the file's optuna_storage, else `optuna_url`'s default

    @property
    def storage(self) -> Location:
        """The sweep's storage root (the sweep's records are under `<storage>/<name>`)."""
        return location(self.storage_path)

    @property
    def optuna_url(self) -> str:
        """Where the Optuna study lives: as given, else a sqlite file beside the MLflow sqlite store, else in a local
        storage path, else (a bucket and a tracking server) in the driver's working directory."""
        if self.optuna_storage or self.space.optuna_storage:
            return self.optuna_storage or self.space.optuna_storage
        db = tracking.sqlite_path(self.tracking_uri)
        if db is not None:
            return f"sqlite:///{db.parent / 'optuna.db'}"
        if self.storage.is_local:
            return f"sqlite:///{self.storage.local / 'optuna.db'}"
        return f"sqlite:///{Path.cwd().resolve() / 'optuna.db'}"

    def run_config(self, cfg: TrainSettings, run_name: str) -> TrainSettings:
        """A trial's config pointed at this sweep's experiment, store and storage."""
        return cfg.replace(
            **{
                "name": run_name,
                "tracking.enabled": True,
                "tracking.uri": self.tracking_uri,
                "tracking.experiment": self.experiment,
                "tracking.run_name": run_name,
                "cluster.storage_path": (self.storage / self.name / "train").uri,
                "output_dir": (self.storage / self.name / "models").uri,
            }
        )


def make_sweep(
    space: SearchSpace,
    *,
    name: str | None,
    tracking_uri: str | None,
    storage_path: str | None,
    experiment: str | None = None,
    verbose: bool = False,
    optuna_storage: str | None = None,
) -> Sweep:
    """Validate everything cheap (data path, model shape, storage, MLflow store, Optuna storage) before Ray starts."""
    root = (
        storage.resolve(storage_path, "--storage")
        if storage_path
        else storage.resolve(space.base.cluster.storage_path, "cluster.storage_path")
    )
    preflight(space.base.replace(**{"cluster.storage_path": root.uri}))
    uri = tracking.resolve_uri(tracking_uri or space.base.tracking.uri)
    sweep = Sweep(
        space=space,
        name=name or space.name,
        experiment=experiment or space.experiment or space.base.tracking.experiment,
        tracking_uri=uri,
        storage_path=root.uri,
        verbose=verbose,
        optuna_storage=check_optuna_storage(optuna_storage, "--optuna-storage") if optuna_storage else None,
    )
    sweep.experiment_id = tracking.ensure_experiment(uri, sweep.experiment)
    _optuna_storage(sweep)  # reachable now, not after Ray started
    if (
        not (sweep.optuna_storage or space.optuna_storage)
        and tracking.sqlite_path(uri) is None
        and not sweep.storage.is_local
    ):
        log.warning(
            "sweep %s: the Optuna study is in %s on this machine; set optuna_storage (e.g. postgresql://... or "
            "journal:/shared/path) so that a driver restarted on another machine continues it",
            sweep.name,
            sweep.optuna_url,
        )
    return sweep


def _optuna_sampler(space: SearchSpace):
    import optuna

    seed = space.seed
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }[space.sampler]()


class DefineByRun:
    """Optuna define-by-run space: exact distributions (int steps, log scales) as declared.

    A module-level class, not a closure, because Tune pickles the searcher into its experiment
    checkpoint (that is what --resume restores).
    """

    def __init__(self, parameters: list) -> None:
        self.parameters = list(parameters)

    def __call__(self, trial: Any) -> None:
        """Suggest every parameter on an Optuna trial, in file order; one whose `when` does not hold is not suggested
        (the trial keeps the base config's value, and the sampler sees a conditional space)."""
        chosen: dict[str, Any] = {}
        for p in self.parameters:
            if not p.applies(chosen):
                continue
            if p.kind == "uniform":
                trial.suggest_float(p.key, p.low, p.high)
            elif p.kind == "loguniform":
                trial.suggest_float(p.key, p.low, p.high, log=True)
            elif p.kind == "int":
                trial.suggest_int(p.key, p.low, p.high, step=p.step)
            else:
                trial.suggest_categorical(p.key, list(p.values))
            chosen[p.key] = trial.params[p.key]


def _run_one(
    sweep: Sweep,
    cfg: TrainSettings,
    run_name: str,
    role: str,
    extra_tags: dict[str, str],
    tune_callback: bool,
    *,
    loop_extra: dict[str, Any] | None = None,
    on_prepared: Any = None,
) -> dict[str, Any]:
    run = prepare_run(
        sweep.run_config(cfg, run_name),
        parent_run_id=sweep.parent_run_id,
        extra_tags={ROLE_TAG: role, SWEEP_TAG: sweep.name, **extra_tags},
    )
    if on_prepared is not None:
        on_prepared(run)
    return fit_sweep_run(sweep, run, in_trial=role == "trial", tune_callback=tune_callback, loop_extra=loop_extra)


def fit_sweep_run(
    sweep: Sweep, run: PreparedRun, *, in_trial: bool, tune_callback: bool, loop_extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train a sweep's run: under `trial_executor: tune` in this process (a trial's Tune process, or the baseline's
    Ray task: `baseline_task`), else with a TorchTrainer (reporting to Tune with `tune_callback`)."""
    if sweep.space.trial_executor == "tune":
        return fit_in_trial(
            run, in_task=not in_trial, loop_extra=loop_extra, verbose=sweep.verbose, epoch_lines=sweep.verbose
        )
    return fit_run(
        run, tune_callback=tune_callback, loop_extra=loop_extra, verbose=sweep.verbose, epoch_lines=sweep.verbose
    )


def _run_trunk(sweep: Sweep) -> dict[str, Any]:
    from prelora_ray.orchestration.forking import run_trunk

    apply_console(sweep.verbose)
    return run_trunk(sweep, _run_one)


def trial_fn(config: dict[str, Any], sweep: Sweep) -> None:
    """The Tune trainable of one trial (the "driver"): builds and fits one TorchTrainer."""
    from ray import tune

    apply_console(sweep.verbose)  # its fork events; its workers' epoch lines only with --verbose (fit_run)
    trial_id = tune.get_context().get_trial_id()
    sampled = {k: v for k, v in config.items() if k in {p.key for p in sweep.space.parameters}}
    cfg = sweep.space.trial_config(sampled)
    repaired = {k: v for k, v in cfg.flat().items() if k in sampled and sampled[k] != v}
    tags = {"trial_id": trial_id, "sampled": json.dumps(sampled)}
    if repaired:
        tags["repaired"] = json.dumps(repaired)
    if sweep.space.fork:
        from prelora_ray.orchestration.forking import fork_trial

        summary = fork_trial(sweep, cfg, f"{sweep.name}_{trial_id}", tags)
    else:
        summary = _run_one(sweep, cfg, f"{sweep.name}_{trial_id}", "trial", tags, tune_callback=True)
    # Optuna sees a trial's last report: end with the objectives, also when a resumed trial had
    # already trained to the end (its TorchTrainer then reports no epoch at all)
    tune.report(final_report(summary))


def final_report(summary: dict[str, Any]) -> dict[str, Any]:
    """The run summary plus its last epoch's numbers: every objective a search space may name."""
    last = (summary.get("history") or [{}])[-1]
    out = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def _baseline_done(sweep: Sweep) -> bool:
    run_id = tracking.find_run(
        sweep.tracking_uri, sweep.experiment_id, f"{sweep.name}_baseline", "attributes.status = 'FINISHED'"
    )
    return run_id is not None


def run_sweep(
    sweep: Sweep,
    *,
    address: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
) -> pd.DataFrame:
    """Run (or resume) the sweep; returns the table of trials with the Pareto flag."""
    import ray
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from prelora_ray.orchestration.optuna_search import TaggedOptunaSearch

    space = sweep.space
    exp_path = sweep.storage / sweep.name
    if resume and not (exp_path / "tuner.pkl").exists():
        raise ValueError(
            f"--resume: no sweep named {sweep.name!r} under {sweep.storage_path} (no tuner.pkl in {exp_path})"
        )
    if not resume and (exp_path / "tuner.pkl").exists():
        raise ValueError(
            f"a sweep named {sweep.name!r} already exists under {sweep.storage_path}: add --resume to continue it, or --name NEW"
        )
    ray_path, ray_fs = sweep.storage.ray_storage()
    sweep.parent_run_id = _parent_run(sweep, num_samples or space.num_samples)
    init_ray(address, verbose=sweep.verbose)
    baseline_ref = progress = None
    if space.fork:  # the baseline is the trunk every trial forks from: it always runs, ahead of them
        baseline_ref = _start_trunk(sweep)
        if baseline_ref is not None:
            progress = TrunkProgress(sweep).start()
            if _trials_could_starve_the_trunk(space, max_concurrent or space.max_concurrent):
                # its trials hold their CPUs while they wait for it: its workers must be placed first, or
                # max_concurrent trials could take every CPU and wait for a trunk that never starts
                _wait_for_trunk_start(sweep)
    elif space.baseline and not _baseline_done(sweep):
        baseline_ref = baseline_task(space, _run_one).remote(
            sweep, space.base.replace(strategy="full"), f"{sweep.name}_baseline", "baseline", {}, False
        )
    trainable = tune.with_resources(tune.with_parameters(trial_fn, sweep=sweep), trial_resources(space))
    _quiet_libraries(sweep.verbose)
    console = console_callback(sweep)
    samples = num_samples or space.num_samples
    if resume and not any(c.name.startswith("experiment_state-") for c in exp_path.children()):
        # the driver died before Ray Tune's first snapshot of its trials: nothing of Tune's to restore. New trials make up
        # the number; those that finished stay (in MLflow and the study), those it had begun are marked lost at the end
        done = finished_trials(sweep)
        samples = max(0, samples - done)
        log.warning(
            "sweep %s: Ray Tune had saved no state before the driver stopped; %d trials finished, %d more start now",
            sweep.name,
            done,
            samples,
        )
        resume = False
    if resume:
        # in fork mode, trials that failed because the trunk did are tried again with the resumed trunk
        tuner = tune.Tuner.restore(
            exp_path.path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=space.fork,
            storage_filesystem=ray_fs,
        )
        # trials the dead driver had begun after Tune's last snapshot: lost now (their Optuna trials FAIL), so that the
        # study counts only what will finish and Tune starts trials in their place (TaggedOptunaSearch.max_trials)
        mark_lost_trials(
            sweep, {posixpath.basename(r.path.rstrip("/")) for r in tuner.get_results() if r.path}, at_end=False
        )
        internal = getattr(tuner, "_local_tuner", None)  # the restored RunConfig is the pickled one: this run's console
        if internal is not None:
            run_config = internal.get_run_config()
            run_config.verbose = 1 if sweep.verbose else 0
            run_config.callbacks = [c for c in run_config.callbacks or [] if not isinstance(c, SweepConsole)] + [
                console
            ]
    else:
        searcher = TaggedOptunaSearch(
            space=DefineByRun(space.parameters),
            metric=[o.metric for o in space.objectives],
            mode=[o.mode for o in space.objectives],
            sampler=_optuna_sampler(space),
            study_name=sweep.name,
            storage=_optuna_storage(sweep),
            max_trials=samples,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent or space.max_concurrent),
                num_samples=max(1, samples),  # not fitted when no trial is left to run
                trial_dirname_creator=lambda t: f"{sweep.name}_{t.trial_id}",
                # trial_executor tune: a finished trial's process serves the next trial, so torch, transformers, PEFT
                # and MLflow are imported once. Not under ray_train, where the driver imports little: a reused driver
                # starts the next trial sooner, which made a SIGKILL land between a trial's start and Tune's
                # experiment snapshot more often, leaving an orphan trial run on --resume (test_tune's killed sweep)
                reuse_actors=space.trial_executor == "tune",
            ),
            run_config=tune.RunConfig(
                name=sweep.name,
                storage_path=ray_path,
                storage_filesystem=ray_fs,
                # a trial's driver lost with its node is retried (same name: its TorchTrainer resumes from
                # its checkpoint, its MLflow run is reused) as often as its workers may be
                failure_config=tune.FailureConfig(max_failures=space.base.cluster.max_failures, fail_fast=False),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=space.base.cluster.checkpoints_to_keep
                ),  # trial_executor tune
                callbacks=[console],
                verbose=1 if sweep.verbose else 0,  # Tune's status and result tables: --verbose
            ),
        )
    started = time.perf_counter()
    grid = tuner.fit() if resume or samples > 0 else []
    if baseline_ref is not None:
        try:
            baseline = ray.get(baseline_ref)
        except Exception as exc:  # the baseline failed: the sweep's trials still count
            log.warning("the full-training baseline failed: %s", exc)
        else:
            if progress is None:  # in fork mode, the trunk's progress said it
                log.info(
                    "baseline %s_baseline: finished: %s",
                    sweep.name,
                    objectives_text(baseline, [o.metric for o in space.objectives]),
                )
    if progress is not None:
        progress.stop()
    mark_lost_trials(sweep, {posixpath.basename(r.path.rstrip("/")) for r in grid if r.path})
    reconcile_study(sweep)
    table = finish_sweep(sweep)
    tracking.log_metrics(sweep.tracking_uri, sweep.parent_run_id, {"sweep_wall_time_s": time.perf_counter() - started})
    tracking.end_run(sweep.tracking_uri, sweep.parent_run_id, "FINISHED")
    return table


def trial_resources(space: SearchSpace) -> dict[str, float]:
    """What a trial's Tune process holds: nothing under ray_train (its TorchTrainer's workers hold the CPUs and
    GPUs), its one worker's CPUs and GPU under `trial_executor: tune`."""
    if space.trial_executor == "tune":
        cluster = space.base.cluster
        return {"cpu": cluster.cpus_per_worker, "gpu": 1 if cluster.use_gpu else 0}
    return {"cpu": 0, "memory": 1}  # a bare {"cpu": 0} is refused


def baseline_task(space: SearchSpace, fn: Any) -> Any:
    """The Ray task of the sweep's baseline (the trunk in fork mode). Under `trial_executor: tune` it trains in the
    task's own process, which holds its one worker's CPUs (and GPU) and is re-run from its last checkpoint when the
    process dies (`cluster.max_failures` times; an error raised in it fails it). Otherwise it drives a TorchTrainer,
    whose workers hold the resources and whose FailureConfig retries, and holds nothing itself."""
    import ray

    c = space.base.cluster
    if space.trial_executor == "tune":
        return ray.remote(num_cpus=c.cpus_per_worker, num_gpus=1 if c.use_gpu else 0, max_retries=c.max_failures)(fn)
    return ray.remote(num_cpus=0, max_retries=0)(fn)


def _quiet_libraries(verbose: bool) -> None:
    """Without --verbose: no Optuna INFO lines ("A new study created"), no Tune tables, one line per failed trial (ours, not Tune's trace)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    if not verbose:
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
        # Tune's new output engine prints its experiment table and paths even at verbose=0; the legacy one is silent
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # trial_executor tune: a trial checkpointing every epoch makes Tune snapshot its experiment state
        # every `checkpoints_to_keep` epochs, and warn about it each time
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _trials_could_starve_the_trunk(space: SearchSpace, concurrent: int) -> bool:
    """trial_executor tune: can `concurrent` waiting trials and the trunk's workers not all fit in the cluster now?"""
    if space.trial_executor != "tune":
        return False  # their drivers hold nothing
    import ray

    c = space.base.cluster
    have = ray.cluster_resources()
    cpus = (concurrent + c.num_workers) * c.cpus_per_worker
    gpus = (concurrent + c.num_workers) if c.use_gpu else 0
    return cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0)


def _wait_for_trunk_start(sweep: Sweep) -> None:
    """Until the trunk has written an epoch (its workers hold their resources: a resumed trunk rewrites its
    history), finished, or failed."""
    from prelora_ray import fork
    from prelora_ray.orchestration.forking import POLL_S, trunk_dir

    folder = trunk_dir(sweep)
    history = folder / fork.HISTORY_FILE

    def stamp() -> int | None:
        return history.mtime_ns()

    before = stamp()
    while stamp() == before and fork.read_status(folder).get("state") not in ("finished", "failed"):
        time.sleep(POLL_S)


def _start_trunk(sweep: Sweep) -> Any:
    """Start (or resume) the trunk as a Ray task; a watcher marks it failed if the task dies without a word."""
    import threading

    import ray

    from prelora_ray import fork
    from prelora_ray.orchestration.forking import mark_trunk_failed, trunk_dir

    folder = trunk_dir(sweep)
    if _baseline_done(sweep):
        status = fork.read_status(folder)
        if status.get("state") != "finished":
            fork.write_status(folder, "finished", run_id=status.get("run_id", ""))
        return None
    fork.write_status(
        folder, "running"
    )  # now, not when the task starts: a failed trunk's old status must not end a wait for it
    ref = baseline_task(sweep.space, _run_trunk).remote(sweep)

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


def finished_trials(sweep: Sweep) -> int:
    """The sweep's trial runs that finished (in MLflow, under its parent run)."""
    runs = search_runs(
        sweep.tracking_uri,
        [sweep.experiment_id],
        f"tags.mlflow.parentRunId = '{sweep.parent_run_id}' and attributes.status = 'FINISHED' and tags.`{M.ROLE_TAG}` = 'trial'",
    )
    return len(runs)


def mark_lost_trials(sweep: Sweep, known: set[str], *, at_end: bool = True) -> list[str]:
    """End the trial runs still RUNNING once the sweep is over, or (not `at_end`) as a resumed sweep starts: only those Ray
    Tune will not resume then (`known`: the run names of Ray Tune's trials).

    One Tune knows, at the end, was ended by a process that died without a word: FAILED. One it does not know is lost: the sweep
    was killed after it started and before Ray Tune's experiment snapshot held it, so --resume ran a new trial in
    its place. It is marked KILLED and `prelora.lost`, and its Optuna trial FAIL (not left RUNNING for the
    sampler), as is any Optuna trial still RUNNING that no trial of Tune's owns. Returns the lost runs' names.
    """
    import optuna

    from prelora_ray.orchestration.optuna_search import TUNE_TRIAL_ATTR

    runs = search_runs(
        sweep.tracking_uri,
        [sweep.experiment_id],
        f"tags.mlflow.parentRunId = '{sweep.parent_run_id}' and attributes.status = 'RUNNING' and tags.`{M.ROLE_TAG}` = 'trial'",
    )
    lost: dict[str, str] = {}
    for _, row in runs.iterrows():
        name = str(row.get("tags.mlflow.runName"))
        if name in known and not at_end:
            continue  # Tune resumes it
        if name in known:
            tracking.end_run(
                sweep.tracking_uri,
                row["run_id"],
                "FAILED",
                "the trial's process ended without reporting its end (killed?)",
            )
            continue
        lost[str(row.get("tags.trial_id"))] = name
        tracking.client(sweep.tracking_uri).set_tag(row["run_id"], M.LOST_TAG, "true")
        tracking.end_run(
            sweep.tracking_uri,
            row["run_id"],
            "KILLED",
            "lost: the sweep was stopped before Ray Tune recorded this trial; a new trial ran in its place",
        )
    # Optuna trials of Tune trials this driver never knew: those lost above, and any a killed driver had asked the study for
    # before its process or MLflow run existed; left RUNNING, the sampler would wait on them forever
    known_ids = {n[len(sweep.name) + 1 :] for n in known if n.startswith(f"{sweep.name}_")}
    storage = _optuna_storage(sweep)
    try:
        trials = optuna.load_study(study_name=sweep.name, storage=storage).trials
    except KeyError:  # no study: nothing was ever suggested
        trials = []
    for t in trials:
        # before a resumed driver suggests anything, as after its trials ended, no live trial is in the study unknown to Tune
        if (
            t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
            and t.user_attrs.get(TUNE_TRIAL_ATTR) not in known_ids
        ):
            storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if lost:
        log.warning(
            "sweep %s: %s lost (started as the sweep was stopped; Ray Tune ran new trials in their place): marked KILLED",
            sweep.name,
            ", ".join(sorted(lost.values())),
        )
    return sorted(lost.values())


def reconcile_study(sweep: Sweep) -> int:
    """Give the Optuna study the results of trials that failed, then finished when the sweep was resumed.

    Ray's OptunaSearch told the study FAIL the first time and drops the second completion, so the
    sampler would never learn from them. Each gets a COMPLETE copy (same parameters, its objectives,
    `retry_of` the failed number); running this again adds nothing. Returns how many were added.
    """
    import optuna

    from prelora_ray.orchestration.optuna_search import TUNE_TRIAL_ATTR

    try:
        study = optuna.load_study(study_name=sweep.name, storage=_optuna_storage(sweep))
    except KeyError:  # no study (nothing was suggested)
        return 0
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    runs = search_runs(
        sweep.tracking_uri,
        [sweep.experiment_id],
        f"tags.mlflow.parentRunId = '{sweep.parent_run_id}' and attributes.status = 'FINISHED'",
    )
    by_trial = {row["tags.trial_id"]: row for _, row in runs.iterrows()} if "tags.trial_id" in runs else {}
    added = 0
    for t in study.trials:
        row = by_trial.get(t.user_attrs.get(TUNE_TRIAL_ATTR))
        if t.state != optuna.trial.TrialState.FAIL or t.number in retried or row is None:
            continue
        values = [float(row.get(f"metrics.{o.metric}", float("nan"))) for o in sweep.space.objectives]
        if any(v != v for v in values):
            continue
        study.add_trial(
            optuna.trial.create_trial(
                params=t.params,
                distributions=t.distributions,
                values=values,
                user_attrs={**t.user_attrs, "retry_of": t.number},
            )
        )
        added += 1
    return added


def _optuna_storage(sweep: Sweep):
    """The sweep's Optuna storage, connected (a one-line error naming the setting when it cannot be)."""
    from prelora_ray.orchestration.optuna_search import display_url, open_storage

    try:
        return open_storage(sweep.optuna_url)
    except Exception as exc:  # a driver module missing, a server down, a folder not writable
        key = "--optuna-storage" if sweep.optuna_storage else "optuna_storage"
        raise ValueError(
            f"{key}={display_url(sweep.optuna_url)!r}: cannot open the Optuna storage ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None


def _parent_run(sweep: Sweep, num_samples: int) -> str:
    from prelora_ray.orchestration.optuna_search import display_url

    space = sweep.space
    params = {
        "search_space": space.path,
        "sampler": space.sampler,
        "sampler_seed": space.seed,
        "num_samples": num_samples,
        "objectives": json.dumps([[o.metric, o.mode] for o in space.objectives]),
        "parameters": json.dumps([p.key for p in space.parameters]),
        "optuna_storage": display_url(sweep.optuna_url),
    }
    run_id = tracking.start_run(
        sweep.tracking_uri,
        sweep.experiment_id,
        sweep.name,
        params=params,
        tags={ROLE_TAG: "parent", SWEEP_TAG: sweep.name},
    )
    tracking.log_text(sweep.tracking_uri, run_id, space.raw_text, Path(space.path).name)
    return run_id


def finish_sweep(sweep: Sweep) -> pd.DataFrame:
    """Tag Pareto trials, log the Pareto table as a CSV artifact of the parent, return the table."""
    runs = search_runs(sweep.tracking_uri, [sweep.experiment_id], f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
    table = sweep_table(
        runs, [(o.metric, o.mode) for o in sweep.space.objectives], [p.key for p in sweep.space.parameters]
    )
    c = tracking.client(sweep.tracking_uri)
    for _, row in table.iterrows():
        if row["role"] == "trial":
            c.set_tag(row["run_id"], PARETO_TAG, str(bool(row[PARETO_TAG])).lower())
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    tracking.log_text(sweep.tracking_uri, sweep.parent_run_id, buf.getvalue(), "pareto.csv")
    n_pareto = int(table[PARETO_TAG].sum()) if len(table) else 0
    counts = {
        "trials": int((table["role"] == "trial").sum()) if len(table) else 0,
        "pareto_trials": n_pareto,
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


PICKS = ("knee", "max-acc", "min-time", "fastest-within=<points>")


def pick_row(table: pd.DataFrame, objectives: list[tuple[str, str]], pick: str) -> pd.Series:
    """The trial chosen from a sweep's table by a --pick rule."""
    from prelora_ray.front import knee_point, speedup_at_equal_accuracy

    front = table[table[PARETO_TAG]].reset_index(drop=True)
    if front.empty:
        raise ValueError("the sweep has no finished trial on its Pareto front")
    if pick == "knee":
        values = front[[m for m, _ in objectives]].astype(float).to_numpy()
        return front.iloc[knee_point(values, [d for _, d in objectives])]
    if pick == "max-acc":
        return front.loc[front[M.FINAL_VAL_ACC].astype(float).idxmax()]
    if pick == "min-time":
        return front.loc[front[M.MEAN_EPOCH_TIME_S].astype(float).idxmin()]
    if pick.startswith("fastest-within="):
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
    raise ValueError(f"--pick {pick!r} is invalid: one of {', '.join(PICKS)}")


def export_best(
    uri: str, experiment: str, sweep: str | None, pick: str, out: str | Path
) -> tuple[pd.Series, TrainSettings]:
    """Write the train config of the picked trial to `out`; returns (the trial's row, the config)."""
    if not (pick in ("knee", "max-acc", "min-time") or pick.startswith("fastest-within=")):
        raise ValueError(f"--pick {pick!r} is invalid: one of {', '.join(PICKS)}")
    record = load_sweep(uri, experiment, sweep)
    row = pick_row(record.table, record.objectives, pick)
    c = tracking.client(uri)
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        cfg_file = c.download_artifacts(row["run_id"], "config.yaml", tmp)
        data = yaml.safe_load(Path(cfg_file).read_text())
    cfg = TrainSettings.from_dict(data, source=f"run {row['run_id']} config.yaml")
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
    header = (
        f"# prelora-ray best --pick {pick}: trial {row['run_name']} (MLflow run {row['run_id']}) of sweep {record.name}\n"
        f"# strategy {cfg.strategy}, final_val_acc {row[M.FINAL_VAL_ACC]:.4f}, mean_epoch_time_s {row[M.MEAN_EPOCH_TIME_S]:.4f}, switch epoch {row[M.SWITCH_EPOCH]}\n"
    )
    Path(out).write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return row, cfg
