"""A fifth strategy from this file alone, with no edit in prelora_ray/: `head_only`, full training and then
only the classifier, with its own config section (`head_only.start_epoch`), phase (`head`, stored number
100) and metric (`head_only_epochs`).

It trains and resumes (LocalRuntime), exports a plain ViT that transformers loads, passes the strategy
contract of test_strategy_contract.py, and a real `prelora-ray tune` sweeps it on a local Ray in fork mode.
Here it is registered with `register_strategy` for the module's tests (and removed after, so the other
modules see the shipped four); the sweep's processes find it through the entry-point group
`prelora_ray.strategies`, declared by a distribution's metadata the test writes into a folder on their
PYTHONPATH: that is how Ray's workers, which import afresh, get it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from prelora_ray import metrics as M
from prelora_ray.fields import check, setting
from prelora_ray.models import in_param_group
from prelora_ray.strategies import FULL, Phase, Strategy, TrunkFork, register_strategy, unregister_strategy

ROOT = Path(__file__).resolve().parents[1]
HEAD_EPOCHS = "head_only_epochs"


# -- the toy strategy: everything about it is here ---------------------------------------------------


def _head_trains(name: str, settings: Any) -> bool:
    """HEAD: the classifier's weight and bias, nothing else."""
    return in_param_group(name, "head")


HEAD = Phase.declare("head", 100, trains=_head_trains)


@dataclass(kw_only=True)
class HeadOnlySettings:
    """`strategy: head_only` (tests/test_toy_strategy.py): full training, then only the classifier."""

    start_epoch: int = setting(2, "First epoch (0-based) in which only the classifier trains; FULL before it.")

    def __post_init__(self) -> None:
        ok = isinstance(self.start_epoch, int) and self.start_epoch >= 1
        check(ok, "head_only.start_epoch", self.start_epoch, "an integer >= 1")


