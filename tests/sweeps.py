"""Helpers of the tests that run sweeps: a small search space on digits, `prelora-ray tune` in a process of its own,
the sweep's runs read back from MLflow, faults for the driver's environment, and a run checked against the same
config trained from scratch in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml

from prelora_ray import metrics as M
from tests.servers import kill_session


def sweep_space(
    tmp_path: Path, name: str, num_samples: int, epochs: int = 4, seed: int = 1, *, base: dict | None = None, **top
) -> Path:
    """A small sweep on digits.

    `base` adds to the base config, `top` to the file's top-level keys (e.g. trial_executor).
    """
    data = {
        "name": name,
        "base": {
            "epochs": epochs,
            "prelora": {"k": 2, "m": 1, "warmup": 1},
            "cluster": {"num_workers": 1, "cpus_per_worker": 1},
            "model": {"preset": "vit-digits"},
            **(base or {}),
        },
        "parameters": {
            "prelora.tau": {"type": "loguniform", "low": 20.0, "high": 80.0},
            "prelora.zeta": {"type": "uniform", "low": 20.0, "high": 80.0},
            "prelora.warmup": {"type": "int", "low": 0, "high": 2},
            "prelora.r_min": {"type": "categorical", "values": [1, 2]},
            "prelora.r_max": {"type": "categorical", "values": [4, 8]},
        },
        "objectives": [{"metric": "final_val_acc", "mode": "max"}, {"metric": "mean_epoch_time_s", "mode": "min"}],
        "sampler": {"type": "random", "seed": seed},
        "num_samples": num_samples,
        "max_concurrent": 2,
        "baseline": True,
        **top,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_tune(
    tmp_path: Path, *args: str, tracking: str | None = None, storage: str | None = None, **kwargs
) -> subprocess.Popen:
    """`prelora-ray tune` in a process of its own, tracked in `tracking` (default: mlflow.db in tmp_path), storage in
    `storage` (default: tmp_path/ray)."""
    cmd = [
        sys.executable,
        "-m",
        "prelora_ray.cli",
        "tune",
        *args,
        "--tracking-uri",
        tracking or f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--storage",
        storage or str(tmp_path / "ray"),
    ]
    return subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs
    )


def sweep_runs(tmp_path: Path, sweep: str, uri: str | None = None):
    client = mlflow.tracking.MlflowClient(uri or f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prelora-ray")
    if exp is None:
        return client, None, []
    parents = client.search_runs(
        [exp.experiment_id], f"tags.`prelora.role` = 'parent' and tags.`prelora.sweep` = '{sweep}'"
    )
    if not parents:
        return client, None, []
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'", max_results=1000
    )
    return client, parents[0], children


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session at once, as a lost machine: Ray's worker processes (the
    trunk's task, the trials) run in process groups of their own, so killing the driver's group would leave them
    training on for a few seconds."""
    kill_session(proc.pid)
    proc.wait()


def wait_for(proc: subprocess.Popen, condition, what: str, timeout_s: float = 600):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        assert proc.poll() is None, f"the sweep ended before {what}: " + proc.stdout.read()[-3000:]
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def curve(client, run) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_acc"))


def fault_env(tmp_path, *, epoch: int, mode: str, run: str) -> dict[str, str]:
    """The driver's environment injecting one fault (marker file `fired`: once) into the runs `run` selects."""
    return {
        **os.environ,
        "PRELORA_FAULT_EPOCH": str(epoch),
        "PRELORA_FAULT_MODE": mode,
        "PRELORA_FAULT_RUN": run,
        "PRELORA_FAULT_MARKER": str(tmp_path / "fired"),
    }


def history(client, run_id: str, key: str = M.VAL_ACC) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def assert_equals_from_scratch(root, client, origin) -> None:
    from prelora_ray.config import TrainSettings
    from prelora_ray.runtime import LocalRuntime
    from prelora_ray.trainer import TrainingLoop

    with open(client.download_artifacts(origin.info.run_id, "config.yaml", str(root))) as f:
        cfg = TrainSettings.from_dict(yaml.safe_load(f))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial's worker (cpus_per_worker 1)
    try:
        loop = TrainingLoop(cfg.replace(**{"tracking.enabled": False, "name": None}), LocalRuntime())
        summary = loop.run()
    finally:
        torch.set_num_threads(threads)
    assert summary[M.SWITCH_EPOCH] == int(origin.data.metrics[M.SWITCH_EPOCH])
    assert json.dumps(summary[M.RANKS], sort_keys=True) == json.dumps(
        json.loads(open(client.download_artifacts(origin.info.run_id, "ranks.json", str(root))).read())[M.RANKS],
        sort_keys=True,
    )
    assert summary[M.FINAL_VAL_ACC] == origin.data.metrics[M.FINAL_VAL_ACC]
    assert summary[M.BEST_VAL_ACC] == origin.data.metrics[M.BEST_VAL_ACC]
    assert [v for _, v in history(client, origin.info.run_id, M.VAL_LOSS)] == [
        h[M.VAL_LOSS] for h in loop.state.history
    ]


def val_correct(client, run) -> np.ndarray:
    """A run's val_correct.npy (each validation image right or wrong at its last epoch)."""
    with tempfile.TemporaryDirectory() as folder:
        hits = np.load(client.download_artifacts(run.info.run_id, M.VAL_CORRECT_ARTIFACT, folder))
    assert hits.size == run.data.metrics[M.VAL_N]
    return hits
