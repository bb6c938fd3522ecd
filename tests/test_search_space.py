"""Search-space files: shipped ones load; bad ones fail on load naming the file and the key."""

from __future__ import annotations

import itertools
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


SPEEDUP = {"metric": "speedup", "mode": "max"}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["quickstart", "paper_vit_large", "cifar10_vit_small"])
def test_shipped_spaces_load(name):
    space = load_search_space(SPACES / f"{name}.yaml")
    keys = {p.key for p in space.parameters}
    assert {
        "prelora.tau",
        "prelora.zeta",
        "prelora.k",
        "prelora.m",
        "prelora.warmup",
        "prelora.r_min",
        "prelora.r_max",
    } <= keys
    assert [(o.metric, o.mode) for o in space.objectives][:2] == [("final_val_acc", "max"), ("speedup", "max")]


def test_quickstart_is_digits_with_at_least_8_trials():
    space = load_search_space(SPACES / "quickstart.yaml")
    assert space.base.data.name == "digits" and space.num_samples >= 8 and space.baseline
    # one trial at a time, each inside its Tune trial process (no TorchTrainer start-up per trial)
    assert space.max_concurrent == 1 and space.trial_executor == "tune" and space.fork


def test_trial_executor_defaults_to_ray_train_and_sets_the_trials_resources(tmp_path):
    from prelora_ray.orchestration.sweep import trial_resources

    space = load_search_space(_write(tmp_path, GOOD))
    assert space.trial_executor == "ray_train" and trial_resources(space) == {"cpu": 0, "memory": 1}
    data = _mutate(["trial_executor"], "tune")
    data["base"]["cluster"] = {"cpus_per_worker": 2}
    space = load_search_space(_write(tmp_path, data))
    assert trial_resources(space) == {"cpu": 2, "gpu": 0}  # the trial's process is its worker


def test_paper_space_has_the_papers_ranges():
    space = load_search_space(SPACES / "paper_vit_large.yaml")
    p = {q.key: q for q in space.parameters}
    assert (p["prelora.tau"].low, p["prelora.tau"].high) == (0.25, 1.0)
    assert (p["prelora.zeta"].low, p["prelora.zeta"].high) == (1.0, 5.0)
    assert (p["prelora.warmup"].low, p["prelora.warmup"].high) == (5, 15)
    assert space.base.model.preset == "vit-large" and space.base.cluster.use_gpu


def test_paper_relora_space_has_the_papers_setting():
    """PreLoRA v2 4.2.4: rank 256 on ViT-L, Exp1 (tau 1, zeta 5, k = m = 3), ranks 8-64, w = 10; ReLoRA's own values
    for the rest (Guitaricet/relora: scale 32/r, dropout 0.1, magnitude pruning 0.9, min LR ratio 0.1)."""
    space = load_search_space(SPACES / "paper_relora_vit_large.yaml")
    b = space.base
    assert b.strategy == "relora_prelora" and b.model.preset == "vit-large" and b.relora.rank == 256 and b.epochs == 300
    assert (b.prelora.tau, b.prelora.zeta, b.prelora.k, b.prelora.m, b.prelora.warmup) == (1.0, 5.0, 3, 3, 10)
    assert (b.prelora.r_min, b.prelora.r_max, b.relora.reset, b.relora.prune) == (8, 64, "magnitude", 0.9)
    assert (b.relora.scale, b.relora.lora_dropout, b.relora.min_lr_ratio) == (0.125, 0.1, 0.1)
    assert {p.key for p in space.parameters} == {"relora.start_epoch", "relora.merge_every"}


def test_every_combination_of_the_paper_relora_space_restarts_after_the_lr_warmups():
    """ReLoRA: assert adjust_step + first_warmup_steps <= restart_every. RELORA's start (an LR restart) comes at or
    after the full phase's warmup, and its first merge at or after its own warmup, for each of the 3 x 3 trials."""
    space = load_search_space(SPACES / "paper_relora_vit_large.yaml")
    p = {q.key: q for q in space.parameters}
    for start, every in itertools.product(p["relora.start_epoch"].values, p["relora.merge_every"].values):
        cfg = space.trial_config({"relora.start_epoch": start, "relora.merge_every": every})
        assert cfg.relora.start_epoch >= cfg.optim.lr_warmup_epochs == 30, (start, every)
        assert cfg.relora.warmup_steps <= cfg.relora.merge_every, (start, every)


