"""Sweeps end to end: MLflow parent + children + Pareto tags, kill -9 and --resume, best -> train."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import yaml

from prelora_ray import metrics as M
from prelora_ray.search_space import load_search_space
from tests.sweeps import curve, kill_driver, run_tune, sweep_runs, sweep_space, wait_for

pytestmark = pytest.mark.slow


def test_sweep_logs_parent_children_and_pareto_then_best_round_trip(two_sweeps):
    tmp_path, outputs = two_sweeps.root, two_sweeps.outputs
    out = outputs["small"]
    assert "Pareto front" in out and f"open {two_sweeps.uri}/#/experiments/" in out  # a tracking server is its own UI
    assert "epoch   3 | lora" in outputs["other"]  # with --verbose the workers' per-epoch lines reach the console...
    assert "Failed to query Ray Train Controller" not in out  # ...Ray Train's state-API spam does not (ray_hooks)
    client, parent, children = sweep_runs(tmp_path, "small", two_sweeps.uri)
    assert parent is not None
    roles = sorted(c.data.tags["prelora.role"] for c in children)
    assert roles == ["baseline", "trial", "trial", "trial"]
    assert all(c.info.status == "FINISHED" for c in children)
    for c in children:  # per-epoch metrics
        assert len(client.get_metric_history(c.info.run_id, "val_acc")) == 4
    trials = [c for c in children if c.data.tags["prelora.role"] == "trial"]
    assert all(c.data.tags.get("pareto") in ("true", "false") for c in trials)
    assert any(c.data.tags["pareto"] == "true" for c in trials)
    baseline = next(c for c in children if c.data.tags["prelora.role"] == "baseline")
    assert baseline.data.params["strategy"] == "full" and baseline.data.metrics["switch_epoch"] == -1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "small.yaml"} <= artifacts

    # best -> train: the exported config trains and keeps the chosen trial's switch hyperparameters
    out_yaml = tmp_path / "best.yaml"
    best = subprocess.run(
        [
            sys.executable,
            "-m",
            "prelora_ray.cli",
            "best",
            "--experiment",
            "prelora-ray",
            "--sweep",
            "small",
            "--pick",
            "max-acc",
            "--out",
            str(out_yaml),
            "--tracking-uri",
            two_sweeps.uri,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert best.returncode == 0, best.stderr
    chosen_name = best.stdout.split("trial ", 1)[1].split(" ", 1)[0]
    chosen = next(c for c in trials if c.data.tags["mlflow.runName"] == chosen_name)
    assert chosen.data.tags["pareto"] == "true"
    from prelora_ray.config import TrainSettings
    from prelora_ray.trainer import train

    cfg = TrainSettings.load(out_yaml, ["tracking.enabled=false"])
    for key in (
        "prelora.tau",
        "prelora.zeta",
        "prelora.k",
        "prelora.m",
        "prelora.warmup",
        "prelora.r_min",
        "prelora.r_max",
    ):
        assert str(cfg.flat()[key]) == chosen.data.params[key], key
    summary = train(cfg)
    assert summary["switch_epoch"] == int(chosen.data.metrics["switch_epoch"])


def test_killed_sweep_driver_mid_trunk_and_mid_fork_resumes_without_training_anything_twice(tmp_path):
    """SIGKILL of the whole sweep while the trunk trains, then again while a forked trial trains: --resume
    finishes with the requested trials, each once, no finished trunk epoch or finished trial trained again."""
    import json

    journal = (
        tmp_path / "shared" / "killed.optuna.journal"
    )  # the study outside the driver: a journal file (`optuna_storage`)
    space = sweep_space(
        tmp_path, "killed", 4, epochs=8, trial_executor="tune", optuna_storage=f"journal:{journal}"
    )  # in-process: no TorchTrainer start-ups
    trunk_history = tmp_path / "ray" / "killed" / "trunk" / "history.json"

    def trunk_epochs() -> int:
        try:
            return len(json.loads(trunk_history.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    proc = run_tune(tmp_path, str(space))
    wait_for(proc, lambda: trunk_epochs() >= 2, "the trunk's second epoch")
    kill_driver(proc)
    done_at_kill = trunk_epochs()
    assert done_at_kill < 8

    proc = run_tune(tmp_path, str(space), "--resume")

    def mid_fork():
        client, _, children = sweep_runs(tmp_path, "killed")
        trials = [c for c in children if c.data.tags.get("prelora.role") == "trial"]
        finished = [c for c in trials if c.info.status == "FINISHED"]
        for c in trials:
            fork_epoch = c.data.tags.get("fork.epoch")
            if c.info.status == "RUNNING" and fork_epoch is not None and finished:
                if any(step > int(fork_epoch) for step, _ in curve(client, c)):
                    return c, finished
        return None

    running, finished = wait_for(proc, mid_fork, "a forked trial training while another has finished")
    kill_driver(proc)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    before = {c.info.run_id: (curve(client, c), c.data.tags.get("epochs_trained")) for c in finished}

    resumed = run_tune(tmp_path, str(space), "--resume")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    client, parent, children = sweep_runs(tmp_path, "killed")
    trials = [c for c in children if c.data.tags["prelora.role"] == "trial"]
    # a kill between a trial's start and Ray Tune's snapshot loses that trial (Tune runs another in its place):
    # at most one per kill, ended KILLED and tagged lost, never left RUNNING (test_lost_trial_runs_are_ended)
    lost = [c for c in trials if c.data.tags.get(M.LOST_TAG) == "true"]
    assert len(lost) <= 2 and all(c.info.status == "KILLED" for c in lost), [
        (c.info.run_name, c.info.status) for c in lost
    ]
    trials = [c for c in trials if c not in lost]
    names = [c.data.tags["mlflow.runName"] for c in trials]
    assert len(names) == len(set(names)) == 4, names  # the requested number, none twice
    assert all(c.info.status == "FINISHED" for c in trials)
    trunk = [c for c in children if c.data.tags["prelora.role"] == "baseline"]
    assert len(trunk) == 1 and trunk[0].info.status == "FINISHED"
    # the trunk went on from its checkpoint: at most the epoch in flight at the kill was trained again
    assert json.loads(trunk[0].data.tags["prelora.resumed_at"])[0] >= max(1, done_at_kill - 1)
    assert [s for s, _ in curve(client, trunk[0])] == list(range(8))
    for c in trials:
        if c.info.run_id in before:  # finished before the second kill: untouched
            assert (curve(client, c), c.data.tags.get("epochs_trained")) == before[c.info.run_id]
    killed = next(c for c in trials if c.info.run_id == running.info.run_id)
    assert json.loads(killed.data.tags["prelora.resumed_at"])[0] > int(
        killed.data.tags["fork.epoch"]
    )  # its own checkpoint, not the fork again
    assert [s for s, _ in curve(client, killed)] == list(range(8))
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from prelora_ray.orchestration.optuna_search import TUNE_TRIAL_ATTR

    assert not (tmp_path / "optuna.db").exists()  # nothing beside the MLflow store: the study lives where the file says
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    assert optuna.get_all_study_names(storage) == ["killed"]  # one study, continued by each resumed driver
    study = optuna.load_study(study_name="killed", storage=storage)
    assert [t.number for t in study.trials] == list(range(len(study.trials)))  # one numbering across the three drivers
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    finished = {c.data.tags["trial_id"]: c for c in trials}
    assert sorted(t.user_attrs[TUNE_TRIAL_ATTR] for t in complete) == sorted(
        finished
    )  # each finished trial once, none twice
    for t in complete:  # the sampler sees each finished trial's objectives, as logged
        run = finished[t.user_attrs[TUNE_TRIAL_ATTR]]
        assert t.values[0] == run.data.metrics["final_val_acc"]
        # a trial that finished after Tune's last snapshot is resumed at its end and logs its summary again: its
        # mean epoch time is measured anew, and the study keeps the value it was told first
        logged = [m.value for m in client.get_metric_history(run.info.run_id, "mean_epoch_time_s")]
        assert t.values[1] in logged, (t.values, logged)
    assert all(
        t.state == optuna.trial.TrialState.FAIL for t in study.trials if t not in complete
    )  # lost ones: none left RUNNING


def test_lost_trial_runs_are_ended_killed_and_their_optuna_trials_failed(tmp_path):
    """At a sweep's end, a trial run still RUNNING that Ray Tune knows died silently (FAILED); one it does not know was
    lost to a kill before Tune's snapshot (KILLED, tagged lost, its Optuna trial FAIL); finished runs are untouched."""
    import optuna

    from prelora_ray import tracking
    from prelora_ray.orchestration.optuna_search import TUNE_TRIAL_ATTR
    from prelora_ray.orchestration.study import mark_lost_trials
    from prelora_ray.orchestration.sweep import make_sweep

    sweep = make_sweep(
        load_search_space(sweep_space(tmp_path, "lost", 3)),
        name="lost",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        storage_path=str(tmp_path),
    )
    sweep.parent_run_id = tracking.start_run(
        sweep.tracking_uri, sweep.experiment_id, "lost", params={}, tags={M.ROLE_TAG: "parent"}
    )
    study = optuna.create_study(study_name="lost", storage=sweep.study_storage(), directions=["maximize", "minimize"])
    ids = {}
    for tid, status in (("a", "FINISHED"), ("b", "RUNNING"), ("c", "RUNNING")):
        ids[tid] = tracking.start_run(
            sweep.tracking_uri,
            sweep.experiment_id,
            f"lost_{tid}",
            params={},
            parent_run_id=sweep.parent_run_id,
            tags={M.ROLE_TAG: "trial", "trial_id": tid},
        )
        if status == "FINISHED":
            tracking.end_run(sweep.tracking_uri, ids[tid])
        study.ask().set_user_attr(TUNE_TRIAL_ATTR, tid)
    assert mark_lost_trials(sweep, {"lost_a", "lost_b"}) == ["lost_c"]
    c = mlflow.tracking.MlflowClient(sweep.tracking_uri)
    runs = {tid: c.get_run(run_id) for tid, run_id in ids.items()}
    assert [runs[t].info.status for t in "abc"] == ["FINISHED", "FAILED", "KILLED"]
    assert runs["c"].data.tags.get(M.LOST_TAG) == "true" and M.LOST_TAG not in runs["b"].data.tags
    states = {
        t.user_attrs[TUNE_TRIAL_ATTR]: t.state
        for t in optuna.load_study(study_name="lost", storage=sweep.study_storage()).trials
    }
    assert states["c"] == optuna.trial.TrialState.FAIL and states["a"] == states["b"] == optuna.trial.TrialState.RUNNING
    assert mark_lost_trials(sweep, {"lost_a", "lost_b"}) == []  # nothing RUNNING is left