class HeadOnly(Strategy):
    """FULL for `head_only.start_epoch` epochs, then HEAD: the rest frozen, the classifier trains on."""

    name = "head_only"
    description = "full, then only the classifier from head_only.start_epoch"
    section = "head_only"
    section_class = HeadOnlySettings
    section_doc = "The toy strategy of tests/test_toy_strategy.py."
    uses = ("head_only",)
    phases = (FULL, HEAD)
    metrics = {HEAD_EPOCHS: 0}
    fork_mode = "fork"  # its epochs before start_epoch are the trunk's full training
    fork_keys_text = "head_only.*"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """HEAD must start within the run."""
        start = cfg.head_only.start_epoch
        check(start < cfg.epochs, "head_only.start_epoch", start, f"< epochs ({cfg.epochs})")

    @classmethod
    def summary_line(cls, summary: dict[str, Any]) -> str:
        """How many epochs trained the classifier alone."""
        last = (summary.get("history") or [{}])[-1]
        return f"strategy head_only: {last.get(HEAD_EPOCHS, 0)} epochs of the classifier alone"

    @classmethod
    def _acts_after_fork(cls, key: str) -> bool:
        return key.startswith("head_only.")

    @classmethod
    def trunk_fork(cls, cfg: Any, history: Sequence[dict[str, Any]]) -> TrunkFork | None:
        """From the trunk's checkpoint at (or before) the start of HEAD."""
        return TrunkFork(mode="fork", until=cfg.head_only.start_epoch)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.settings = cfg.head_only
        self.head_epochs = 0

    def prepare(self, loop: Any, phase: Phase) -> None:
        """requires_grad as the phase says (nothing to re-inject: no adapters)."""
        from prelora_ray.adapters.model import set_trainable

        set_trainable(loop.model, phase, self.settings)

    def after_epoch(self, loop: Any) -> None:
        """Count HEAD's epochs; enter HEAD at the end of the epoch before `start_epoch`."""
        from prelora_ray.adapters.model import set_trainable

        if loop.state.phase is HEAD:
            self.head_epochs += 1
        elif loop.state.epoch + 1 == self.settings.start_epoch:
            set_trainable(loop.model, HEAD, self.settings)
            loop.state.phase = HEAD
            loop.rebuild()

    def event_metrics(self) -> dict[str, Any]:
        """Its one metric beside the switch and freeze epochs every strategy reports."""
        return {**super().event_metrics(), HEAD_EPOCHS: self.head_epochs}

    def state_dict(self) -> dict[str, Any]:
        """The HEAD epochs so far."""
        return {"head_epochs": self.head_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict."""
        self.head_epochs = int(state["head_epochs"])

    def fork_state(self, snapshots: list, start: int) -> dict[str, Any]:
        """A fork starts before HEAD: none yet."""
        return {"head_epochs": 0}


# -- in this process: registered for this module's tests ---------------------------------------------

DIGITS = ["epochs=4", "deterministic=true", "model.preset=vit-digits", "tracking.enabled=false", "seed=1"]


@pytest.fixture(scope="module")
def head_only(one_thread):
    """The toy registered (its phase and config section with it), for this module only."""
    register_strategy(HeadOnly)
    yield HeadOnly
    unregister_strategy("head_only")


def test_it_trains_then_only_the_classifier_moves(head_only):
    from prelora_ray.config import TrainSettings
    from prelora_ray.runtime import LocalRuntime
    from prelora_ray.trainer import TrainingLoop

    cfg = TrainSettings.load(None, [*DIGITS, "strategy=head_only", "head_only.start_epoch=2"])
    assert Phase("head") is HEAD and Phase.HEAD is HEAD and M.PHASE_INDEX  # a known phase while registered
    runtime = LocalRuntime()
    loop = TrainingLoop(cfg, runtime)
    summary = loop.run()
    assert [r[M.PHASE] for r in runtime.reports] == ["full", "full", "head", "head"]
    assert [r[M.PHASE_INDEX] for r in runtime.reports] == [0, 0, 100, 100]
    assert [r[HEAD_EPOCHS] for r in runtime.reports] == [0, 0, 1, 2]
    assert {n for n, p in loop.model.named_parameters() if p.requires_grad} == {
        "classifier.weight",
        "classifier.bias",
    }
    at_switch = runtime.checkpoints[1]["model"]  # the state at the end of epoch 1, when HEAD began
    final = loop.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in at_switch.items() if not k.startswith("classifier."))
    assert not torch.equal(final["classifier.weight"], at_switch["classifier.weight"])
    assert summary[M.SWITCH_EPOCH] == -1 and runtime.reports[-1][M.FREEZE_EPOCH] == -1
    assert HeadOnly.summary_line(summary | {"history": loop.state.history}).startswith("strategy head_only: 2 epochs")


def test_it_exports_a_plain_vit_that_transformers_loads(head_only, tmp_path):
    from prelora_ray.config import TrainSettings
    from prelora_ray.runtime import LocalRuntime
    from prelora_ray.trainer import TrainingLoop
    from tests.builders import check_export

    loop = TrainingLoop(TrainSettings.load(None, [*DIGITS, "strategy=head_only"]), LocalRuntime())
    loop.run()
    check_export("head_only", loop, tmp_path)


def test_it_passes_the_strategy_contract(head_only, tmp_path):
    from prelora_ray.runtime import LocalRuntime
    from prelora_ray.trainer import TrainingLoop
    from tests import test_strategy_contract as contract

    overrides = ["head_only.start_epoch=2"]
    contract.check_declaration("head_only", overrides)
    contract.check_config_round_trip("head_only", overrides, tmp_path)
    reference = TrainingLoop(contract.settings("head_only", overrides), LocalRuntime())
    reference.run()
    contract.check_resume("head_only", overrides, 1, reference)  # before HEAD
    contract.check_resume("head_only", overrides, 3, reference)  # in HEAD
    contract.trunk_run(tmp_path / "trunk")
    contract.check_fork("head_only", overrides, tmp_path / "trunk", reference)


def test_its_section_and_phase_leave_with_it(head_only):
    from prelora_ray.config import TrainSettings, valid_keys

    assert "head_only.start_epoch" in valid_keys() and "head_only" in TrainSettings().strategy_sections
    unregister_strategy("head_only")
    try:
        assert "head_only.start_epoch" not in valid_keys()
        with pytest.raises(ValueError, match="phase 'head' is unknown"):
            Phase("head")
        with pytest.raises(ValueError, match="strategy='head_only' is invalid"):
            TrainSettings.load(None, ["strategy=head_only"])
    finally:
        register_strategy(HeadOnly)
    with pytest.raises(ValueError, match="head_only.start_epoch=0 is invalid: an integer >= 1"):
        TrainSettings.load(None, ["head_only.start_epoch=0"])
    with pytest.raises(ValueError, match=r"head_only.start_epoch=4 is invalid: < epochs \(4\)"):
        TrainSettings.load(None, ["strategy=head_only", "epochs=4", "head_only.start_epoch=4"])


# -- in other processes: through the entry point ------------------------------------------------------


def plugin_env(folder: Path) -> dict[str, str]:
    """An environment whose Python finds the toy through the entry-point group, as an installed package's would.

    The distribution's metadata (`toy_strategies-0.1.dist-info` with its entry_points.txt) is all `pip install`
    would add; the class itself is this file's, importable as `tests.test_toy_strategy` from the repository.
    """
    info = folder / "toy_strategies-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-strategies\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[prelora_ray.strategies]\nhead_only = tests.test_toy_strategy:HeadOnly\n")
    path = os.pathsep.join([str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path}


def test_the_entry_point_registers_it_in_a_fresh_process(tmp_path):
    code = (
        "from prelora_ray.strategies import REGISTRY; from prelora_ray.config import TrainSettings, strategy_names; "
        "cfg = TrainSettings.load(None, ['strategy=head_only', 'head_only.start_epoch=3']); "
        "print(list(REGISTRY), cfg.head_only.start_epoch, strategy_names())"
    )
    env = plugin_env(tmp_path / "plugins")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("]")[0] == "['prelora', 'full', 'relora_prelora', 'lte', 'head_only'"
    assert " 3 (" in out.stdout


SWEEP = {
    "name": "toy",
    "base": {
        "strategy": "head_only",
        "epochs": 4,
        "deterministic": True,
        "seed": 1,
        "model": {"preset": "vit-digits"},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1},
    },
    "parameters": {"head_only.start_epoch": {"type": "categorical", "values": [1, 2, 3]}},
    "sampler": {"type": "random", "seed": 0},
    "num_samples": 2,
    "max_concurrent": 1,
    "trial_executor": "tune",
    "fork": True,
}


@pytest.mark.slow
def test_a_sweep_forks_its_trials_from_the_trunk_on_a_local_ray(head_only, tmp_path):
    from prelora_ray.config import TrainSettings
    from prelora_ray.runtime import LocalRuntime
    from prelora_ray.trainer import TrainingLoop
    from tests.sweeps import history, run_tune, sweep_runs

    space = tmp_path / "toy.yaml"
    space.write_text(yaml.safe_dump(SWEEP))
    proc = run_tune(tmp_path, str(space), env=plugin_env(tmp_path / "plugins"))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert "fork mode" in out, out[-3000:]
    client, parent, children = sweep_runs(tmp_path, "toy")
    trials = [c for c in children if c.data.tags[M.ROLE_TAG] == "trial"]
    assert len(trials) == 2 and all(c.info.status == "FINISHED" for c in trials), [c.data.tags for c in children]
    trained = []
    for trial in trials:
        start = int(trial.data.params["head_only.start_epoch"])
        assert trial.data.params["strategy"] == "head_only" and trial.data.tags[M.FORK_EPOCH_TAG] == str(start)
        if M.FORK_REUSED_TAG not in trial.data.tags:  # a twin of an earlier trial reuses its result
            assert trial.data.tags[M.EPOCHS_TRAINED_TAG] == str(SWEEP["base"]["epochs"] - start)
            trained.append(trial)
        assert trial.data.metrics[HEAD_EPOCHS] == SWEEP["base"]["epochs"] - start
        assert [v for _, v in history(client, trial.info.run_id, HEAD_EPOCHS)][:start] == [0] * start
    assert trained, "no trial trained"

    # a forked trial equals the same config trained from scratch here (one thread, as its worker)
    trial = trained[0]
    with open(client.download_artifacts(trial.info.run_id, "config.yaml", str(tmp_path))) as f:
        cfg = TrainSettings.from_dict(yaml.safe_load(f))
    loop = TrainingLoop(cfg.replace(**{"tracking.enabled": False, "name": None}), LocalRuntime())
    summary = loop.run()
    assert summary[M.FINAL_VAL_ACC] == trial.data.metrics[M.FINAL_VAL_ACC]
    for key in (M.VAL_LOSS, M.TRAIN_LOSS, M.PHASE_INDEX, HEAD_EPOCHS):
        assert [v for _, v in history(client, trial.info.run_id, key)] == [h[key] for h in loop.state.history], key
    assert json.loads(trial.data.tags["sampled"]) == {"head_only.start_epoch": cfg.head_only.start_epoch}
