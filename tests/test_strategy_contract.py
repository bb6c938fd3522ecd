"""One contract for every registered strategy (`strategies.REGISTRY`), on short deterministic runs without Ray.

Its declaration holds together (phases with free stored numbers, FULL first; a documented config section;
the metrics it declares are the ones it reports); its config round-trips (to_dict/from_dict, YAML); an
interrupted run resumed from its checkpoint equals the uninterrupted one; where it forks, a run started
from a full-training trunk's checkpoint equals the run from scratch (and where the trunk is its result,
the trunk equals it); and its export loads in transformers' ViTForImageClassification with the trained
model's outputs. All `==` on CPU, one thread, `deterministic: true`.

The `check_*` functions take a strategy name and its overrides, so a strategy registered later (a
user's, or tests/test_toy_strategy.py's) runs the same contract.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from prelora_ray import fork
from prelora_ray import metrics as M
from prelora_ray.adapters.model import unwrap
from prelora_ray.checkpoint import load_state_file
from prelora_ray.config import TrainSettings, field_docs, valid_keys
from prelora_ray.runtime import LocalRuntime, StopTraining
from prelora_ray.strategies import FULL, REGISTRY, build, get
from prelora_ray.trainer import ForkStart, TrainingLoop
from tests.builders import check_export, synthetic_run

EPOCHS = 5
BASE = synthetic_run(EPOCHS)
# what makes each shipped strategy go through every one of its phases within EPOCHS epochs (8 steps each)
QUICK = {
    "prelora": ["prelora.k=2", "prelora.m=1", "prelora.tau=50", "prelora.zeta=50", "prelora.warmup=1"],
    "relora_prelora": [
        *("prelora.k=2", "prelora.m=1", "prelora.tau=50", "prelora.zeta=50", "prelora.warmup=1"),
        *("relora.start_epoch=2", "relora.rank=4", "relora.merge_every=5", "relora.rewarm_steps=1"),
        *("relora.warmup_steps=2", "prelora.switch_at_epoch=2"),  # RELORA after the 2-epoch LR warmup, 1 merge
    ],
    "lte": ["lte.start_epoch=1", "lte.merge_every=3", "lte.num_heads=2"],
}
TIMING = (
    "epoch_time_s",
    "throughput_img_s",
    "peak_mem_mb",
    "wall_time",
    *("step_speedup", "step_speedup_lo", "step_speedup_hi", "calibration_time_s"),  # measured: calibration.py
)

pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (conftest): float sums depend on it


def settings(name: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainSettings:
    """The contract's config of strategy `name`."""
    return TrainSettings.load(None, [*BASE, f"strategy={name}", *overrides])


def _history(loop: TrainingLoop) -> list[dict]:
    """The per-epoch records without the timings (which no two runs share)."""
    return [{k: v for k, v in h.items() if k not in TIMING} for h in loop.state.history]


def _weights(loop: TrainingLoop) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(loop.wrapped).state_dict().items()}


def _assert_same_run(a: TrainingLoop, b: TrainingLoop, *, what: str) -> None:
    """Two runs of one config gave the same epochs, outcome and final weights, exactly."""
    assert _history(a) == _history(b), what
    sa, sb = a.summary(), b.summary()
    for key in (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.RANKS, M.FINAL_VAL_ACC, M.BEST_VAL_ACC):
        assert sa[key] == sb[key], (what, key)
    assert a.state.step == b.state.step and a.state.phase is b.state.phase, what
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys(), what
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{what}: final weights differ"


# -- the checks, by strategy name ---------------------------------------------------------------------