def test_two_parameters_that_are_each_valid_but_not_together_are_refused_on_load(tmp_path):
    """relora.warmup_steps <= relora.merge_every: 50 and 10 are each valid with the base, not in one trial."""
    data = {
        "name": "t",
        "base": {
            "epochs": 3,
            "strategy": "relora_prelora",
            "relora": {"start_epoch": 0, "warmup_steps": 0, "rewarm_steps": 5},
        },
        "parameters": {
            "relora.warmup_steps": {"type": "int", "low": 0, "high": 50},
            "relora.merge_every": {"type": "categorical", "values": [10, 100]},
        },
    }
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as err:
        load_search_space(path)
    message = str(err.value)
    # (the file's keys in YAML's sorted order: merge_every first)
    assert f"{path}: parameters.relora.merge_every: value 10 with relora.warmup_steps=50 is not valid here" in message
    assert "relora.warmup_steps=50 is invalid" in message and "\n" not in message
    data["parameters"]["relora.merge_every"]["values"] = [50, 100]
    assert load_search_space(_write(tmp_path, data)).base.relora.warmup_steps == 0


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
        (
            _mutate(["parameters", "prelora.tua"], {"type": "uniform", "low": 1, "high": 2}),
            "prelora.tua",
        ),  # unknown config key
        (_mutate(["base", "prelora"], {"tau": -1}), "prelora.tau"),  # bad base value
        (
            _mutate(["parameters", "prelora.tau"], {"type": "gaussian", "low": 1, "high": 2}),
            "prelora.tau.type",
        ),  # bad distribution
        (_mutate(["parameters", "prelora.tau"], {"type": "loguniform", "low": 0, "high": 2}), "prelora.tau.low"),
        (_mutate(["parameters", "prelora.tau"], {"type": "uniform", "low": 3, "high": 2}), "prelora.tau"),
        (_mutate(["parameters", "prelora.tau"], {"type": "uniform", "low": 1, "high": 2, "q": 1}), "prelora.tau.q"),
        (
            _mutate(["parameters", "prelora.zeta"], {"type": "uniform", "low": -1, "high": 2}),
            "prelora.zeta",
        ),  # invalid values
        (
            _mutate(["parameters", "prelora.r_min"], {"type": "categorical", "values": [16, 32]}),
            "prelora.r_min",
        ),  # bound above r_max's
        (_mutate(["parameters", "prelora.r_max"], {"type": "categorical", "values": [6]}), "prelora.r_max"),
        (_mutate(["objectives"], [{"mode": "max"}]), "objectives[0].metric"),  # missing objective metric
        (_mutate(["objectives"], [{"metric": "accuracy", "mode": "max"}]), "objectives[0].metric"),
        (_mutate(["objectives"], [{"metric": "final_val_acc", "mode": "up"}]), "objectives[0].mode"),
        (_mutate(["objectives"], []), "objectives"),
        (  # speedup is measured by calibration: not with it off in the base...
            {**_mutate(["objectives"], [SPEEDUP]), "base": {"epochs": 3, "calibration": {"rounds": 0}}},
            "base.calibration.rounds",
        ),
        (  # ... nor where a trial may sample it off
            _mutate(["parameters", "calibration.rounds"], {"type": "int", "low": 0, "high": 2})
            | {"objectives": [SPEEDUP]},
            "parameters.calibration.rounds",
        ),
        (_mutate(["parameters"], {}), "parameters"),
        (_mutate(["num_samples"], 0), "num_samples"),
        (_mutate(["sampler"], {"type": "cmaes"}), "sampler.type"),
        (_mutate(["trial_executor"], "local"), "trial_executor"),
        (
            {**_mutate(["trial_executor"], "tune"), "base": {"epochs": 3, "cluster": {"num_workers": 2}}},
            "trial_executor",
        ),
        (
            _mutate(["parameters", "cluster.num_workers"], {"type": "categorical", "values": [1, 2]})
            | {"trial_executor": "tune"},
            "trial_executor",
        ),
    ],
)
def test_bad_space_names_file_and_key(tmp_path, data, key):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError) as err:
        load_search_space(path)
    message = str(err.value)
    assert str(path) in message and key in message
    assert "\n" not in message


def test_speedup_is_an_objective(tmp_path):
    data = _mutate(["objectives"], [{"metric": "final_val_acc", "mode": "max"}, SPEEDUP])
    data["parameters"]["calibration.rounds"] = {"type": "int", "low": 1, "high": 3}
    space = load_search_space(_write(tmp_path, data))
    assert [(o.metric, o.mode) for o in space.objectives] == [("final_val_acc", "max"), ("speedup", "max")]


