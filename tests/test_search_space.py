"""Search-space files: shipped ones load; bad ones fail on load naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prelora_ray.search_space import load_search_space

SPACES = Path(__file__).parents[1] / "search_spaces"
GOOD = {
    "name": "t",
    "base": {"epochs": 3},
    "parameters": {
        "prelora.tau": {"type": "loguniform", "low": 0.5, "high": 4},
        "prelora.warmup": {"type": "int", "low": 0, "high": 4, "step": 2},
        "prelora.r_min": {"type": "categorical", "values": [2, 4]},
        "prelora.r_max": {"type": "categorical", "values": [4, 8]},
    },
    "objectives": [{"metric": "final_val_acc", "mode": "max"}, {"metric": "mean_epoch_time_s", "mode": "min"}],
}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["quickstart", "paper_vit_large", "cifar10_vit_small"])
def test_shipped_spaces_load(name):
    space = load_search_space(SPACES / f"{name}.yaml")
    keys = {p.key for p in space.parameters}
    assert {"prelora.tau", "prelora.zeta", "prelora.k", "prelora.m", "prelora.warmup", "prelora.r_min", "prelora.r_max"} <= keys
    assert [o.metric for o in space.objectives][:2] == ["final_val_acc", "mean_epoch_time_s"]


def test_quickstart_is_digits_with_at_least_8_trials():
    space = load_search_space(SPACES / "quickstart.yaml")
    assert space.base.data.name == "digits" and space.num_samples >= 8 and space.baseline


def test_paper_space_has_the_papers_ranges():
    space = load_search_space(SPACES / "paper_vit_large.yaml")
    p = {q.key: q for q in space.parameters}
    assert (p["prelora.tau"].low, p["prelora.tau"].high) == (0.25, 1.0)
    assert (p["prelora.zeta"].low, p["prelora.zeta"].high) == (1.0, 5.0)
    assert (p["prelora.warmup"].low, p["prelora.warmup"].high) == (5, 15)
    assert space.base.model.preset == "vit-large" and space.base.cluster.use_gpu


def _mutate(path_keys, value):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    node = data
    for k in path_keys[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path_keys[-1]]
    else:
        node[path_keys[-1]] = value
    return data


@pytest.mark.parametrize(
    "data, key",
    [
        (_mutate(["sampler_typo"], "tpe"), "sampler_typo"),  # unknown top-level key
        (_mutate(["parameters", "prelora.tua"], {"type": "uniform", "low": 1, "high": 2}), "prelora.tua"),  # unknown config key
        (_mutate(["base", "prelora"], {"tau": -1}), "prelora.tau"),  # bad base value
        (_mutate(["parameters", "prelora.tau"], {"type": "gaussian", "low": 1, "high": 2}), "prelora.tau.type"),  # bad distribution
        (_mutate(["parameters", "prelora.tau"], {"type": "loguniform", "low": 0, "high": 2}), "prelora.tau.low"),
        (_mutate(["parameters", "prelora.tau"], {"type": "uniform", "low": 3, "high": 2}), "prelora.tau"),
        (_mutate(["parameters", "prelora.tau"], {"type": "uniform", "low": 1, "high": 2, "q": 1}), "prelora.tau.q"),
        (_mutate(["parameters", "prelora.zeta"], {"type": "uniform", "low": -1, "high": 2}), "prelora.zeta"),  # invalid values
        (_mutate(["parameters", "prelora.r_min"], {"type": "categorical", "values": [16, 32]}), "prelora.r_min"),  # bound above r_max's
        (_mutate(["parameters", "prelora.r_max"], {"type": "categorical", "values": [6]}), "prelora.r_max"),
        (_mutate(["objectives"], [{"mode": "max"}]), "objectives[0].metric"),  # missing objective metric
        (_mutate(["objectives"], [{"metric": "accuracy", "mode": "max"}]), "objectives[0].metric"),
        (_mutate(["objectives"], [{"metric": "final_val_acc", "mode": "up"}]), "objectives[0].mode"),
        (_mutate(["objectives"], []), "objectives"),
        (_mutate(["parameters"], {}), "parameters"),
        (_mutate(["num_samples"], 0), "num_samples"),
        (_mutate(["sampler"], {"type": "cmaes"}), "sampler.type"),
    ],
)
def test_bad_space_names_file_and_key(tmp_path, data, key):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as err:
        load_search_space(path)
    message = str(err.value)
    assert str(path) in message and key in message
    assert "\n" not in message


def test_sampled_r_min_above_r_max_is_repaired_not_crashed(tmp_path):
    space = load_search_space(_write(tmp_path, GOOD))
    cfg = space.trial_config({"prelora.r_min": 4, "prelora.r_max": 4})
    assert (cfg.prelora.r_min, cfg.prelora.r_max) == (4, 4)
    data = _mutate(["parameters", "prelora.r_min"], {"type": "categorical", "values": [2, 8]})
    space = load_search_space(_write(tmp_path, data))
    cfg = space.trial_config({"prelora.r_min": 8, "prelora.r_max": 4})
    assert (cfg.prelora.r_min, cfg.prelora.r_max) == (4, 8)