def test_diverging_trial_is_marked_failed_and_left_off_the_front(tmp_path):
    space = yaml.safe_load(
        sweep_space(tmp_path, "nan", 3, trial_executor="tune").read_text()
    )  # no TorchTrainer start-up per trial
    space["base"]["optim"] = {"grad_clip": None, "lr_warmup_epochs": 0}
    space["parameters"] = {
        "optim.lr": {"type": "categorical", "values": [0.001, 1000000.0]},
        "prelora.tau": {"type": "uniform", "low": 20, "high": 80},
    }
    space["sampler"] = {"type": "random", "seed": 5}  # draws lr = 1e6, 1e-3, 1e-3
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(space))
    proc = run_tune(tmp_path, str(path))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]  # the sweep goes on past the failed trial
    _, _, children = sweep_runs(tmp_path, "nan")
    trials = [c for c in children if c.data.tags["prelora.role"] == "trial"]
    failed = [c for c in trials if c.info.status == "FAILED"]
    assert len(trials) == 3 and len(failed) == 1
    assert "diverged" in failed[0].data.tags["error"] and failed[0].data.params["optim.lr"] == "1000000.0"
    assert failed[0].data.tags.get("pareto", "false") == "false"
    assert any(c.data.tags.get("pareto") == "true" for c in trials if c.info.status == "FINISHED")


