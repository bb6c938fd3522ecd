"""The private Ray Tune APIs prelora_ray uses (prelora_ray/orchestration/ray_compat.py), each checked against the
installed version: an upgrade that changes one fails here, naming it, instead of in a resumed sweep."""

from __future__ import annotations

import optuna
import pytest

from prelora_ray.orchestration import ray_compat


def _searcher():
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space={"x": tune.uniform(0, 1)}, metric="y", mode="max")


def test_optuna_search_keeps_each_tune_trials_optuna_trial_and_its_study():
    searcher = _searcher()
    assert searcher.suggest("t1") is not None
    trials = ray_compat.searcher_trials(searcher)
    assert isinstance(trials, dict) and isinstance(trials["t1"], optuna.trial.Trial), "OptunaSearch._ot_trials changed"
    study = ray_compat.searcher_study(searcher)
    assert isinstance(study, optuna.Study), "OptunaSearch._ot_study changed"
    assert [t.number for t in study.trials] == [trials["t1"].number]


@pytest.mark.slow
def test_a_restored_tuner_exposes_the_run_config_it_will_run_with(ray_local, tmp_path):
    from ray import tune

    def trainable(config):
        tune.report({"y": config["x"]})

    tuner = tune.Tuner(
        trainable,
        param_space={"x": tune.grid_search([1])},
        run_config=tune.RunConfig(name="compat", storage_path=str(tmp_path), verbose=0),
    )
    tuner.fit()
    restored = tune.Tuner.restore(str(tmp_path / "compat"), trainable=trainable)
    config = ray_compat.restored_run_config(restored)
    assert config is not None, "Tuner._local_tuner.get_run_config() is gone: a resumed sweep would keep the old console"
    assert isinstance(config, tune.RunConfig) and config.name == "compat"
    config.verbose, config.callbacks = 0, []  # what orchestration/driver.py sets in place
    assert ray_compat.restored_run_config(restored).callbacks == []
