"""The one place that touches private APIs of Ray Tune: tests/test_ray_compat.py fails, naming the attribute, when an
installed version changes one of them.

- `restored_run_config`: `Tuner.restore` takes no RunConfig, and the restored one is the pickled one (the previous
  driver's console and verbosity); `Tuner._local_tuner.get_run_config()` is how to give a resumed sweep its own.
- `searcher_trials`, `searcher_study`: Ray's `OptunaSearch` keeps the Optuna trial of each Tune trial in `_ot_trials`
  and its study in `_ot_study`; the sweep's searcher stamps and counts them (optuna_search.TaggedOptunaSearch).
"""

from __future__ import annotations

from typing import Any


def restored_run_config(tuner: Any) -> Any | None:
    """The RunConfig a restored Tuner will run with (mutable in place), or None where Ray no longer exposes it."""
    internal = getattr(tuner, "_local_tuner", None)
    return internal.get_run_config() if internal is not None else None


def searcher_trials(searcher: Any) -> dict[str, Any]:
    """An OptunaSearch's Optuna trial (an `optuna.trial.Trial`) of each Tune trial id it suggested."""
    return searcher._ot_trials


def searcher_completed(searcher: Any) -> set[str]:
    """The Tune trial ids an OptunaSearch has told the study about (it ignores a second completion of these)."""
    return searcher._completed_trials


def searcher_study(searcher: Any) -> Any | None:
    """An OptunaSearch's Optuna study (None before its search space is set)."""
    return searcher._ot_study
