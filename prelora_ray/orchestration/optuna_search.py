"""Ray Tune's OptunaSearch, with each Optuna trial stamped with its Tune trial id and its sweep.

The stamp lets the sweep match Optuna trials to their MLflow runs (tag `trial_id`), which is how
`tune.reconcile_study` hands the study the results of trials that failed and then finished when a
sweep was resumed. The study, not the driver, counts the sweep's trials: a driver resumed from Ray
Tune's last snapshot does not start again a trial the study saw begin or finish after that snapshot.
Imported lazily: it imports Ray Tune.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from prelora_ray.orchestration.ray_compat import searcher_completed, searcher_study, searcher_trials

TUNE_TRIAL_ATTR = "tune_trial_id"
SWEEP_ATTR = (
    "sweep_instance"  # one id per sweep (kept across resumes in Tune's pickled searcher), on each of its Optuna trials
)


class TaggedOptunaSearch(OptunaSearch):
    """OptunaSearch whose trials carry the user attributes `tune_trial_id` and `sweep_instance`, and which suggests no
    more than `max_trials` live or finished trials of its sweep, as the study counts them."""

    def __init__(self, *args: Any, max_trials: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_trials, self.sweep_instance = max_trials, uuid.uuid4().hex

    def counted_trials(self) -> int:
        """The study's trials of this sweep that finished (early-stopped ones too), run or wait (failed and lost ones
        are not counted)."""
        import optuna

        state = optuna.trial.TrialState
        states = (state.COMPLETE, state.PRUNED, state.RUNNING, state.WAITING)
        instance = getattr(self, "sweep_instance", None)
        trials = searcher_study(self).get_trials(deepcopy=False, states=states)
        return sum(t.user_attrs.get(SWEEP_ATTR) == instance for t in trials)

    def suggest(self, trial_id: str) -> dict | str | None:
        """Suggest as OptunaSearch does, then stamp the new Optuna trial; FINISHED once the study holds max_trials."""
        limit = getattr(self, "max_trials", None)  # a searcher pickled before this attribute existed has none
        trials = searcher_trials(self)
        started = searcher_study(self) is not None
        if limit is not None and started and trial_id not in trials and self.counted_trials() >= limit:
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        if trial_id in trials:
            trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
            trials[trial_id].set_user_attr(SWEEP_ATTR, getattr(self, "sweep_instance", None))
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """As OptunaSearch, but a trial the early-stopping scheduler already told the study about (PRUNED) is left as
        it is: telling it again would fail and print a warning."""
        import optuna

        trials = searcher_trials(self)
        study = searcher_study(self)
        if trial_id in trials and study is not None:
            frozen = study._storage.get_trial(trials[trial_id]._trial_id)
            if frozen.state == optuna.trial.TrialState.PRUNED:
                searcher_completed(self).add(trial_id)
                return
        super().on_trial_complete(trial_id, result=result, error=error)


def open_storage(url: str):
    """The Optuna storage behind a URL checked by `search_space.check_optuna_storage`: an RDB (sqlite, PostgreSQL,
    MySQL...) or a journal file (`journal:PATH`). Creates a missing sqlite or journal file's folder."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from prelora_ray.search_space import JOURNAL_PREFIX

    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX) :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def display_url(url: str) -> str:
    """The URL with any password masked (it is logged as a parameter of the sweep's MLflow run)."""
    if url.startswith("journal:") or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
