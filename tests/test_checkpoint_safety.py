"""Checkpoints are plain data: they load with torch.load(weights_only=True), and a file that holds
a pickled object is refused by name, never run."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from prelora_ray import metrics as M
from prelora_ray.checkpoint import CheckpointError, load_state_file
from prelora_ray.config import TrainSettings
from prelora_ray.runtime import LocalRuntime
from prelora_ray.trainer import TrainingLoop, rng_state, set_rng_state

SHORT_RUN = [
    "tracking.enabled=false",
    "epochs=3",
    "prelora.k=2",
    "prelora.m=1",
    "prelora.tau=50",
    "prelora.zeta=50",
    "prelora.warmup=1",
]


class NotPlainData:
    """Any class: its pickle names a global that weights_only refuses."""


def _cfg() -> TrainSettings:
    return TrainSettings.load(None, SHORT_RUN)


def _same(a: Any, b: Any) -> bool:
    """Deep equality over what a checkpoint holds (tensors compared exactly)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN equals NaN here


@pytest.fixture(scope="module")
def reference() -> Iterator[tuple[TrainingLoop, LocalRuntime, dict]]:
    """One short uninterrupted run (switch at epoch 1, freeze at 2) with its in-memory checkpoints."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # exact resumes compare floats bit for bit
    runtime = LocalRuntime()
    loop = TrainingLoop(_cfg(), runtime)
    summary = loop.run()
    yield loop, runtime, summary
    torch.set_num_threads(before)


def test_every_checkpoint_of_a_run_loads_with_weights_only(reference, tmp_path):
    _, runtime, summary = reference
    phases = [c["loop"]["phase"] for c in runtime.checkpoints]
    assert "full" in phases and len(set(phases)) > 1, phases  # before and after the switch
    assert summary[M.SWITCH_EPOCH] >= 0
    for i, ckpt in enumerate(runtime.checkpoints):
        path = tmp_path / f"state{i}.pt"
        torch.save(ckpt, path)
        assert _same(load_state_file(path), ckpt), f"checkpoint {i} ({phases[i]}) changed on the round trip"


@pytest.mark.parametrize("index", [0, 1], ids=["before-switch", "after-switch"])
def test_resuming_from_a_safely_loaded_checkpoint_is_exact(reference, tmp_path, index):
    ref_loop, ref_runtime, ref = reference
    path = tmp_path / "state.pt"
    torch.save(ref_runtime.checkpoints[index], path)
    loop = TrainingLoop(_cfg(), LocalRuntime(resume_from=load_state_file(path)))
    summary = loop.run()
    for key in (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.RANKS, M.FINAL_VAL_ACC, M.BEST_VAL_ACC):
        assert summary[key] == ref[key], key
    assert summary["resumed_at"] == [ref_runtime.checkpoints[index]["loop"]["epoch"]]
    ref_state, state = ref_loop.model.state_dict(), loop.model.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state), "final weights differ"


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leaves numpy's cached Gaussian set: it must survive too
    torch.manual_seed(3)
    path = tmp_path / "rng.pt"
    torch.save({"rng": rng_state()}, path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(load_state_file(path)["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_a_file_holding_a_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "evil": NotPlainData()}, path)
    with pytest.raises(CheckpointError, match="pickled") as err:
        load_state_file(path)
    message = str(err.value)
    assert str(path) in message and "not plain data" in message and "refused" in message
    assert "NotPlainData" in message  # says what it refused


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint"], ids=["missing", "empty", "garbage"])
def test_a_missing_or_corrupt_file_is_named(tmp_path, content):
    path = tmp_path / "state.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="missing or corrupt") as err:
        load_state_file(path)
    assert str(path) in str(err.value)


def test_a_truncated_checkpoint_is_corrupt_not_refused(reference, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(reference[1].checkpoints[-1], path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="missing or corrupt"):
        load_state_file(path)


def test_the_loader_imports_no_ray():
    code = "import sys, prelora_ray.checkpoint; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
