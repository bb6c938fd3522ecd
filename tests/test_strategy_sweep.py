"""`strategy` as a sweep parameter (issue 14, item 6): the search space with a strategy categorical and
`when` conditions (validated and sampled by a real Optuna study), where each strategy forks from the
full-training trunk (relora_prelora at relora.start_epoch: `==` with a run from scratch), and a real
fork-mode sweep over strategies on digits whose front and `prelora-ray pareto` output show every strategy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from prelora_ray import fork
from prelora_ray import metrics as M
from prelora_ray.checkpoint import load_state_file
from prelora_ray.config import MODULE_FAMILIES, TrainSettings
from prelora_ray.runtime import LocalRuntime
from prelora_ray.search_space import load_search_space
from prelora_ray.strategies import REGISTRY
from prelora_ray.strategies.relora_prelora import RELORA_MERGES
from prelora_ray.trainer import ForkStart, TrainingLoop

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"

SPACE = {
    "name": "strats",
    "base": {"epochs": 6, "model": {"preset": "vit-digits"}, "prelora": {"k": 2, "m": 1}},
    "parameters": {
        "strategy": {"type": "categorical", "values": ["full", "prelora", "relora_prelora"]},
        "prelora.tau": {
            "type": "loguniform",
            "low": 1.0,
            "high": 50.0,
            "when": {"strategy": ["prelora", "relora_prelora"]},
        },
        "relora.start_epoch": {"type": "int", "low": 2, "high": 3, "when": {"strategy": "relora_prelora"}},
        "relora.rank": {"type": "categorical", "values": [4, 8], "when": {"strategy": "relora_prelora"}},
    },
}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _with(**params) -> dict:
    return {**SPACE, "parameters": {**SPACE["parameters"], **params}}


# -- the search space ---------------------------------------------------------------------------


def test_a_strategy_categorical_with_conditions_validates_forks_and_samples_each_strategys_own_knobs(tmp_path):
    import optuna

    from prelora_ray.orchestration.study import DefineByRun

    space = load_search_space(_write(tmp_path, SPACE))
    assert space.fork  # every strategy of the space starts from the trunk (or is it)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), directions=["maximize", "minimize"])
    seen = {}
    for _ in range(24):
        trial = study.ask()
        DefineByRun(space.parameters)(trial)
        params = dict(trial.params)
        cfg = space.trial_config(params)
        seen.setdefault(cfg.strategy, []).append(params)
        study.tell(trial, [0.5, 1.0])
    assert set(seen) == {"full", "prelora", "relora_prelora"}
    assert all(set(p) == {"strategy"} for p in seen["full"])  # no knob of another strategy is sampled
    assert all(set(p) == {"strategy", "prelora.tau"} for p in seen["prelora"])
    assert all(
        set(p) == {"strategy", "prelora.tau", "relora.start_epoch", "relora.rank"} for p in seen["relora_prelora"]
    )


@pytest.mark.parametrize(
    "edit, where",
    [
        ({"strategy": {"type": "categorical", "values": ["prelora", "lora"]}}, "parameters.strategy.values"),
        ({"strategy": {"type": "int", "low": 0, "high": 1}}, "parameters.strategy.type"),
        (
            {"relora.rank": {"type": "categorical", "values": [4], "when": {"strategy": "relora"}}},
            "parameters.relora.rank.when.strategy",
        ),
        (
            {"relora.rank": {"type": "categorical", "values": [4], "when": {"prelora.tau": 2.0}}},
            "parameters.relora.rank.when.prelora.tau",
        ),
        (
            {"relora.rank": {"type": "categorical", "values": [4], "when": {"seed": 1}}},
            "parameters.relora.rank.when.seed",
        ),
        (
            {"relora.rank": {"type": "categorical", "values": [4], "when": ["relora_prelora"]}},
            "parameters.relora.rank.when",
        ),
        (
            {"relora.rank": {"type": "categorical", "values": [4], "if": {"strategy": "relora_prelora"}}},
            "parameters.relora.rank.if",
        ),
        # relora.start_epoch must be < epochs under relora_prelora, the one strategy that reads it
        (
            {"relora.start_epoch": {"type": "int", "low": 2, "high": 6, "when": {"strategy": "relora_prelora"}}},
            "parameters.relora.start_epoch",
        ),
    ],
)
def test_bad_strategy_values_and_conditions_are_one_line_errors_naming_the_key(tmp_path, edit, where):
    with pytest.raises(ValueError) as err:
        load_search_space(_write(tmp_path, _with(**edit)))
    message = str(err.value)
    assert f": {where}" in message and "\n" not in message, message


def test_a_bad_strategy_is_refused_by_the_cli_before_ray_starts(tmp_path):
    import subprocess
    import sys

    bad = _with(strategy={"type": "categorical", "values": ["full", "prelora_v3"]})
    code = (
        "import sys; from prelora_ray.cli import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "tune", str(_write(tmp_path, bad))], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"parameters.strategy.values: unknown strategy 'prelora_v3'; valid: {', '.join(REGISTRY)}" in proc.stderr, (
        proc.stderr
    )


def test_a_condition_must_name_a_parameter_declared_above_it(tmp_path):
    params = dict(SPACE["parameters"])
    strategy = params.pop("strategy")
    with pytest.raises(
        ValueError, match=r"parameters\.prelora\.tau\.when\.strategy: must name a categorical parameter declared above"
    ):
        load_search_space(_write(tmp_path, {**SPACE, "parameters": {**params, "strategy": strategy}}))
    # an unconditional knob declared above the strategy is still checked with each strategy
    late = {"relora.start_epoch": {"type": "int", "low": 2, "high": 6}, "strategy": strategy}
    with pytest.raises(
        ValueError, match=r"parameters\.relora\.start_epoch: value 6 is not valid here with strategy=relora_prelora"
    ):
        load_search_space(_write(tmp_path, {**SPACE, "parameters": late}))


def test_fork_mode_asks_each_strategy_which_keys_it_may_vary(tmp_path):
    # optim.lr changes every strategy's full training: refused, with the way out named
    with pytest.raises(ValueError, match=r"parameters\.optim\.lr: changes the full-training phase.*when: \{strategy"):
        load_search_space(
            _write(tmp_path, {**_with(**{"optim.lr": {"type": "uniform", "low": 1e-4, "high": 1e-3}}), "fork": True})
        )
    # relora.* unconditioned: full and prelora trials never read it, relora_prelora's act after its fork point
    assert load_search_space(
        _write(tmp_path, {**_with(**{"relora.prune": {"type": "uniform", "low": 0.5, "high": 0.9}}), "fork": True})
    ).fork
    # a space of full trials only has nothing to fork
    only_full = {**SPACE, "parameters": {"strategy": {"type": "categorical", "values": ["full"]}}, "fork": True}
    with pytest.raises(ValueError, match=r"parameters\.strategy: is 'full': no trial forks from the trunk"):
        load_search_space(_write(tmp_path, only_full))
    # step windows: relora_prelora (like prelora) cannot rebuild its windows from the trunk's per-epoch records
    step = {**SPACE, "base": {**SPACE["base"], "prelora": {"k": 2, "m": 1, "window_unit": "step"}}}
    with pytest.raises(ValueError, match=r"base\.prelora\.window_unit: is 'step'"):
        load_search_space(_write(tmp_path, {**step, "fork": True}))
    assert not load_search_space(_write(tmp_path, step)).fork  # unset: the space runs every trial whole


def test_every_registered_strategy_says_how_it_forks():
    for name, cls in REGISTRY.items():
        assert cls.fork_mode in ("scratch", "trunk", "fork"), name
        assert cls.fork_keys_text, name


def test_the_shipped_strategies_sweep_loads_in_fork_mode_over_every_strategy():
    space = load_search_space(SPACES / "strategies_digits.yaml")
    strategy = next(p for p in space.parameters if p.key == "strategy")
    assert (
        set(strategy.values) >= {"full", "prelora", "relora_prelora", "lte"} and space.fork
    )  # (and any strategy added since)
    for p in space.parameters:  # each strategy's own knobs are sampled for it only
        if p.key.startswith("relora."):
            assert p.condition("strategy") == ("relora_prelora",), p.key
        elif p.key.startswith("lte."):
            assert p.condition("strategy") == ("lte",), p.key
        elif p.key.startswith("prelora."):
            assert set(p.condition("strategy")) == {"prelora", "relora_prelora"}, p.key


# -- fork plans -----------------------------------------------------------------------------------


def _fake_trunk(folder: Path, epochs_done: int, checkpoints: list[int]) -> None:
    fork.write_json(folder / fork.HISTORY_FILE, [{M.EPOCH: e} for e in range(epochs_done)])
    for c in checkpoints:
        fork.checkpoint_path(folder, c).write_bytes(b"")


def test_plans_of_relora_prelora_and_full_trials(tmp_path):
    relora = TrainSettings.load(None, ["strategy=relora_prelora", "epochs=8", "relora.start_epoch=3"])
    full = TrainSettings.load(None, ["strategy=full", "epochs=8"])
    _fake_trunk(tmp_path, 3, [0, 2, 3])
    assert fork.plan_fork(relora, tmp_path) is None  # its checkpoint at 3 may be the next one written: wait past it
    assert fork.plan_fork(full, tmp_path) is None  # the trunk's result, once there is one
    _fake_trunk(tmp_path, 4, [0, 2, 3])
    plan = fork.plan_fork(relora, tmp_path)
    assert plan.mode == "fork" and plan.fork_epoch == 3 and plan.switch is None and not plan.never
    _fake_trunk(tmp_path / "sparse", 5, [0, 2, 4])
    assert fork.plan_fork(relora, tmp_path / "sparse").fork_epoch == 2  # the latest checkpoint before RELORA starts
    _fake_trunk(tmp_path, 8, [0, 2, 3])
    assert fork.plan_fork(full, tmp_path).never
    scratch = fork.plan_fork(relora.replace(**{"relora.start_epoch": 0}), tmp_path)
    assert scratch.mode == "scratch" and "start_epoch is 0" in scratch.why


# -- a relora_prelora trial forked from the trunk equals the same run from scratch ----------------

BASE = [
    "epochs=6",
    "deterministic=true",
    "tracking.enabled=false",
    "data.name=synthetic",
    "data.image_size=8",
    "model.preset=vit-digits",
    "data.synthetic_samples=128",
    "data.batch_size=32",
    "prelora.k=2",
    "prelora.m=1",
    "prelora.tau=50",
    "prelora.zeta=50",
    "prelora.warmup=1",
]
RELORA = [
    *BASE,
    "strategy=relora_prelora",
    "relora.start_epoch=2",
    "relora.rank=4",
    "relora.merge_every=2",
    "relora.warmup_steps=1",
    "relora.rewarm_steps=1",
    "prelora.switch_at_epoch=3",  # the switch at a fixed epoch: a merge every 2 steps makes Algorithm 1's test erratic
]


@pytest.mark.usefixtures("one_thread")
def test_a_relora_prelora_run_forked_at_its_start_epoch_equals_the_run_from_scratch(tmp_path):
    folder = tmp_path / "trunk"
    trunk = TrainingLoop(
        TrainSettings.load(None, [*BASE, "strategy=full", f"prelora.modules={','.join(MODULE_FAMILIES)}"]),
        LocalRuntime(),
        trunk=fork.TrunkWriter(folder, every=1),
    )
    trunk.run()
    cfg = TrainSettings.load(None, RELORA)
    scratch = TrainingLoop(cfg, LocalRuntime())
    scratch.run()
    history = fork.read_history(folder)
    plan = fork.plan_fork(cfg, folder)
    assert plan.fork_epoch == 2
    for start in (
        plan.fork_epoch,
        plan.fork_epoch - 1,
    ):  # at RELORA's start, and one full epoch before it (a sparser trunk)
        forked = TrainingLoop(
            cfg,
            LocalRuntime(),
            fork=ForkStart(
                state=load_state_file(fork.checkpoint_path(folder, start)), snapshots=fork.snapshots(history[:start])
            ),
        )
        forked.run()
        assert forked.state.forked_from == start
        for key in (
            M.VAL_ACC,
            M.VAL_LOSS,
            M.TRAIN_LOSS,
            M.PHASE,
            M.TRAINABLE_PARAMS,
            M.LR,
            M.SWITCH_EPOCH,
            M.FREEZE_EPOCH,
        ):
            assert [h[key] for h in forked.state.history] == [h[key] for h in scratch.state.history], (start, key)
        assert [h[RELORA_MERGES] for h in forked.state.history[start:]] == [
            h[RELORA_MERGES] for h in scratch.state.history[start:]
        ]
        a, b = scratch.summary(), forked.summary()
        assert (
            a[M.SWITCH_EPOCH] == 3 and a[M.FREEZE_EPOCH] == 4 and scratch.strategy.state.relora_merges == 3
        )  # every phase ran, merges in RELORA: after its steps 2, 4, 6 (0-based; LR 0 on each), 4 steps an epoch
        for key in (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.RANKS, M.FINAL_VAL_ACC, M.BEST_VAL_ACC):
            assert a[key] == b[key], (start, key)
        assert forked.strategy.state.relora_merges == scratch.strategy.state.relora_merges
        for name, tensor in scratch.model.state_dict().items():
            assert torch.equal(tensor, forked.model.state_dict()[name]), (start, name)


# -- a real fork-mode sweep over strategies (CLI, Ray Tune + Optuna, MLflow), then `pareto` and `best` -

SWEEP = {
    "name": "strat",
    "base": {
        "epochs": 4,
        "deterministic": True,
        "model": {"preset": "vit-digits"},
        "prelora": {"k": 2, "m": 1, "tau": 50.0, "zeta": 50.0, "warmup": 1},
        "relora": {"start_epoch": 2, "merge_every": 10, "warmup_steps": 2, "rewarm_steps": 2},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1},
    },
    "parameters": {
        "strategy": {"type": "categorical", "values": ["full", "prelora", "relora_prelora"]},
        "relora.rank": {"type": "categorical", "values": [4, 8], "when": {"strategy": "relora_prelora"}},
    },
    "sampler": {
        "type": "random",
        "seed": 1,
    },  # prelora, full, relora_prelora (rank 4): a real Optuna study says so offline
    "num_samples": 3,
    "max_concurrent": 1,
    "trial_executor": "tune",
}


@pytest.mark.slow
def test_a_strategies_sweep_forks_each_strategy_and_its_front_and_pareto_show_them(tmp_path):
    from analysis.report import make_report
    from prelora_ray.orchestration.results import export_best
    from tests.sweeps import assert_equals_from_scratch, run_tune, sweep_runs

    proc = run_tune(tmp_path, str(_write(tmp_path, SWEEP)))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    client, parent, children = sweep_runs(tmp_path, "strat")
    trials = {c.data.params["strategy"]: c for c in children if c.data.tags[M.ROLE_TAG] == "trial"}
    assert set(trials) == {"full", "prelora", "relora_prelora"}, [c.data.tags for c in children]
    for strategy, c in trials.items():  # MLflow's params carry the sampled strategy; a full trial sampled nothing else
        assert c.info.status == "FINISHED" and json.loads(c.data.tags["sampled"])["strategy"] == strategy
    assert set(json.loads(trials["full"].data.tags["sampled"])) == {"strategy"}
    assert json.loads(trials["relora_prelora"].data.tags["sampled"]) == {"strategy": "relora_prelora", "relora.rank": 4}
    assert trials["relora_prelora"].data.params["relora.rank"] == "4"

    # where each forked: full takes the trunk's result, relora_prelora starts at relora.start_epoch and equals a run
    # from scratch
    assert (
        trials["full"].data.tags[M.FORK_SWITCH_TAG] == "never" and trials["full"].data.tags[M.EPOCHS_TRAINED_TAG] == "0"
    )
    relora = trials["relora_prelora"]
    assert relora.data.tags[M.FORK_EPOCH_TAG] == "2" and relora.data.tags[M.EPOCHS_TRAINED_TAG] == "2"
    assert relora.data.metrics[RELORA_MERGES] >= 2 and relora.data.metrics[M.SWITCH_EPOCH] >= 2
    assert [
        m.value for m in sorted(client.get_metric_history(relora.info.run_id, RELORA_MERGES), key=lambda m: m.step)
    ][:2] == [0, 0]
    assert_equals_from_scratch(tmp_path, client, relora)
    assert int(trials["prelora"].data.tags[M.FORK_EPOCH_TAG]) <= int(trials["prelora"].data.tags[M.FORK_SWITCH_TAG]) + 1

    # `prelora-ray pareto`: the printed front names each row's strategy, one line per strategy, the front coloured by
    # strategy
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = make_report(uri, "prelora-ray", sweeps=["strat"], out=tmp_path / "plots", log_to_mlflow=False)
    for strategy in ("full", "prelora", "relora_prelora"):
        assert f"strategy {strategy}: 1 finished trials" in report["text"], report["text"]
    header = report["text"].splitlines()[1]
    assert (
        " strategy " in header and " relora.rank " in header
    )  # each row's strategy, and the knobs only some strategies sample
    assert report["plots"]["front_by_strategy"].stat().st_size > 0
    # `best` exports the picked trial's config, strategy included, and says which
    row, cfg = export_best(uri, "prelora-ray", "strat", "max-acc", tmp_path / "best.yaml")
    assert cfg.strategy == row["strategy"] and f"# strategy {cfg.strategy}," in (tmp_path / "best.yaml").read_text()