def check_declaration(name: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """The class's declaration: phases, section, metrics, help and summary lines."""
    cls = get(name)
    assert cls.name == name and cls.description, name
    assert cls.phases[0] is FULL and len({p.index for p in cls.phases}) == len(cls.phases)
    assert cls.fork_mode in ("scratch", "trunk", "fork")
    if cls.section is not None:
        assert dataclasses.is_dataclass(cls.section_class) and cls.section_doc
        keys = {row[0]: row[3] for row in field_docs()}
        for f in dataclasses.fields(cls.section_class):
            assert keys.get(f"{cls.section}.{f.name}"), f"{cls.section}.{f.name} lacks a doc"
        assert cls.section in cls.uses
    cfg = settings(name, overrides)
    fresh = build(cfg).event_metrics()
    assert fresh == {M.SWITCH_EPOCH: -1, M.FREEZE_EPOCH: -1, **cls.metrics}, "declared metrics and defaults"
    assert f"{name} (" in next(row[3] for row in field_docs() if row[0] == "strategy")
    assert isinstance(cls.summary_line({"history": [fresh]}), str)


def check_config_round_trip(name: str, overrides: list[str] | tuple[str, ...], tmp_path: Path) -> None:
    """to_dict/from_dict, a YAML file and the dotted keys give the same config back."""
    cfg = settings(name, overrides)
    assert TrainSettings.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert TrainSettings.load(path) == cfg
    assert TrainSettings.load(None, [f"{k}={json.dumps(v)}" for k, v in cfg.flat().items()]) == cfg
    assert set(cfg.flat()) == set(valid_keys())
    section = get(name).section
    if section is not None:
        assert getattr(cfg, section) == cfg.strategy_sections[section]
        assert cfg.replace(**{"seed": 1}).strategy_sections[section] == cfg.strategy_sections[section]


def check_resume(name: str, overrides: list[str] | tuple[str, ...], stop_after: int, reference: TrainingLoop) -> None:
    """A run stopped after epoch `stop_after` and resumed from its last checkpoint equals `reference`."""
    cfg = settings(name, overrides)
    first = LocalRuntime(stop_after_epoch=stop_after)
    with pytest.raises(StopTraining):
        TrainingLoop(cfg, first).run()
    resumed = TrainingLoop(cfg, LocalRuntime(resume_from=first.checkpoints[-1]))
    summary = resumed.run()
    assert summary["resumed_at"] == [stop_after + 1]
    _assert_same_run(reference, resumed, what=f"{name} resumed after epoch {stop_after}")
    assert resumed.strategy.state_dict() == reference.strategy.state_dict()


def trunk_run(folder: Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainingLoop:
    """The full-training trunk of a fork-mode sweep of the contract's config (a checkpoint every epoch)."""
    loop = TrainingLoop(settings("full", overrides), LocalRuntime(), trunk=fork.TrunkWriter(folder, every=1))
    loop.run()
    return loop


def check_fork(name: str, overrides: list[str] | tuple[str, ...], folder: Path, reference: TrainingLoop) -> None:
    """Where the strategy says its trials start from a finished trunk in `folder`: the same run as `reference`."""
    cfg = settings(name, overrides)
    plan = fork.plan_fork(cfg, folder)
    assert plan is not None and plan.mode == get(name).fork_mode, (name, plan)
    if plan.mode == "scratch":
        return
    history = fork.read_history(folder)
    if plan.mode == "trunk":  # its result is the trunk's: the trunk trained exactly its epochs
        for key in (M.TRAIN_LOSS, M.VAL_LOSS, M.VAL_ACC, M.PHASE, M.LR, M.TRAINABLE_PARAMS):
            assert [h[key] for h in history] == [h[key] for h in reference.state.history], (name, key)
        return
    start = plan.fork_epoch
    forked = TrainingLoop(
        cfg,
        LocalRuntime(),
        fork=ForkStart(
            state=load_state_file(fork.checkpoint_path(folder, start)), snapshots=fork.snapshots(history[:start])
        ),
    )
    summary = forked.run()
    assert forked.state.forked_from == start and summary["epochs_trained"] == EPOCHS - start
    _assert_same_run(reference, forked, what=f"{name} forked at epoch {start}")


# -- the shipped strategies (and any other registered when this module is collected) ------------------

NAMES = list(REGISTRY)


@pytest.fixture(scope="module")
def references(one_thread):
    """Each strategy's uninterrupted run, built on first use."""
    cache: dict[str, TrainingLoop] = {}

    def get_reference(name: str) -> TrainingLoop:
        if name not in cache:
            cache[name] = TrainingLoop(settings(name, QUICK.get(name, [])), LocalRuntime())
            cache[name].run()
        return cache[name]

    return get_reference


@pytest.fixture(scope="module")
def trunk(tmp_path_factory, one_thread):
    """One finished full-training trunk on the contract's base config."""
    folder = tmp_path_factory.mktemp("trunk")
    trunk_run(folder)
    return folder


@pytest.mark.parametrize("name", NAMES)
def test_declaration(name):
    check_declaration(name, QUICK.get(name, []))


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name, tmp_path):
    check_config_round_trip(name, QUICK.get(name, []), tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_every_phase_is_visited(name, references):
    # the contract's runs exercise the whole strategy: every phase it declares trains at least one epoch
    phases = {h[M.PHASE] for h in references(name).state.history}
    assert phases == {p.value for p in get(name).phases}, phases


@pytest.mark.parametrize("name", NAMES)
def test_resume_equals_the_uninterrupted_run(name, references):
    check_resume(name, QUICK.get(name, []), 1, references(name))


@pytest.mark.parametrize("name", NAMES)
def test_fork_equals_the_run_from_scratch(name, references, trunk):
    check_fork(name, QUICK.get(name, []), trunk, references(name))


@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_transformers(name, tmp_path):
    loop = TrainingLoop(settings(name, QUICK.get(name, [])), LocalRuntime())  # its own: the export changes the model
    loop.run()
    check_export(name, loop, tmp_path)