def test_the_front_table_carries_intervals_and_paired_verdicts_that_scipy_confirms(two_sweeps, tmp_path):
    import numpy as np
    from scipy.stats import binomtest

    from prelora_ray.front import NOISE_COLUMNS
    from tests.sweeps import val_correct

    client, parent, children = sweep_runs(two_sweeps.root, "small", two_sweeps.uri)
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path)))
    assert set(NOISE_COLUMNS) <= set(table.columns)
    runs = {c.info.run_id: c for c in children}
    base_id = next(k for k, c in runs.items() if c.data.tags[M.ROLE_TAG] == "baseline")
    base = val_correct(client, runs[base_id])
    for _, row in table.iterrows():
        hits = val_correct(client, runs[row["run_id"]])
        assert row[M.VAL_N] == hits.size == runs[row["run_id"]].data.metrics[M.VAL_N]
        ci = binomtest(int(hits.sum()), hits.size).proportion_ci(confidence_level=0.95, method="wilson")
        assert (row["acc_lo"], row["acc_hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        b, c = int(np.sum(hits & ~base)), int(np.sum(~hits & base))
        assert row["p_vs_baseline"] == pytest.approx(1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue)
        want = "indistinguishable" if row["p_vs_baseline"] >= 0.05 or b == c else ("better" if b > c else "worse")
        assert row["verdict"] == want and row["front"] in ("plausible", "dominated")
    assert (table["speedup_wall"] > 0).all()

    out_yaml = tmp_path / "fastest.yaml"
    best = subprocess.run(
        [sys.executable, "-m", "prelora_ray.cli", "best", "--experiment", "prelora-ray", "--sweep", "small"]
        + ["--pick", "fastest-not-worse", "--out", str(out_yaml), "--tracking-uri", two_sweeps.uri],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert best.returncode == 0, best.stderr
    chosen = best.stdout.split("trial ", 1)[1].split(" ", 1)[0]
    eligible = table[(table["role"] == "trial") & (table["verdict"] != "worse")]
    assert chosen == eligible.loc[eligible["speedup"].idxmax(), "run_name"]
    header = out_yaml.read_text()
    assert "interval [" in header and "against the baseline: p " in header