def test_sampled_r_min_above_r_max_is_repaired_not_crashed(tmp_path):
    space = load_search_space(_write(tmp_path, GOOD))
    cfg = space.trial_config({"prelora.r_min": 4, "prelora.r_max": 4})
    assert (cfg.prelora.r_min, cfg.prelora.r_max) == (4, 4)
    data = _mutate(["parameters", "prelora.r_min"], {"type": "categorical", "values": [2, 8]})
    space = load_search_space(_write(tmp_path, data))
    cfg = space.trial_config({"prelora.r_min": 8, "prelora.r_max": 4})
    assert (cfg.prelora.r_min, cfg.prelora.r_max) == (4, 8)


# -- fork mode --------------------------------------------------------------------------------------


def test_shipped_spaces_fork_by_default():
    for name in ("quickstart", "paper_vit_large", "cifar10_vit_small"):
        assert load_search_space(SPACES / f"{name}.yaml").fork, name


@pytest.mark.parametrize(
    "key, spec",
    [
        ("optim.lr", {"type": "loguniform", "low": 1e-4, "high": 1e-2}),
        ("model.dropout", {"type": "uniform", "low": 0.0, "high": 0.2}),
        ("data.batch_size", {"type": "categorical", "values": [32, 64]}),
        ("seed", {"type": "int", "low": 0, "high": 3}),
        ("epochs", {"type": "int", "low": 3, "high": 5}),
        ("prelora.window_unit", {"type": "categorical", "values": ["epoch", "step"]}),
    ],
)
def test_fork_true_refuses_a_key_that_changes_the_full_phase(tmp_path, key, spec):
    data = {**GOOD, "fork": True, "parameters": {**GOOD["parameters"], key: spec}}
    with pytest.raises(ValueError) as err:
        load_search_space(_write(tmp_path, data))
    message = str(err.value)
    assert f"parameters.{key}" in message and "full-training phase" in message and "\n" not in message
    data["fork"] = None  # unset: the same space quietly runs every trial whole
    del data["fork"]
    assert not load_search_space(_write(tmp_path, data)).fork


@pytest.mark.parametrize(
    "key, spec",
    [
        ("prelora.zero_rank_below", {"type": "uniform", "low": 0.0, "high": 2.0}),
        ("prelora.modules", {"type": "categorical", "values": [["query", "value"], ["query", "key", "value"]]}),
        ("optim.lora_lr", {"type": "loguniform", "low": 1e-4, "high": 1e-2}),
        ("optim.carry_optimizer_state", {"type": "categorical", "values": [True, False]}),
    ],
)
def test_fork_allows_keys_that_act_at_or_after_the_switch(tmp_path, key, spec):
    data = {**GOOD, "fork": {"enabled": True, "every": 5}, "parameters": {**GOOD["parameters"], key: spec}}
    space = load_search_space(_write(tmp_path, data))
    assert space.fork and space.fork_every == 5


@pytest.mark.parametrize(
    "fork, where",
    [
        ({"every": 0}, "fork.every"),
        ({"every": "3"}, "fork.every"),
        ({"enabled": "yes"}, "fork.enabled"),
        ({"often": 2}, "fork.often"),
        ("sometimes", "fork"),
    ],
)
def test_bad_fork_values_name_the_key(tmp_path, fork, where):
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        load_search_space(_write(tmp_path, {**GOOD, "fork": fork}))


def test_fork_needs_prelora_with_epoch_windows(tmp_path):
    with pytest.raises(ValueError, match="base.prelora.window_unit"):
        load_search_space(
            _write(tmp_path, {**GOOD, "fork": True, "base": {"epochs": 3, "prelora": {"window_unit": "step"}}})
        )
    assert not load_search_space(_write(tmp_path, {**GOOD, "fork": False})).fork


def test_fork_refusal_comes_from_the_cli_before_ray_starts(tmp_path):
    import subprocess
    import sys

    data = {
        **GOOD,
        "fork": True,
        "parameters": {**GOOD["parameters"], "optim.lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}},
    }
    code = (
        "import sys; from prelora_ray.cli import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "tune", str(_write(tmp_path, data))], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "parameters.optim.lr" in proc.stderr, proc.stderr


def test_tune_executor_trials_wait_for_the_trunks_workers_only_where_they_could_take_its_cpus(tmp_path, monkeypatch):
    import ray

    from prelora_ray.orchestration.sweep import trials_could_starve_the_trunk as _trials_could_starve_the_trunk

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    data = _mutate(["trial_executor"], "tune")
    data["base"]["cluster"] = {"cpus_per_worker": 1}
    space = load_search_space(_write(tmp_path, data))
    assert not _trials_could_starve_the_trunk(space, 1)  # the quickstart: one trial and the trunk fit on 2 CPUs
    assert _trials_could_starve_the_trunk(space, 2)  # two waiting trials would hold both CPUs
    assert not _trials_could_starve_the_trunk(
        load_search_space(_write(tmp_path, GOOD)), 8
    )  # ray_train drivers hold nothing
