"""The Ray Train driver: checks, MLflow run, one TorchTrainer, the summary.

`prepare_run` does everything cheap that can fail (config, data path, model shape, MLflow store)
before Ray starts; `fit_run` runs the TorchTrainer. A Tune trial calls both, with a parent run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prelora_ray import metrics as M
from prelora_ray import storage
from prelora_ray.config import TrainSettings
from prelora_ray.data import check_data, default_image_size
from prelora_ray.models import check_model_shape
from prelora_ray.orchestration.worker_spec import ForkFrom, TrunkRecords, WorkerSpec
from prelora_ray.summary import RunSummary

log = logging.getLogger("prelora_ray")

# Ray Train's controller polls workers every 2 s by default, which makes every per-epoch report wait
# up to that long; 0.2 s cuts a digits run from ~31 s to ~21 s (measured on 2 CPUs: benchmarks/ray_overhead.py).
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@dataclass(kw_only=True)
class PreparedRun:
    """A validated run: absolute paths, its name, and its MLflow run (if tracking)."""

    cfg: TrainSettings
    name: str
    tracking_uri: str | None
    mlflow_run_id: str | None
    experiment_id: str | None = None


def default_name(cfg: TrainSettings) -> str:
    """<strategy>-<dataset>-<YYYYmmdd-HHMMSS>."""
    return f"{cfg.strategy}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def preflight(cfg: TrainSettings) -> TrainSettings:
    """Cheap checks that need no Ray: data path, model shape, storage (scheme, credentials, bucket); returns cfg with
    absolute paths (a local path made absolute, a bucket's URI as given)."""
    check_data(cfg.data)
    check_model_shape(cfg.model, default_image_size(cfg.data))
    changes: dict[str, Any] = {
        "cluster.storage_path": storage.resolve(cfg.cluster.storage_path, "cluster.storage_path").uri,
        "output_dir": storage.resolve(cfg.output_dir, "output_dir").uri,
    }
    if cfg.data.root:
        changes["data.root"] = str(Path(cfg.data.root).expanduser().resolve())
    return cfg.replace(**changes)


def prepare_run(
    cfg: TrainSettings, *, parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None
) -> PreparedRun:
    """Validate, name the run, and create or reopen its MLflow run (params, tags, config artifact)."""
    cfg = preflight(cfg)
    name = cfg.name or default_name(cfg)
    cfg = cfg.replace(name=name)
    uri = run_id = exp = None
    if cfg.tracking.enabled:
        from prelora_ray import tracking

        uri = tracking.resolve_uri(cfg.tracking.uri)
        cfg = cfg.replace(**{"tracking.uri": uri})
        exp = tracking.ensure_experiment(uri, cfg.tracking.experiment)
        tags = {"strategy": cfg.strategy, "dataset": cfg.data.name, "model": cfg.model.preset, **(extra_tags or {})}
        run_id = tracking.start_run(
            uri, exp, cfg.tracking.run_name or name, params=cfg.flat(), tags=tags, parent_run_id=parent_run_id
        )
        tracking.log_text(uri, run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    return PreparedRun(cfg=cfg, name=name, tracking_uri=uri, mlflow_run_id=run_id, experiment_id=exp)


def init_ray(address: str | None, *, num_cpus: int | None = None, verbose: bool = True) -> None:
    """Start or join Ray once, with the fast health-check interval for the Train controller.

    `verbose=False`: the driver's `ray` logger at WARNING (no "Started a local Ray instance" and Tune's INFO lines).
    """
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": dict(RAY_ENV)},
        "log_to_driver": True,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    address = address or os.environ.get("RAY_ADDRESS")  # a driver started by `ray job submit` joins its cluster
    if not verbose:  # Ray 2.60 says at every new local cluster that it turned token authentication on (its default)
        logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)
    if address:
        ray.init(address=address, **kwargs)
    else:
        kwargs["runtime_env"]["worker_process_setup_hook"] = (
            "prelora_ray.orchestration.ray_hooks.quiet_without_state_api"
        )
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def worker_spec(
    run: PreparedRun, *, start: TrunkRecords | ForkFrom | None = None, verbose: bool = False, epoch_lines: bool = True
) -> WorkerSpec:
    """What a run's worker gets: its settings, MLflow run, export folder, faults to inject, console, where it starts."""
    from prelora_ray.orchestration.worker import fault_from_env

    return WorkerSpec(
        settings=run.cfg.to_dict(),
        mlflow_uri=run.tracking_uri,
        mlflow_run_id=run.mlflow_run_id,
        export_dir=(storage.location(run.cfg.output_dir) / run.name / "merged").uri,
        fault=fault_from_env(),
        verbose=verbose,
        progress=epoch_lines,
        start=start,
    )


def fit_run(
    run: PreparedRun,
    *,
    tune_callback: bool = False,
    start: TrunkRecords | ForkFrom | None = None,
    verbose: bool = False,
    epoch_lines: bool = True,
) -> RunSummary:
    """Run the TorchTrainer to the end (resuming from the last checkpoint of a run of the same name).

    The workers print our line per epoch if `epoch_lines`, and Ray Train's per-report dumps and the
    progress bars only if `verbose` (`ray_hooks.apply_console`).

    Returns rank 0's summary (history, ranks, switch/freeze epochs, merged model path). The MLflow
    run ends FINISHED, or FAILED with the error, and the summary metrics and ranks are logged.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from prelora_ray.orchestration.worker import train_worker

    cfg = run.cfg
    storage_path, storage_filesystem = storage.location(cfg.cluster.storage_path).ray_storage()
    callbacks = []
    if tune_callback:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"spec": worker_spec(run, start=start, verbose=verbose, epoch_lines=epoch_lines)},
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.num_workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if cfg.cluster.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.cluster.checkpoints_to_keep),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),  # our one line per epoch, not Ray's per report
        ),
    )
    try:
        result = trainer.fit()
    except SystemExit:  # Ray Tune ending the trial (a scheduler's STOP): the driver ends its run (early_stop.py)
        raise
    except BaseException as exc:
        end_run(run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    return finish_run(run, dict(result.return_value or {}))


def fit_in_trial(
    run: PreparedRun,
    *,
    in_task: bool = False,
    start: TrunkRecords | ForkFrom | None = None,
    verbose: bool = False,
    epoch_lines: bool = True,
) -> RunSummary:
    """`trial_executor: tune`: the run's one worker in this process, no TorchTrainer.

    Same loop, summary and MLflow logging as `fit_run`. In a Ray Tune trial's process, reports and
    checkpoints go to Ray Tune, which retries the trial from its last checkpoint (the sweep's
    `cluster.max_failures`). With `in_task` (a sweep's baseline or trunk, a plain Ray task) the checkpoints
    are folders under `<storage_path>/<run name>`, where a re-run of the task resumes.
    """
    from prelora_ray.orchestration.worker import run_in_trial

    folder = storage.location(run.cfg.cluster.storage_path) / run.name if in_task else None
    try:
        summary = run_in_trial(
            worker_spec(run, start=start, verbose=verbose, epoch_lines=epoch_lines), checkpoint_dir=folder
        )
    except SystemExit:  # Ray Tune ending the trial (a scheduler's STOP): the driver ends its run (early_stop.py)
        raise
    except BaseException as exc:
        end_run(run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    return finish_run(run, summary)


def finish_run(run: PreparedRun, summary: RunSummary) -> RunSummary:
    """Log the summary (or keep it on disk if MLflow is down) and mark the run FINISHED."""
    try:
        log_summary(run, summary)
    except Exception as exc:  # MLflow down at the end: keep everything in the run's storage, say where
        path = storage.location(run.cfg.cluster.storage_path) / run.name / "summary.json"
        path.write_text(json.dumps(summary, indent=2, default=str))
        log.warning(
            "could not log the summary to MLflow (%s); the summary and per-epoch history are in %s",
            type(exc).__name__,
            path,
        )
        summary["summary_path"] = path.uri
    end_run(run, "FINISHED")
    return summary


def log_val_correct(uri: str, run_id: str, packed: str) -> None:
    """The final epoch's per-image correctness as the run's val_correct.npy (a bool array, the data set's order)."""
    import numpy as np

    from prelora_ray import tracking
    from prelora_ray.significance import unpack_hits

    with tempfile.TemporaryDirectory(prefix="prelora-") as folder:
        path = Path(folder) / M.VAL_CORRECT_ARTIFACT
        np.save(path, unpack_hits(packed))
        tracking.log_file(uri, run_id, path)


def log_summary(run: PreparedRun, summary: RunSummary) -> None:
    """Summary metrics, ranks.json and the run's tags (switched, resumed_at, epochs_trained, merged model)."""
    if not run.mlflow_run_id:
        return
    from prelora_ray import tracking

    if summary.get("unsent_metrics"):  # the worker could not reach MLflow for some epochs: send them now
        for epoch in summary.get("history", []):
            numbers = {
                k: v
                for k, v in epoch.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != M.EPOCH
            }
            tracking.log_metrics(run.tracking_uri, run.mlflow_run_id, numbers, step=int(epoch[M.EPOCH]))

    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tracking.log_metrics(run.tracking_uri, run.mlflow_run_id, numbers, step=run.cfg.epochs)
    tracking.log_text(
        run.tracking_uri,
        run.mlflow_run_id,
        json.dumps({k: summary.get(k) for k in (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.RANKS)}, indent=2),
        "ranks.json",
    )
    if summary.get(M.VAL_HITS):
        log_val_correct(run.tracking_uri, run.mlflow_run_id, summary[M.VAL_HITS])
    tags = {"switched": str(summary.get(M.SWITCH_EPOCH, -1) >= 0).lower()}
    if "epochs_trained" in summary:
        tags[M.EPOCHS_TRAINED_TAG] = str(summary["epochs_trained"])
    if summary.get("resumed_at"):  # a worker or node was lost and the run went on from a checkpoint
        tags[M.RESUMED_AT_TAG] = json.dumps(summary["resumed_at"])
    if summary.get("merged_model_path"):
        tags["merged_model_path"] = summary["merged_model_path"]
    tracking.set_tags(run.tracking_uri, run.mlflow_run_id, tags)


def end_run(run: PreparedRun, status: str, error: str | None = None) -> None:
    """Mark the MLflow run FINISHED / FAILED / KILLED; a store that went away is only a warning."""
    if not run.mlflow_run_id:
        return
    from prelora_ray import tracking

    try:
        tracking.end_run(run.tracking_uri, run.mlflow_run_id, status, error)
    except Exception as exc:  # the store went away: the training result is still returned
        log.warning("could not mark MLflow run %s %s: %s", run.mlflow_run_id, status, exc)


def run_train(cfg: TrainSettings, *, num_cpus: int | None = None) -> RunSummary:
    """`prelora-ray train`: prepare (no Ray), start or join Ray, fit, return the summary."""
    run = prepare_run(cfg)
    init_ray(run.cfg.cluster.address, num_cpus=num_cpus)
    summary = fit_run(run)
    summary["run_name"] = run.name
    summary["mlflow_run_id"] = run.mlflow_run_id
    summary["tracking_uri"] = run.tracking_uri
    summary["experiment_id"] = run.experiment_id
    return summary
