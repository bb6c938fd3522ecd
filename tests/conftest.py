"""Shared fixtures: one local Ray for the session's Ray tests, tiny fast configs."""

from __future__ import annotations

import os

import pytest

# a switch within a few epochs on digits: thresholds wide open, short windows, on the 4-layer vit-digits
FAST_SWITCH = ["prelora.k=2", "prelora.m=1", "prelora.tau=50", "prelora.zeta=50", "prelora.warmup=1", "model.preset=vit-digits"]


@pytest.fixture(scope="session")
def ray_local():
    """ray.init(num_cpus=2) once for every Ray test, with the fast Train health check."""
    import ray

    from prelora_ray.orchestration.train import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's in-process runs: steady on a busy 2-CPU box, and the same
    count everywhere a result is compared exactly (float sums depend on it: a fork and its trunk too)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sqlite_uri(tmp_path):
    """A fresh MLflow sqlite store in the test's temp dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _no_fault_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PRELORA_FAULT_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="session")
def two_sweeps(tmp_path_factory):
    """Two real small sweeps in one MLflow store, via the CLI, 3 trials + baseline each, their trials training in their
    Tune trial processes (trial_executor tune: no TorchTrainer start-ups): "small" (deterministic) and "other" (--verbose).
    A TorchTrainer per trial (trial_executor ray_train) is test_fork_sweep.py's `fork_sweep`."""
    from tests.test_tune import _space, _tune

    root = tmp_path_factory.mktemp("sweeps")
    outputs = {}
    for name, seed in (("small", 1), ("other", 2)):
        extra = {"trial_executor": "tune", **({"base": {"deterministic": True}} if name == "small" else {})}
        proc = _tune(root, str(_space(root, name, 3, seed=seed, **extra)), *(["--verbose"] if name == "other" else []))
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
        outputs[name] = out
    return root, outputs
