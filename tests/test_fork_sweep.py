"""Fork-mode sweeps end to end (CLI, Ray Tune + Optuna, Ray Train, MLflow): the trunk runs ahead, trials
that never switch take its result, twins reuse one result, a forked trial's curves hold the trunk's
epochs and equal a from-scratch run; a failed trunk fails its waiting trials, and --resume finishes.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from prelora_ray import metrics as M
from tests.sweeps import assert_equals_from_scratch, fault_env, history, run_tune, sweep_runs, val_correct

pytestmark = pytest.mark.slow
EPOCHS = 6


def _fork_space(
    tmp_path,
    name: str,
    num_samples: int,
    taus: list[float],
    seed: int,
    *,
    trial_executor: str = "ray_train",
    max_failures: int = 0,
) -> str:
    data = {
        "name": name,
        "base": {
            "epochs": EPOCHS,
            "deterministic": True,
            "model": {"preset": "vit-digits"},
            "prelora": {"k": 2, "m": 1, "warmup": 1, "zeta": 50.0},
            "cluster": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": max_failures},
        },
        # tau 1e-6 never passes; 40 and 60 both pass at the first boundary, with the same ranks
        "parameters": {"prelora.tau": {"type": "categorical", "values": taus}},
        # speedup: in every trial's final report, whether it trains, takes the trunk's result or a twin's
        "objectives": [{"metric": M.FINAL_VAL_ACC, "mode": "max"}, {"metric": M.SPEEDUP, "mode": "max"}],
        "sampler": {"type": "random", "seed": seed},
        "num_samples": num_samples,
        "max_concurrent": 2,
        "trial_executor": trial_executor,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def fork_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("forksweep")
    proc = run_tune(root, _fork_space(root, "fk", 5, [0.000001, 40.0, 60.0], seed=5))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    client, parent, children = sweep_runs(root, "fk")
    return root, out, client, parent, children


def test_never_trials_take_the_trunks_result_and_train_nothing(fork_sweep):
    _, out, client, _, children = fork_sweep
    trunk = next(c for c in children if c.data.tags[M.ROLE_TAG] == "baseline")
    never = [c for c in children if c.data.tags.get(M.FORK_SWITCH_TAG) == "never"]
    assert never and "never passes on the trunk" in out
    for c in never:
        assert c.info.status == "FINISHED" and c.data.tags[M.EPOCHS_TRAINED_TAG] == "0"
        assert c.data.params["prelora.tau"] == "1e-06"
        assert history(client, c.info.run_id) == history(client, trunk.info.run_id)
        assert c.data.metrics[M.FINAL_VAL_ACC] == trunk.data.metrics[M.FINAL_VAL_ACC]
        assert c.data.metrics[M.SWITCH_EPOCH] == -1
        assert [c.data.metrics[k] for k in (M.SPEEDUP, M.SPEEDUP_LO, M.SPEEDUP_HI)] == [1.0, 1.0, 1.0]  # full training
        assert (val_correct(client, c) == val_correct(client, trunk)).all()  # the trunk's images, right and wrong


def test_twins_reuse_one_result_and_forked_curves_start_with_the_trunks(fork_sweep):
    _, out, client, parent, children = fork_sweep
    trunk = next(c for c in children if c.data.tags[M.ROLE_TAG] == "baseline")
    forked = [c for c in children if c.data.tags.get(M.FORK_SWITCH_TAG) not in (None, "never")]
    trained = [c for c in forked if M.FORK_REUSED_TAG not in c.data.tags]
    reused = [c for c in forked if M.FORK_REUSED_TAG in c.data.tags]
    assert len(trained) == 1 and reused and "reusing its result" in out
    origin = trained[0]
    fork_epoch, switch = int(origin.data.tags[M.FORK_EPOCH_TAG]), int(origin.data.tags[M.FORK_SWITCH_TAG])
    assert 0 <= fork_epoch <= switch + 1 and switch == int(origin.data.metrics[M.SWITCH_EPOCH])
    assert origin.data.tags[M.FORK_TRUNK_RUN_TAG] == trunk.info.run_id
    assert origin.data.tags[M.EPOCHS_TRAINED_TAG] == str(EPOCHS - fork_epoch)
    curve = history(client, origin.info.run_id)
    assert [s for s, _ in curve] == list(range(EPOCHS))  # whole curve, each epoch once
    assert curve[: switch + 1] == history(client, trunk.info.run_id)[: switch + 1]  # identical until the switch
    for c in reused:
        assert c.data.tags[M.FORK_REUSED_TAG] == origin.info.run_id and c.data.tags[M.EPOCHS_TRAINED_TAG] == "0"
        assert history(client, c.info.run_id) == curve
        assert c.data.metrics[M.FINAL_VAL_ACC] == origin.data.metrics[M.FINAL_VAL_ACC]
        assert c.data.metrics[M.SPEEDUP] == origin.data.metrics[M.SPEEDUP]  # the twin's measurement
        assert (val_correct(client, c) == val_correct(client, origin)).all()
    assert val_correct(client, origin).sum() == origin.data.metrics[M.VAL_CORRECT]
    # the trunk's epochs before the fork count at 1, the trial's own LoRA epochs as measured
    assert trunk.data.metrics[M.SPEEDUP] == 1.0 and history(client, origin.info.run_id, M.STEP_SPEEDUP)[0][1] == 1.0
    assert origin.data.metrics[M.SPEEDUP_LO] <= origin.data.metrics[M.SPEEDUP] <= origin.data.metrics[M.SPEEDUP_HI]
    # the parent's cost accounting: the trunk plus the one trained fork, against every run from scratch
    assert parent.data.metrics[M.EPOCHS_TRAINED_TOTAL] == EPOCHS + EPOCHS - fork_epoch
    assert parent.data.metrics[M.EPOCHS_NAIVE_TOTAL] == EPOCHS * 6


def test_a_forked_trial_equals_the_same_trial_from_scratch(fork_sweep):
    """The Ray trial against a from-scratch run of its config.

    The trial is forked from the trunk's checkpoint, on a TorchTrainer.
    """
    root, _, client, _, children = fork_sweep
    origin = next(
        c
        for c in children
        if c.data.tags.get(M.FORK_SWITCH_TAG) not in (None, "never") and M.FORK_REUSED_TAG not in c.data.tags
    )
    assert_equals_from_scratch(root, client, origin)


def test_a_trial_trained_in_its_tune_process_equals_a_from_scratch_run(two_sweeps):
    """trial_executor tune ("small" of two_sweeps): the forked trial trains in its Tune trial's process, no
    TorchTrainer, with its checkpoints in the trial's folder, and gives the same numbers as a from-scratch run."""
    root = two_sweeps.root
    client, _, children = sweep_runs(root, "small", two_sweeps.uri)
    trained = [
        c
        for c in children
        if c.data.tags.get(M.ROLE_TAG) == "trial" and int(c.data.tags.get(M.EPOCHS_TRAINED_TAG, "0")) > 0
    ]
    assert trained, [c.data.tags for c in children]
    for c in trained:
        name = c.info.run_name
        assert not (root / "ray" / "small" / "train" / name).exists()  # Ray Train's run folder: none
        assert list((root / "ray" / "small" / name).glob("checkpoint_*"))  # Ray Tune's checkpoints of the trial
    trunk_checkpoints = sorted(p.name for p in (root / "ray" / "small" / "train" / "small_baseline").iterdir())
    assert trunk_checkpoints and all(re.fullmatch(r"checkpoint_\d{6}", n) for n in trunk_checkpoints), (
        trunk_checkpoints
    )  # its Ray task's, not Ray Train's
    assert_equals_from_scratch(root, client, trained[0])


