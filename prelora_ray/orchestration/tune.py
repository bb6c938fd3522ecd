"""`prelora-ray tune`: Ray Tune + Optuna over a search space, one trial per sampled configuration, MLflow runs.

One parent MLflow run per sweep; one child per trial and one for the `full` baseline (in fork mode the trunk every
trial forks from: orchestration/trunk.py and forking.py). The Optuna study lives in its own storage
(`optuna_storage`; by default sqlite beside the MLflow store) and counts the sweep's trials, so `--resume` continues a
sweep (Tuner.restore) without repeating finished trials, also after the driver died: a restored trial reuses its
deterministic name, hence its checkpoints and MLflow run. The parts shared with `scan` are in sweep.py, driver.py,
study.py and results.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from prelora_ray import metrics as M
from prelora_ray import tracking
from prelora_ray.orchestration import driver
from prelora_ray.orchestration.console import console_callback
from prelora_ray.orchestration.ray_hooks import apply_console
from prelora_ray.orchestration.results import finish_sweep
from prelora_ray.orchestration.study import finished_trials, new_searcher
from prelora_ray.orchestration.sweep import Sweep, final_report, run_one, trial_resources

log = logging.getLogger("prelora_ray")


def trial_fn(config: dict[str, Any], sweep: Sweep) -> None:
    """The Tune trainable of one trial (its "driver"): trains the sampled configuration (forked from the trunk in fork
    mode) and reports its objectives last."""
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
        summary = run_one(sweep, cfg, f"{sweep.name}_{trial_id}", "trial", tags, tune_callback=True)
    # Optuna sees a trial's last report: end with the objectives, also when a resumed trial had
    # already trained to the end (its TorchTrainer then reports no epoch at all)
    tune.report(final_report(summary))


def new_scheduler(sweep: Sweep) -> Any:
    """The sweep's Ray Tune scheduler: MO-ASHA over forked segments with `early_stopping:`, else Tune's default."""
    if sweep.space.early_stopping is None:
        return None
    from prelora_ray.orchestration.early_stop import ParetoRungScheduler

    return ParetoRungScheduler(sweep)


def parent_params(sweep: Sweep, num_samples: int) -> dict[str, Any]:
    """The sweep's parent-run params: what it searched, against what, with which sampler and study."""
    from prelora_ray.orchestration.optuna_search import display_url

    space = sweep.space
    return {
        "search_space": space.path,
        "sampler": space.sampler,
        "sampler_seed": space.seed,
        "num_samples": num_samples,
        "objectives": json.dumps([[o.metric, o.mode] for o in space.objectives]),
        "parameters": json.dumps([p.key for p in space.parameters]),
        "optuna_storage": display_url(sweep.optuna_url),
        "alpha": space.alpha,
        "early_stopping": json.dumps(space.early_stopping.as_dict()) if space.early_stopping else "off",
    }


def run_sweep(
    sweep: Sweep,
    *,
    address: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
) -> pd.DataFrame:
    """Run (or resume) the sweep; returns the table of trials with the Pareto flag."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    space = sweep.space
    tuner_file = sweep.folder / "tuner.pkl"
    if resume and not tuner_file.exists():
        raise ValueError(f"--resume: no sweep named {sweep.name!r} under {sweep.storage_path} (no {tuner_file})")
    if not resume and tuner_file.exists():
        raise ValueError(
            f"a sweep named {sweep.name!r} already exists under {sweep.storage_path}: "
            "add --resume to continue it, or --name NEW"
        )
    samples = num_samples or space.num_samples
    concurrent = max_concurrent or space.max_concurrent
    run = driver.start(
        sweep,
        params=parent_params(sweep, samples),
        tags={M.ROLE_TAG: "parent", M.SWEEP_TAG: sweep.name},
        address=address,
        concurrent=concurrent,
        baseline=space.baseline,
    )
    tracking.log_text(sweep.tracking_uri, sweep.parent_run_id, space.raw_text, Path(space.path).name)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, sweep=sweep), trial_resources(space))
    console = console_callback(sweep)
    if resume and not driver.has_tune_state(sweep):
        # the driver died before Ray Tune's first snapshot of its trials: nothing of Tune's to restore. New trials make
        # up the number; those that finished stay (in MLflow and the study), those it had begun are marked lost
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
        tuner = driver.restore(sweep, trainable, [console])
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(new_searcher(sweep, samples), max_concurrent=concurrent),
                scheduler=new_scheduler(sweep),
                num_samples=max(1, samples),  # not fitted when no trial is left to run
                trial_dirname_creator=lambda t: f"{sweep.name}_{t.trial_id}",
                # trial_executor tune: a finished trial's process serves the next trial, so torch, transformers, PEFT
                # and MLflow are imported once. Not under ray_train, where the driver imports little: a reused driver
                # starts the next trial sooner, which made a SIGKILL land between a trial's start and Tune's
                # experiment snapshot more often, leaving an orphan trial run on --resume (test_tune's killed sweep)
                reuse_actors=space.trial_executor == "tune",
            ),
            run_config=driver.run_config(sweep, [console]),
        )
    results = tuner.fit() if resume or samples > 0 else []
    driver.finish(run, results)
    table = finish_sweep(sweep)
    tracking.log_metrics(sweep.tracking_uri, sweep.parent_run_id, {"sweep_wall_time_s": run.wall_s})
    tracking.end_run(sweep.tracking_uri, sweep.parent_run_id, "FINISHED")
    return table
