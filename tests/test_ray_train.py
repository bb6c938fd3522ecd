"""Ray Train end to end: 2 workers agree, MLflow gets the run, a killed run resumes exactly."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from prelora_ray.orchestration.train import run_train
from tests.builders import ray_run_config

pytestmark = pytest.mark.slow


def test_two_workers_reach_identical_switch_and_ranks_and_identical_weights_after_each_relora_merge(
    ray_local, tmp_path, sqlite_uri
):
    """relora_prelora, whose per-layer switch is prelora's: one 2-worker run checks both strategies' sync points."""
    cfg = ray_run_config(
        tmp_path,
        sqlite_uri,
        "test",
        "cluster.num_workers=2",
        "cluster.cpus_per_worker=1",
        "name=two-workers",
        "strategy=relora_prelora",
        "epochs=7",
        "optim.lr_warmup_epochs=1",
        "relora.start_epoch=1",
        "relora.merge_every=10",
        "relora.warmup_steps=2",
        "relora.rewarm_steps=4",
        "relora.rank=4",
    )
    summary = run_train(cfg)
    workers = summary["all_workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    # each worker's checksum of its weights after every merge: all equal (DDP and the merge keep them in sync)
    merges = summary["history"][-1]["relora_merges"]
    checks = workers[0]["sync_checks"]
    assert merges >= 2 and len(checks) == merges and len(set(checks)) == merges  # the weights moved between merges
    assert workers[1]["sync_checks"] == checks
    assert summary["switch_epoch"] >= 0, "the wide-open test must pass within 7 epochs"
    assert all(w["switch_epoch"] == summary["switch_epoch"] for w in workers)
    assert all(w["freeze_epoch"] == summary["freeze_epoch"] for w in workers)
    assert all(w["ranks"] == summary["ranks"] for w in workers)
    # each worker's own (pre-broadcast) decision at the switch agreed with rank 0's
    switch_decisions = [d for d in summary["decisions"] if any(w["passed"] for w in d["workers"])]
    assert switch_decisions and all(len(d["workers"]) == 2 for d in switch_decisions)
    assert all(w == d["workers"][0] for d in switch_decisions for w in d["workers"])
    # the history covers every epoch and the phases went full -> warmup -> lora
    phases = [e["phase"] for e in summary["history"]]
    assert phases[0] == "full" and phases[1] == "relora" and "warmup" in phases and phases[-1] == "lora"
    # each worker scored every other image; put back in the data set's order they are the exported model's hits
    # (up to a near-tie flipped by the merge's float rounding: a wrong order would miss about a fifth of them)
    from transformers import ViTForImageClassification

    from prelora_ray.data import build_datasets
    from prelora_ray.significance import unpack_hits

    val = build_datasets(cfg.data).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1] for i in range(len(val))])
    model = ViTForImageClassification.from_pretrained(summary["merged_model_path"]).eval()
    with torch.no_grad():
        hits = (model(pixel_values=x).logits.argmax(-1) == y).numpy()
    logged = unpack_hits(summary["val_hits"])
    assert logged.size == summary["val_n"] == len(val) and int(logged.sum()) == summary["val_correct"]
    assert int((logged != hits).sum()) <= 2


def test_run_logged_to_mlflow_with_metrics_params_and_ranks(ray_local, tmp_path, sqlite_uri):
    cfg = ray_run_config(tmp_path, sqlite_uri, "test", "name=logged")
    summary = run_train(cfg)
    client = mlflow.tracking.MlflowClient(sqlite_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["prelora.tau"] == "50.0"
    assert run.data.tags["strategy"] == "prelora" and run.data.tags["dataset"] == "digits"
    val_acc = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted(m.step for m in val_acc) == list(range(6))
    assert run.data.metrics["switch_epoch"] == summary["switch_epoch"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ranks.json", "val_correct.npy"} <= artifacts
    hits = np.load(client.download_artifacts(run.info.run_id, "val_correct.npy", str(tmp_path)))
    assert hits.dtype == bool and hits.size == run.data.metrics["val_n"] == 360
    assert hits.sum() == run.data.metrics["val_correct"] == round(run.data.metrics["final_val_acc"] * 360)
    # the merged export is a plain ViT that transformers loads on its own
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(summary["merged_model_path"])
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_killed_worker_run_on_s3_resumes_from_another_directory_exactly(
    ray_local, tmp_path, sqlite_uri, monkeypatch, s3_bucket
):
    """Kill rank 0 after the switch of a run whose checkpoints and export go to a bucket (a real S3 API); re-running
    the same name from another working directory resumes from the bucket and ends as an uninterrupted local run."""
    from ray.train import WorkerGroupError

    from tests.servers import bucket_keys, local_s3_folders, s3_uri

    endpoint, bucket = s3_bucket
    reference = run_train(ray_run_config(tmp_path, sqlite_uri, "test", "name=reference"))
    assert 0 <= reference["switch_epoch"] < 3
    monkeypatch.setenv("PRELORA_FAULT_EPOCH", "3")
    monkeypatch.setenv("PRELORA_FAULT_MARKER", str(tmp_path / "fault-fired"))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    cfg = ray_run_config(
        tmp_path,
        sqlite_uri,
        "test",
        "name=interrupted",
        f"cluster.storage_path={s3_uri(endpoint, bucket, 'runs')}",
        f"output_dir={s3_uri(endpoint, bucket, 'models')}",
    )
    with pytest.raises(WorkerGroupError):
        run_train(cfg)
    assert (tmp_path / "fault-fired").exists()
    assert any(k.startswith("runs/interrupted/checkpoint_") for k in bucket_keys(endpoint, bucket))
    monkeypatch.chdir(second)
    # same name and storage path, another working directory: resumes from the epoch-3 checkpoint
    resumed = run_train(cfg)
    for key in ("switch_epoch", "freeze_epoch", "ranks", "final_val_acc", "best_val_acc"):
        assert resumed[key] == reference[key], key
    assert [e["train_loss"] for e in resumed["history"]] == [e["train_loss"] for e in reference["history"]]
    assert resumed["merged_model_path"] == s3_uri(endpoint, bucket, "models/interrupted/merged")
    assert "models/interrupted/merged/MANIFEST.json" in bucket_keys(endpoint, bucket)
    assert not local_s3_folders(tmp_path, first, second), local_s3_folders(tmp_path)
    # one MLflow run for the interrupted-and-resumed run, not two
    runs = mlflow.tracking.MlflowClient(sqlite_uri).search_runs(
        [mlflow.tracking.MlflowClient(sqlite_uri).get_experiment_by_name("test").experiment_id],
        filter_string="tags.`prelora.run_name` = 'interrupted'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert json.loads(runs[0].data.tags["prelora.resumed_at"])[0] >= 3


def test_worker_failure_restarts_from_last_checkpoint_with_max_failures(ray_local, tmp_path, sqlite_uri, monkeypatch):
    monkeypatch.setenv("PRELORA_FAULT_EPOCH", "2")
    monkeypatch.setenv("PRELORA_FAULT_MARKER", str(tmp_path / "fault-fired"))
    summary = run_train(ray_run_config(tmp_path, sqlite_uri, "test", "name=restarted", "cluster.max_failures=1"))
    assert (tmp_path / "fault-fired").exists()
    assert [e["epoch"] for e in summary["history"]] == list(range(6))  # no epoch lost or repeated