def test_a_failed_trunk_fails_its_waiting_trials_and_resume_finishes_the_sweep(tmp_path):
    """trial_executor tune (no TorchTrainer start-ups; the trunk raises in its Ray task, which is not retried)."""
    space = _fork_space(tmp_path, "tf", 3, [0.000001, 40.0], seed=0, trial_executor="tune")
    env = fault_env(tmp_path, epoch=2, mode="raise", run="_baseline")
    proc = run_tune(tmp_path, space, env=env)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]  # the sweep ends (no hang) with the trunk's failure on its waiting trials
    client, _, children = sweep_runs(tmp_path, "tf")
    trunk = next(c for c in children if c.data.tags[M.ROLE_TAG] == "baseline")
    assert trunk.info.status == "FAILED" and "injected fault" in trunk.data.tags["error"]
    waiting = [c for c in children if c.data.tags[M.ROLE_TAG] == "trial" and c.info.status == "FAILED"]
    assert waiting, [(c.data.tags.get("mlflow.runName"), c.info.status) for c in children]
    assert all("trunk" in c.data.tags.get("error", "") for c in waiting) or not any(
        c.data.tags.get("error") for c in waiting
    )

    resumed = run_tune(tmp_path, space, "--resume", env=env)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    client, _, children = sweep_runs(tmp_path, "tf")
    trials = [c for c in children if c.data.tags[M.ROLE_TAG] == "trial"]
    assert len(trials) == 3 and all(c.info.status == "FINISHED" for c in trials)
    trunk = next(c for c in children if c.data.tags[M.ROLE_TAG] == "baseline")
    assert trunk.info.status == "FINISHED" and json.loads(trunk.data.tags[M.RESUMED_AT_TAG]) == [
        3
    ]  # not one finished epoch again
    assert [s for s, _ in history(client, trunk.info.run_id)] == list(range(EPOCHS))
    import optuna

    study = optuna.load_study(study_name="tf", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 3


def test_a_tune_executor_trial_killed_mid_run_is_retried_from_its_tune_checkpoint_exactly(tmp_path):
    """trial_executor tune: the trial's process dies (os._exit) after a LoRA epoch's checkpoint; Ray Tune retries
    the trial (cluster.max_failures 1), which resumes from its own checkpoint, not from the fork, and ends equal
    to a from-scratch run, each epoch logged once."""
    path = _fork_space(tmp_path, "tk", 1, [40.0], seed=0, trial_executor="tune", max_failures=1)
    marker = tmp_path / "fired"
    proc = run_tune(tmp_path, path, env=fault_env(tmp_path, epoch=4, mode="exit", run="!_baseline"))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert marker.exists() and "retrying it" in out, out[-3000:]
    client, _, children = sweep_runs(tmp_path, "tk")
    trial = next(c for c in children if c.data.tags[M.ROLE_TAG] == "trial")
    assert trial.info.status == "FINISHED" and int(trial.data.tags[M.FORK_EPOCH_TAG]) < 4  # it forked before the fault
    assert json.loads(trial.data.tags[M.RESUMED_AT_TAG]) == [5]  # from its epoch-4 checkpoint, not from the trunk again
    assert [s for s, _ in history(client, trial.info.run_id)] == list(range(EPOCHS))
    assert_equals_from_scratch(tmp_path, client, trial)


def test_a_tune_executor_trunk_killed_is_rerun_from_its_checkpoint_exactly(tmp_path):
    """trial_executor tune: the trunk trains in its own Ray task's process (no TorchTrainer). Killed (os._exit) after
    its epoch-3 checkpoint, Ray re-runs the task (cluster.max_failures 1), which resumes there; it ends equal to a
    from-scratch full run, each epoch logged once, and its never-switching trial takes its result."""
    path = _fork_space(tmp_path, "tt", 1, [0.000001], seed=0, trial_executor="tune", max_failures=1)
    marker = tmp_path / "fired"
    proc = run_tune(tmp_path, path, env=fault_env(tmp_path, epoch=3, mode="exit", run="_baseline"))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert marker.exists(), out[-3000:]
    client, _, children = sweep_runs(tmp_path, "tt")
    trunk = next(c for c in children if c.data.tags[M.ROLE_TAG] == "baseline")
    assert trunk.info.status == "FINISHED" and json.loads(trunk.data.tags[M.RESUMED_AT_TAG]) == [4], trunk.data.tags
    assert [s for s, _ in history(client, trunk.info.run_id)] == list(range(EPOCHS))
    kept = sorted(p.name for p in (tmp_path / "ray" / "tt" / "train" / "tt_baseline").iterdir())
    assert kept == [f"checkpoint_{e:06d}" for e in (EPOCHS - 2, EPOCHS - 1)], kept  # cluster.checkpoints_to_keep 2
    assert_equals_from_scratch(tmp_path, client, trunk)
    trial = next(c for c in children if c.data.tags[M.ROLE_TAG] == "trial")
    assert trial.info.status == "FINISHED" and trial.data.tags[M.FORK_SWITCH_TAG] == "never"
    assert trial.data.metrics[M.FINAL_VAL_ACC] == trunk.data.metrics[M.FINAL_VAL_ACC]


def test_a_sweep_with_its_records_in_a_bucket_equals_the_same_sweep_in_a_local_folder(two_sweeps):
    """ "other" of two_sweeps keeps the trunk, its checkpoints, the fork records, Ray Tune's state and the trials'
    checkpoints in a bucket of a real S3 API (`--storage s3://...?endpoint_override=...`); with the same sampled
    configurations (deterministic) every trial and the trunk end as in "small", whose records are in a local folder."""
    from tests.servers import bucket_keys, local_s3_folders

    def by_config(name: str) -> dict[str, tuple]:
        client, _, children = sweep_runs(two_sweeps.root, name, two_sweeps.uri)
        out = {}
        for c in children:
            if c.info.status != "FINISHED":
                continue
            key = c.data.tags.get("sampled", "baseline")
            out[key] = (
                c.data.tags[M.ROLE_TAG],
                c.data.metrics[M.FINAL_VAL_ACC],
                c.data.metrics[M.BEST_VAL_ACC],
                c.data.metrics[M.SWITCH_EPOCH],
                c.data.tags.get(M.EPOCHS_TRAINED_TAG),
                c.data.tags.get(M.FORK_SWITCH_TAG),
                [v for _, v in history(client, c.info.run_id, M.VAL_LOSS)],
            )
        return out

    local, bucket = by_config("small"), by_config("other")
    assert len(local) == 4 and sum(v[0] == "trial" for v in local.values()) == 3, local
    assert bucket == local
    keys = bucket_keys(two_sweeps.s3_endpoint, two_sweeps.bucket)
    trunk = "records/other/trunk/"
    assert {trunk + "history.json", trunk + "status.json"} <= set(keys), keys
    assert any(k.startswith(trunk + "checkpoints/epoch_") and k.endswith(".pt.manifest.json") for k in keys), keys
    assert "records/other/tuner.pkl" in keys  # Ray Tune's experiment state, through the same filesystem
    client, _, children = sweep_runs(two_sweeps.root, "other", two_sweeps.uri)
    for (
        c
    ) in children:  # every run's records: the trunk's checkpoints in its task's folder, each trial's own in Ray Tune's
        name = c.info.run_name
        folder = f"records/other/train/{name}/" if c.data.tags[M.ROLE_TAG] == "baseline" else f"records/other/{name}/"
        if c.data.tags[M.ROLE_TAG] == "baseline" or int(c.data.tags.get(M.EPOCHS_TRAINED_TAG, "0")) > 0:
            assert any(k.startswith(folder + "checkpoint_") for k in keys), (name, keys)
    if any(int(c.data.tags.get(M.EPOCHS_TRAINED_TAG, "0")) > 0 for c in children if c.data.tags[M.ROLE_TAG] == "trial"):
        assert any(k.startswith("records/other/trunk/results/") for k in keys), keys  # the fork records (reuse keys)
        assert any(k.startswith("records/other/models/") and k.endswith("MANIFEST.json") for k in keys), (
            keys
        )  # the merged models
    assert not local_s3_folders(two_sweeps.root), local_s3_folders(two_sweeps.root)
