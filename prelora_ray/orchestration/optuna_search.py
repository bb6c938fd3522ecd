"""Ray Tune's OptunaSearch, with each Optuna trial stamped with its Tune trial id.

The stamp lets the sweep match Optuna trials to their MLflow runs (tag `trial_id`), which is how
`tune.reconcile_study` hands the study the results of trials that failed and then finished when a
sweep was resumed. Imported lazily: it imports Ray Tune.
"""

from __future__ import annotations

from pathlib import Path

from ray.tune.search.optuna import OptunaSearch

TUNE_TRIAL_ATTR = "tune_trial_id"


class TaggedOptunaSearch(OptunaSearch):
    """OptunaSearch whose trials carry the user attribute `tune_trial_id`."""

    def suggest(self, trial_id: str) -> dict | None:
        """Suggest as OptunaSearch does, then stamp the new Optuna trial."""
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config


def open_storage(url: str):
    """The Optuna storage behind a URL checked by `search_space.check_optuna_storage`: an RDB (sqlite, PostgreSQL,
    MySQL...) or a journal file (`journal:PATH`). Creates a missing sqlite or journal file's folder."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from prelora_ray.search_space import JOURNAL_PREFIX

    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url)


def display_url(url: str) -> str:
    """The URL with any password masked (it is logged as a parameter of the sweep's MLflow run)."""
    if url.startswith("journal:") or "@" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
