"""`early_stopping: {type: mo-asha}` end to end (CLI, Ray Tune's scheduler, Optuna, MLflow): a fork sweep whose space
has diverging LoRA learning rates stops those trials at their first rung, and no trial within noise of the best."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from prelora_ray import metrics as M
from prelora_ray.significance import compare_accuracy
from tests.sweeps import kill_driver, run_tune, sweep_runs, val_correct, wait_for

pytestmark = pytest.mark.slow
EPOCHS = 8
SWITCH = 4  # prelora.switch_at_epoch: every trial forks at epoch 5 from a trunk that has learnt digits
BAD = (0.5, 0.8)  # LoRA learning rates that wreck the model in one epoch
GOOD = (0.002, 0.003, 0.004)
# random sampler, seed 300: lora_lr 0.002, 0.003, 0.004, 0.8, 0.5 (each bad trial after the good ones at its rung)
SEED = 300
RUNGS = [1, 2]  # epochs after the fork: epochs 5 and 6


def _space(tmp_path, name: str) -> str:
    data = {
        "name": name,
        "base": {
            "epochs": EPOCHS,
            "deterministic": True,
            "model": {"preset": "vit-digits"},
            "prelora": {"k": 2, "m": 1, "warmup": 0, "switch_at_epoch": SWITCH},
            "cluster": {"num_workers": 1, "cpus_per_worker": 1},
        },
        "parameters": {"optim.lora_lr": {"type": "categorical", "values": [*GOOD, *BAD]}},
        "objectives": [{"metric": M.FINAL_VAL_ACC, "mode": "max"}, {"metric": M.SPEEDUP, "mode": "max"}],
        "sampler": {"type": "random", "seed": SEED},
        "num_samples": 5,
        "max_concurrent": 1,
        "trial_executor": "tune",
        "early_stopping": {
            "type": "mo-asha",
            "rungs": RUNGS,
            "reduction_factor": 2,
            "grace_epochs": 0,
            "min_trials": 2,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def stopped_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("earlystop")
    proc = run_tune(root, _space(root, "es"))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    client, parent, children = sweep_runs(root, "es")
    return root, out, client, parent, children


def _lr(run) -> float:
    return float(run.data.params["optim.lora_lr"])


def test_every_diverging_trial_stops_at_its_first_rung_and_the_good_ones_run_to_the_end(stopped_sweep):
    root, out, client, parent, children = stopped_sweep
    trials = [c for c in children if c.data.tags.get(M.ROLE_TAG) == "trial"]
    assert sorted(_lr(t) for t in trials) == sorted([*GOOD, *BAD])
    for t in trials:
        tags = t.data.tags
        assert t.info.status == "FINISHED", (t.info.run_name, t.info.status)
        fork_epoch = int(tags[M.FORK_EPOCH_TAG])
        if _lr(t) in BAD:
            assert tags.get(M.EARLY_STOPPED_TAG) == "true", t.info.run_name
            assert int(tags[M.EARLY_STOPPED_EPOCH_TAG]) == fork_epoch + RUNGS[0] - 1  # its first rung
            assert int(tags[M.EPOCHS_TRAINED_TAG]) == RUNGS[0]
            assert M.FINAL_VAL_ACC in t.data.metrics and M.SPEEDUP in t.data.metrics
            assert f"trial {t.info.run_name} stopped at epoch {fork_epoch + RUNGS[0] - 1}" in out
        else:
            assert tags.get(M.EARLY_STOPPED_TAG) is None, t.info.run_name
            assert int(tags[M.EPOCHS_TRAINED_TAG]) == EPOCHS - fork_epoch
    assert out.count(" stopped at epoch ") == len(BAD)


def test_no_trial_within_noise_of_the_best_finished_trial_is_stopped(stopped_sweep):
    """Only the diverging learning rates were stopped (the good ones all trained to the end), and each stopped trial
    was certainly worse, already at its rung, than the best finished trial at the end."""
    root, out, client, parent, children = stopped_sweep
    trials = [c for c in children if c.data.tags.get(M.ROLE_TAG) == "trial"]
    finished = [t for t in trials if t.data.tags.get(M.EARLY_STOPPED_TAG) != "true"]
    assert sorted(_lr(t) for t in finished) == sorted(GOOD)
    best = max(finished, key=lambda t: t.data.metrics[M.FINAL_VAL_ACC])
    best_hits = val_correct(client, best)
    for t in trials:
        if t.data.tags.get(M.EARLY_STOPPED_TAG) == "true":
            hits = val_correct(client, t)  # the rung's images: what the stop was decided on
            assert hits.size == best_hits.size
            assert compare_accuracy(hits, best_hits) == "worse", t.info.run_name


def test_optuna_knows_the_stopped_trials_as_pruned(stopped_sweep):
    root, out, client, parent, children = stopped_sweep
    study = optuna.load_study(study_name="es", storage=f"sqlite:///{root / 'optuna.db'}")
    states = {}
    for t in study.trials:
        states[t.params["optim.lora_lr"]] = (t.state, t.user_attrs.get("early_stopped_epoch"))
    for lr in BAD:
        assert states[lr][0] == optuna.trial.TrialState.PRUNED and states[lr][1] is not None
    assert sum(s == optuna.trial.TrialState.COMPLETE for s, _ in states.values()) == 3


def test_the_front_table_has_the_stopped_rows_off_the_front(stopped_sweep):
    root, out, client, parent, children = stopped_sweep
    path = client.download_artifacts(parent.info.run_id, "pareto.csv", str(root))
    table = pd.read_csv(path)
    trials = table[table["role"] == "trial"]
    lrs = {r.run_id: _lr(client.get_run(r.run_id)) for r in trials.itertuples()}
    for r in trials.itertuples():
        if lrs[r.run_id] in BAD:
            assert r.front == "stopped" and not r.pareto
        else:
            assert r.front in ("plausible", "dominated")
    assert json.loads(parent.data.params["early_stopping"])["rungs"] == RUNGS
    record = json.loads((root / "ray" / "es" / "early_stopping" / "decisions.json").read_text())
    stops = [d for by in record["decisions"].values() for d in by.values() if d["stop"]]
    assert len(stops) == len(BAD) and all(d["dominated_by"] for d in stops)
    assert np.isfinite(trials["final_val_acc"]).all()


def _decisions(root, name: str) -> list[tuple[float, dict]]:
    """A sweep's rung decisions (early_stopping/decisions.json) and its trials' learning rates: [(lr, {rung: stop})]."""
    client, parent, children = sweep_runs(root, name)
    lr = {c.info.run_name.removeprefix(f"{name}_"): _lr(c) for c in children if c.data.tags.get(M.ROLE_TAG) == "trial"}
    record = json.loads((root / "ray" / name / "early_stopping" / "decisions.json").read_text())
    return [(lr[t], {rung: d["stop"] for rung, d in by.items()}) for t, by in record["decisions"].items()]


def test_a_sweep_killed_after_a_stop_resumes_with_the_same_decisions_and_revives_nothing(stopped_sweep, tmp_path):
    """SIGKILL of the whole sweep right after its first stop; --resume keeps every decision taken before, takes the
    same decisions as the sweep run without a kill (each diverging trial stopped at its first rung, no other trial
    stopped), and the stopped trial is neither trained nor stopped again. (A trial sampled after Optuna's last
    snapshot may be sampled anew on resume: the decisions are compared by learning rate, not by trial.)"""
    space = _space(tmp_path, "es")
    record = tmp_path / "ray" / "es" / "early_stopping" / "decisions.json"

    def first_stop() -> dict | None:
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        stops = [t for t, by in data["decisions"].items() if any(d["stop"] for d in by.values())]
        return data if stops else None

    proc = run_tune(tmp_path, space)
    wait_for(proc, first_stop, "the first stop")
    kill_driver(proc)
    before = json.loads(record.read_text())
    resumed = run_tune(tmp_path, space, "--resume")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    after = json.loads(record.read_text())
    for trial, by in before["decisions"].items():
        assert after["decisions"][trial] == by  # kept, not taken again
    decisions = _decisions(tmp_path, "es")
    uninterrupted = dict(_decisions(stopped_sweep[0], "es"))
    assert all(uninterrupted[lr] == by for lr, by in decisions if lr in uninterrupted)
    for lr, by in decisions:
        assert by == ({"0": True} if lr in BAD else {"0": False, "1": False}), (lr, by)
    client, parent, children = sweep_runs(tmp_path, "es")
    stopped = [c for c in children if c.data.tags.get(M.EARLY_STOPPED_TAG) == "true"]
    assert all(_lr(c) in BAD for c in stopped) and stopped
    for c in stopped:
        assert c.info.status == "FINISHED" and int(c.data.tags[M.EPOCHS_TRAINED_TAG]) == RUNGS[0]
        if c.info.run_name.removeprefix("es_") in before["decisions"]:  # stopped before the kill
            assert f"trial {c.info.run_name} stopped" not in out
    # every trial FINISHED but one the kill lost (started after Ray Tune's last snapshot: a new one ran in its place)
    trials = [c for c in children if c.data.tags.get(M.ROLE_TAG) == "trial"]
    assert all(c.info.status == "FINISHED" for c in trials if M.LOST_TAG not in c.data.tags)
