"""Faults injected into real runs: workers killed mid-epoch, MLflow away, corrupt checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest

from prelora_ray.orchestration.train import run_train
from prelora_ray.orchestration.worker import CheckpointError, load_checkpoint_dir
from prelora_ray.tracking import MlflowSink, ensure_experiment, start_run
from tests.builders import ray_run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    return run_train(ray_run_config(tmp, f"sqlite:///{tmp / 'mlflow.db'}", "rel", "name=reference"))


@pytest.mark.parametrize("epoch", [0, 3], ids=["before-switch", "after-switch"])
def test_worker_killed_mid_epoch_resumes_from_last_checkpoint(uninterrupted, tmp_path, sqlite_uri, monkeypatch, epoch):
    assert uninterrupted["switch_epoch"] == 1  # so epoch 0 is before the switch and epoch 3 after it
    monkeypatch.setenv("PRELORA_FAULT_EPOCH", str(epoch))
    # os._exit(1) before batch 15 of that epoch's 23: mid-epoch, and late enough that Ray Train's controller (it
    # polls every 0.2 s) has registered the previous epoch's checkpoint on a loaded machine (before batch 5, once not)
    monkeypatch.setenv("PRELORA_FAULT_BATCH", "15")
    monkeypatch.setenv("PRELORA_FAULT_MARKER", str(tmp_path / "fired"))
    summary = run_train(ray_run_config(tmp_path, sqlite_uri, "rel", "name=faulty", "cluster.max_failures=1"))
    assert (tmp_path / "fired").exists()
    # restarted from the last checkpoint (the end of the previous epoch), not from scratch
    assert summary["resumed_at"] == [epoch] if epoch > 0 else summary["resumed_at"] in ([], [0])
    for key in ("switch_epoch", "freeze_epoch", "ranks", "final_val_acc"):
        assert summary[key] == uninterrupted[key], key
    assert [e["epoch"] for e in summary["history"]] == list(range(6))
    client = mlflow.tracking.MlflowClient(sqlite_uri)
    runs = client.search_runs([client.get_experiment_by_name("rel").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one MLflow run, not two
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc"))[-1] == 5


def test_node_removed_during_a_sweep_its_trial_resumes_elsewhere_and_the_sweep_finishes(tmp_path):
    """A 3-node fake cluster loses a node hosting a trial's worker: every trial still finishes, once."""
    import optuna

    script = Path(__file__).with_name("node_removal_sweep.py")
    # its own Ray temp dir (short: socket paths), so this cluster never meets the session's local Ray
    ray_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(script.parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail("the sweep did not finish after the node was removed:\n" + out[-4000:])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, out[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["finished"] and result["error"] is None, result["error"] or out[-4000:]
    assert "RayTrainWorker" in result["actors_before"][result["victim"]]
    assert (
        result["victim"] not in result["alive_nodes_after"] and len(result["alive_nodes_after"]) == 3
    )  # Ray saw it go
    # the sweep ends with all its trials, each once, each finished
    table = result["table"]
    assert len(table) == 3 and len({r["run_name"] for r in table}) == 3
    assert all(r["status"] == "FINISHED" and r["final_val_acc"] > 0.3 for r in table)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("prelora-ray").experiment_id], "tags.`prelora.role` = 'trial'"
    )
    assert sorted(r.info.run_name for r in runs) == sorted(r["run_name"] for r in table)  # no second run for the retry
    # exactly the trial whose worker was on the lost node went on from a checkpoint (not from epoch 0)
    resumed = [r for r in runs if "prelora.resumed_at" in r.data.tags]
    assert len(resumed) == 1, [r.data.tags for r in runs]
    assert json.loads(resumed[0].data.tags["prelora.resumed_at"])[0] > 0
    steps = sorted({m.step for m in client.get_metric_history(resumed[0].info.run_id, "val_acc")})
    assert steps == list(range(12))
    study = optuna.load_study(study_name="noderm", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3


def test_truncated_checkpoint_falls_back_to_the_previous_one(ray_local, tmp_path, sqlite_uri):
    cfg = ray_run_config(tmp_path, sqlite_uri, "rel", "name=ck", "epochs=3", "cluster.checkpoints_to_keep=3")
    first = run_train(cfg)
    folders = sorted(p for p in (tmp_path / "ray" / "ck").glob("checkpoint_*") if p.is_dir())
    assert len(folders) == 3
    state = folders[-1] / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match=str(state)):
        load_checkpoint_dir(folders[-1])
    again = run_train(cfg)  # same name: resumes; the newest checkpoint is bad -> the one before (end of epoch 1)
    assert again["resumed_at"] == [2]
    assert again["switch_epoch"] == first["switch_epoch"] and again["ranks"] == first["ranks"]
    assert again["final_val_acc"] == first["final_val_acc"]


def test_mlflow_unreachable_at_start_is_a_clear_error_before_training(tmp_path):
    probe = (
        "import sys; from prelora_ray.cli import main; rc = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules; sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, "train", "--tracking-uri", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "tracking.uri" in proc.stderr and "not reachable" in proc.stderr


def test_mlflow_going_away_mid_run_keeps_metrics_and_sends_them_later(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    exp = ensure_experiment(uri, "outage")
    run_id = start_run(uri, exp, "r", params={}, tags={})
    sink = MlflowSink(uri, run_id)
    sink.log_metrics({"val_acc": 0.5}, step=0)
    shutil.move(store, tmp_path / "away")  # the store disappears
    sink.log_metrics({"val_acc": 0.6}, step=1)
    sink.log_metrics({"val_acc": 0.7}, step=2)
    assert len(sink.pending) == 2  # kept locally, training went on
    shutil.move(tmp_path / "away", store)  # back
    sink.log_metrics({"val_acc": 0.8}, step=3)
    assert sink.pending == []
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)]


def _ensure_at_once(uri: str, barrier) -> str:
    barrier.wait()  # every process opens the fresh store at the same moment
    return ensure_experiment(uri, "together")


def test_runs_started_at_once_on_a_fresh_sqlite_store_all_get_the_experiment(tmp_path):
    """Two sweeps launched together on a new sqlite store: MLflow's table creation must not race."""
    import concurrent.futures
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(3)
        with concurrent.futures.ProcessPoolExecutor(3, mp_context=ctx) as pool:
            ids = list(pool.map(_ensure_at_once, [uri] * 3, [barrier] * 3))
    assert len(set(ids)) == 1
    assert mlflow.tracking.MlflowClient(uri).get_experiment(ids[0]).name == "together"
