"""A sweep's identity and its runs: where it lives (space, names, storage, MLflow, Optuna), and how one of its runs
(a trial, the baseline, the trunk) is prepared and trained. Shared by `prelora-ray tune` and `prelora-ray scan`.

Everything here that can fail cheaply fails in `make_sweep`, before Ray starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prelora_ray import metrics as M
from prelora_ray import storage, tracking
from prelora_ray.config import TrainSettings
from prelora_ray.orchestration.train import PreparedRun, fit_in_trial, fit_run, preflight, prepare_run
from prelora_ray.orchestration.worker_spec import ForkFrom, TrunkRecords
from prelora_ray.search_space import SearchSpace, check_optuna_storage
from prelora_ray.storage import Location, location
from prelora_ray.summary import RunSummary

log = logging.getLogger("prelora_ray")


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
    def folder(self) -> Location:
        """The sweep's own records: Ray Tune's experiment, the trunk, the runs' checkpoints and models."""
        return self.storage / self.name

    @property
    def has_study(self) -> bool:
        """A sweep samples from an Optuna study; a scan's points are a grid, with none."""
        return bool(self.space.parameters)

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

    def study_storage(self) -> Any:
        """The Optuna storage of the sweep's study, connected.

        A one-line error naming the setting when it cannot be.
        """
        from prelora_ray.orchestration.optuna_search import display_url, open_storage

        try:
            return open_storage(self.optuna_url)
        except Exception as exc:  # a driver module missing, a server down, a folder not writable
            key = "--optuna-storage" if self.optuna_storage else "optuna_storage"
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            raise ValueError(
                f"{key}={display_url(self.optuna_url)!r}: cannot open the Optuna storage ({detail})"
            ) from None

    def run_config(self, cfg: TrainSettings, run_name: str) -> TrainSettings:
        """A trial's config pointed at this sweep's experiment, store and storage."""
        return cfg.replace(
            **{
                "name": run_name,
                "tracking.enabled": True,
                "tracking.uri": self.tracking_uri,
                "tracking.experiment": self.experiment,
                "tracking.run_name": run_name,
                "cluster.storage_path": (self.folder / "train").uri,
                "output_dir": (self.folder / "models").uri,
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
    if storage_path:
        root = storage.resolve(storage_path, "--storage")
    else:
        root = storage.resolve(space.base.cluster.storage_path, "cluster.storage_path")
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
    if not sweep.has_study:
        return sweep
    sweep.study_storage()  # reachable now, not after Ray started
    if not (sweep.optuna_storage or space.optuna_storage) and tracking.sqlite_path(uri) is None and not root.is_local:
        log.warning(
            "sweep %s: the Optuna study is in %s on this machine; set optuna_storage (e.g. postgresql://... or "
            "journal:/shared/path) so that a driver restarted on another machine continues it",
            sweep.name,
            sweep.optuna_url,
        )
    return sweep


def run_one(
    sweep: Sweep,
    cfg: TrainSettings,
    run_name: str,
    role: str,
    extra_tags: dict[str, str],
    tune_callback: bool,
    *,
    start: TrunkRecords | ForkFrom | None = None,
    on_prepared: Any = None,
) -> RunSummary:
    """Prepare a run of the sweep (its MLflow run under the parent, tagged with its role) and train it."""
    run = prepare_run(
        sweep.run_config(cfg, run_name),
        parent_run_id=sweep.parent_run_id,
        extra_tags={M.ROLE_TAG: role, M.SWEEP_TAG: sweep.name, **extra_tags},
    )
    if on_prepared is not None:
        on_prepared(run)
    return fit_sweep_run(sweep, run, in_trial=role == "trial", tune_callback=tune_callback, start=start)


def fit_sweep_run(
    sweep: Sweep, run: PreparedRun, *, in_trial: bool, tune_callback: bool, start: TrunkRecords | ForkFrom | None = None
) -> RunSummary:
    """Train a sweep's run: under `trial_executor: tune` in this process (a trial's Tune process, or the baseline's
    Ray task: `baseline_task`), else with a TorchTrainer (reporting to Tune with `tune_callback`)."""
    if sweep.space.trial_executor == "tune":
        return fit_in_trial(run, in_task=not in_trial, start=start, verbose=sweep.verbose, epoch_lines=sweep.verbose)
    return fit_run(run, tune_callback=tune_callback, start=start, verbose=sweep.verbose, epoch_lines=sweep.verbose)


def final_report(summary: RunSummary) -> dict[str, Any]:
    """The run summary plus its last epoch's numbers: every objective a search space may name."""
    last = (summary.get("history") or [{}])[-1]
    out = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


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


def trials_could_starve_the_trunk(space: SearchSpace, concurrent: int) -> bool:
    """trial_executor tune: can `concurrent` waiting trials and the trunk's workers not all fit in the cluster now?"""
    if space.trial_executor != "tune":
        return False  # their drivers hold nothing
    import ray

    c = space.base.cluster
    have = ray.cluster_resources()
    cpus = (concurrent + c.num_workers) * c.cpus_per_worker
    gpus = (concurrent + c.num_workers) if c.use_gpu else 0
    return cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0)


def quiet_libraries(verbose: bool) -> None:
    """Without --verbose: no Optuna INFO lines ("A new study created"), no Tune tables, one line per failed trial
    (ours, not Tune's trace)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    if not verbose:
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
        # Tune's new output engine prints its experiment table and paths even at verbose=0; the legacy one is silent
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # trial_executor tune: a trial checkpointing every epoch makes Tune snapshot its experiment state
        # every `checkpoints_to_keep` epochs, and warn about it each time
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
