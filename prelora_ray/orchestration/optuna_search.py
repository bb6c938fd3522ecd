"""Ray Tune's OptunaSearch, with each Optuna trial stamped with its Tune trial id.

The stamp lets the sweep match Optuna trials to their MLflow runs (tag `trial_id`), which is how
`tune.reconcile_study` hands the study the results of trials that failed and then finished when a
sweep was resumed. Imported lazily: it imports Ray Tune.
"""

from __future__ import annotations

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
