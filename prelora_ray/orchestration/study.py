"""A sweep's Optuna study: its storage, sampler and searcher, and keeping it true to what happened across drivers
(trials lost to a killed driver end FAIL; trials that failed and then finished on --resume are told COMPLETE)."""

from __future__ import annotations

import logging
from typing import Any

from prelora_ray import metrics as M
from prelora_ray import tracking
from prelora_ray.orchestration.sweep import Sweep
from prelora_ray.search_space import SearchSpace

log = logging.getLogger("prelora_ray")


def load_study(sweep: Sweep) -> Any | None:
    """The sweep's study, or None before anything was suggested (and always for a scan, which has none)."""
    import optuna

    if not sweep.has_study:
        return None
    try:
        return optuna.load_study(study_name=sweep.name, storage=sweep.study_storage())
    except KeyError:
        return None


def make_sampler(space: SearchSpace) -> Any:
    """The file's sampler, seeded."""
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


def new_searcher(sweep: Sweep, max_trials: int) -> Any:
    """The sweep's searcher on its study: the file's sampler over its space, at most `max_trials` trials."""
    from prelora_ray.orchestration.optuna_search import TaggedOptunaSearch

    space = sweep.space
    return TaggedOptunaSearch(
        space=DefineByRun(space.parameters),
        metric=[o.metric for o in space.objectives],
        mode=[o.mode for o in space.objectives],
        sampler=make_sampler(space),
        study_name=sweep.name,
        storage=sweep.study_storage(),
        max_trials=max_trials,
    )


def finished_trials(sweep: Sweep) -> int:
    """The sweep's trial runs that finished (in MLflow, under its parent run)."""
    return len(
        tracking.runs(
            sweep.tracking_uri, sweep.experiment_id, parent=sweep.parent_run_id, role="trial", status="FINISHED"
        )
    )


def mark_lost_trials(sweep: Sweep, known: set[str], *, at_end: bool = True) -> list[str]:
    """End the trial runs still RUNNING once the sweep is over, or (not `at_end`) as a resumed sweep starts: only those
    Ray Tune will not resume then (`known`: the run names of Ray Tune's trials).

    One Tune knows, at the end, was ended by a process that died without a word: FAILED. One it does not know is lost:
    the sweep was killed after it started and before Ray Tune's experiment snapshot held it, so --resume ran a new trial
    in its place. It is marked KILLED and `prelora.lost`, and its Optuna trial FAIL (not left RUNNING for the sampler),
    as is any Optuna trial still RUNNING that no trial of Tune's owns. Returns the lost runs' names.
    """
    import optuna

    from prelora_ray.orchestration.optuna_search import TUNE_TRIAL_ATTR

    running = tracking.runs(
        sweep.tracking_uri, sweep.experiment_id, parent=sweep.parent_run_id, role="trial", status="RUNNING"
    )
    lost: dict[str, str] = {}
    for _, row in running.iterrows():
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
        tracking.set_tags(sweep.tracking_uri, row["run_id"], {M.LOST_TAG: "true"})
        tracking.end_run(
            sweep.tracking_uri,
            row["run_id"],
            "KILLED",
            "lost: the sweep was stopped before Ray Tune recorded this trial; a new trial ran in its place",
        )
    # Optuna trials of Tune trials this driver never knew: those lost above, and any a killed driver had asked the study
    # for before its process or MLflow run existed; left RUNNING, the sampler would wait on them forever. Before a
    # resumed driver suggests anything, as after its trials ended, no live trial is in the study unknown to Tune.
    known_ids = {n[len(sweep.name) + 1 :] for n in known if n.startswith(f"{sweep.name}_")}
    study = load_study(sweep)
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    for t in study.get_trials(deepcopy=False, states=live) if study is not None else []:
        if t.user_attrs.get(TUNE_TRIAL_ATTR) not in known_ids:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if lost:
        log.warning(
            "sweep %s: %s lost (started as the sweep was stopped; Ray Tune ran new trials in their place): "
            "marked KILLED",
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

    study = load_study(sweep)
    if study is None:
        return 0
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    finished = tracking.runs(sweep.tracking_uri, sweep.experiment_id, parent=sweep.parent_run_id, status="FINISHED")
    by_trial = {row["tags.trial_id"]: row for _, row in finished.iterrows()} if "tags.trial_id" in finished else {}
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
