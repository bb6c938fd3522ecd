"""Fork-from-trunk without Ray: the replay of Algorithm 1 on a recorded history, the trunk's files,
fork plans, and a forked run that equals the same run from scratch (`==`, CPU, deterministic).

One trunk (the full-training baseline recording every family's norms, a checkpoint each epoch) serves
every test here; the live from-scratch runs are shared too.
"""

from __future__ import annotations

import json

import pytest
import torch

from prelora_ray import fork
from prelora_ray import metrics as M
from prelora_ray.algorithms import SwitchPoint, replay_switch
from prelora_ray.checkpoint import load_state_file
from prelora_ray.config import MODULE_FAMILIES, TrainSettings
from prelora_ray.runtime import LocalRuntime, StopTraining
from prelora_ray.trainer import ForkStart, TrainingLoop
from tests.builders import StopAtSwitch, synthetic_run

EPOCHS = 12
BASE = [*synthetic_run(EPOCHS), "prelora.warmup=2"]
# (k, m, tau, zeta, window_stat): switch epochs spread over the run, and one that never passes
SETTINGS = [
    (2, 1, 50.0, 50.0, "mean"),
    (2, 1, 5.0, 20.0, "mean"),
    (2, 2, 5.0, 30.0, "last"),
    (3, 1, 1.0, 10.0, "mean"),
    (2, 2, 1.0, 10.0, "mean"),
    (3, 2, 0.5, 5.0, "last"),
    (2, 1, 1e-4, 50.0, "mean"),
]


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (conftest)


def settings(k: int, m: int, tau: float, zeta: float, stat: str, *extra: str) -> TrainSettings:
    return TrainSettings.load(
        None,
        [
            *BASE,
            f"prelora.k={k}",
            f"prelora.m={m}",
            f"prelora.tau={tau}",
            f"prelora.zeta={zeta}",
            f"prelora.window_stat={stat}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trunk(tmp_path_factory, one_thread):
    """The trunk: full training of the base config, every family's norms recorded, a checkpoint each epoch."""
    folder = tmp_path_factory.mktemp("trunk")
    cfg = TrainSettings.load(None, [*BASE, "strategy=full", f"prelora.modules={','.join(MODULE_FAMILIES)}"])
    loop = TrainingLoop(cfg, LocalRuntime(), trunk=fork.TrunkWriter(folder, every=1))
    loop.run()
    return folder, loop


@pytest.fixture(scope="module")
def live_switches(one_thread):
    """The switch epoch and ranks a live run from scratch gives for each setting (-1: never)."""
    out = {}
    for setting in SETTINGS:
        loop = TrainingLoop(settings(*setting), StopAtSwitch())
        try:
            loop.run()
        except StopTraining:
            pass
        out[setting] = (loop.strategy.state.switch_epoch, loop.strategy.state.ranks)
    return out


# -- the replay, pure ----------------------------------------------------------------------------


def _history(norms: list[float], losses: list[float]) -> list[tuple[dict, float]]:
    return [({"query": [n, n]}, loss) for n, loss in zip(norms, losses, strict=True)]


@pytest.mark.parametrize(
    "norms, losses, k, m, tau, zeta, stat, min_epoch, expected",
    [
        # every step moves 10 % until epoch 4, then 0.5 %: k=2 m=1 passes once both windows are flat
        (
            [100, 110, 121, 133.1, 146.41, 147.14, 147.88, 148.62],
            [4, 3, 2, 1.5, 1.2, 1.19, 1.18, 1.17],
            2,
            1,
            1.0,
            5.0,
            "mean",
            0,
            5,
        ),
        # the same with k=3: one more flat window needed
        (
            [100, 110, 121, 133.1, 146.41, 147.14, 147.88, 148.62],
            [4, 3, 2, 1.5, 1.2, 1.19, 1.18, 1.17],
            3,
            1,
            1.0,
            5.0,
            "mean",
            0,
            6,
        ),
        # m=2: boundaries only at epochs 3, 5, 7
        (
            [100, 110, 121, 133.1, 146.41, 147.14, 147.88, 148.62],
            [4, 3, 2, 1.5, 1.2, 1.19, 1.18, 1.17],
            2,
            2,
            1.1,
            5.0,
            "last",
            0,
            7,
        ),
        # the loss keeps falling 20 % each epoch: zeta 5 never passes
        ([100] * 8, [10, 8, 6.4, 5.12, 4.1, 3.28, 2.62, 2.1], 2, 1, 1.0, 5.0, "mean", 0, None),
        # flat from the start: the first boundary (k·m - 1) passes...
        ([100] * 8, [1] * 8, 2, 2, 1.0, 5.0, "mean", 0, 3),
        # ...unless min_switch_epoch holds it back to the next boundary at or after it
        ([100] * 8, [1] * 8, 2, 2, 1.0, 5.0, "mean", 4, 5),
    ],
)
def test_replay_table(norms, losses, k, m, tau, zeta, stat, min_epoch, expected):
    point = replay_switch(
        _history(norms, losses),
        tau=tau,
        zeta=zeta,
        k=k,
        m=m,
        r_min=2,
        r_max=8,
        window_stat=stat,
        min_switch_epoch=min_epoch,
    )
    assert (point.epoch if point else None) == expected


def test_replay_ranks_follow_algorithm_2_over_the_last_two_windows():
    # layer 0 barely moves, layer 1 moves most between the last two windows
    history = [({"query": [10.0, 10.0]}, 1.0), ({"query": [10.0, 10.5]}, 1.0), ({"query": [10.01, 10.8]}, 1.0)]
    point = replay_switch(history, tau=10.0, zeta=10.0, k=2, m=1, r_min=2, r_max=8)
    assert point == SwitchPoint(epoch=1, ranks={"query": [2, 8]})


def test_replay_on_families_of_the_trial_only():
    history = [({"query": [1.0], "value": [1.0]}, 1.0), ({"query": [1.0], "value": [2.0]}, 1.0)]
    assert replay_switch(history, tau=1.0, zeta=1.0, k=2, m=1, r_min=1, r_max=1) is None  # value moved 100 %
    assert replay_switch(history, tau=1.0, zeta=1.0, k=2, m=1, r_min=1, r_max=1, families=["query"]).epoch == 1


# -- the trunk's records and the replay against live runs -------------------------------------------


def test_the_trunk_records_every_epoch_every_family_and_a_checkpoint_each_epoch(trunk):
    folder, loop = trunk
    history = fork.read_history(folder)
    assert [h[M.EPOCH] for h in history] == list(range(EPOCHS))
    assert fork.checkpoint_epochs(folder) == list(range(EPOCHS + 1))  # the start of every epoch, and the end
    snaps = fork.snapshots(history)
    assert set(snaps[0][0]) == set(MODULE_FAMILIES) and all(len(v) == 4 for v in snaps[0][0].values())
    assert [s[1] for s in snaps] == [h[M.TRAIN_LOSS] for h in loop.state.history]
    state = load_state_file(fork.checkpoint_path(folder, 5))  # weights_only: plain data
    assert state["loop"]["epoch"] == 5 and state["loop"]["phase"] == "full"


def test_replay_on_the_trunk_gives_the_live_switch_epochs_and_ranks(trunk, live_switches):
    folder, _ = trunk
    history = fork.read_history(folder)
    epochs = []
    for setting, (live_epoch, live_ranks) in live_switches.items():
        point = fork.replay_for(settings(*setting), history)
        assert (point.epoch if point else -1) == live_epoch, setting
        assert (point.ranks if point else {}) == live_ranks, setting
        epochs.append(live_epoch)
    assert -1 in epochs and len({e for e in epochs if e >= 0}) >= 3, epochs  # the table spreads, and one never passes


def test_plan_takes_the_latest_checkpoint_at_or_before_the_end_of_the_switch_epoch(trunk, tmp_path, live_switches):
    folder, _ = trunk
    setting = SETTINGS[3]
    switch = live_switches[setting][0]
    assert switch >= 3
    sparse = tmp_path / "sparse"  # a trunk that kept checkpoints every 3 epochs only
    (sparse / fork.CHECKPOINT_DIR).mkdir(parents=True)
    (sparse / fork.HISTORY_FILE).write_text((folder / fork.HISTORY_FILE).read_text())
    for c in range(0, EPOCHS + 1, 3):
        (sparse / fork.CHECKPOINT_DIR / f"epoch_{c:05d}.pt").write_bytes(b"")
    plan = fork.plan_fork(settings(*setting), sparse)
    assert plan.switch.epoch == switch and plan.fork_epoch == (switch + 1) // 3 * 3


def test_plan_waits_until_the_trunk_reaches_the_switch_then_never_only_at_the_end(trunk, tmp_path, live_switches):
    folder, _ = trunk
    history = fork.read_history(folder)
    partial = tmp_path / "partial"
    fork.write_json(partial / fork.HISTORY_FILE, history[:2])
    assert fork.plan_fork(settings(*SETTINGS[3]), partial) is None  # switch not reached yet: wait
    never = settings(*SETTINGS[-1])
    assert fork.plan_fork(never, partial) is None  # "never" is only known at the end
    fork.write_json(partial / fork.HISTORY_FILE, history)
    assert fork.plan_fork(never, partial).never


def test_trunk_writer_resume_drops_records_of_the_killed_attempt(tmp_path):
    writer = fork.TrunkWriter(tmp_path, every=2)
    writer.start(0, lambda: {"x": torch.zeros(1)})
    for epoch in range(5):
        writer.after_epoch(
            epoch, {M.EPOCH: epoch, M.TRAIN_LOSS: 1.0 / (epoch + 1), "phase": "full"}, lambda: {"x": torch.ones(1)}
        )
    assert fork.checkpoint_epochs(tmp_path) == [0, 2, 4]
    again = fork.TrunkWriter(tmp_path, every=2)
    again.start(3, lambda: {"x": torch.ones(1)})  # resumed from the checkpoint at the end of epoch 2
    assert [h[M.EPOCH] for h in fork.read_history(tmp_path)] == [0, 1, 2]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


# -- a forked run equals the run from scratch ---------------------------------------------------


def _scratch(setting: tuple) -> TrainingLoop:
    loop = TrainingLoop(settings(*setting), LocalRuntime())
    loop.run()
    return loop


def _forked(setting: tuple, folder, checkpoint_epoch: int) -> TrainingLoop:
    history = fork.read_history(folder)
    start = ForkStart(
        state=load_state_file(fork.checkpoint_path(folder, checkpoint_epoch)),
        snapshots=fork.snapshots(history[:checkpoint_epoch]),
    )
    loop = TrainingLoop(settings(*setting), LocalRuntime(), fork=start)
    loop.run()
    return loop


@pytest.mark.parametrize(
    "setting, back, extra",
    [
        (SETTINGS[1], -1, ()),  # the checkpoint at the end of the switch epoch: switch right after loading
        (SETTINGS[1], -1, ("prelora.warmup=0",)),  # ...and freeze at once
        (SETTINGS[3], 0, ()),  # the start of the switch epoch: train it again, then switch
        (SETTINGS[3], 2, ()),  # a sparser trunk: two full epochs again
    ],
)
def test_forked_run_equals_the_run_from_scratch(trunk, live_switches, setting, back, extra):
    folder, _ = trunk
    switch = live_switches[setting][0]
    setting = (*setting, *extra)
    scratch, forked = _scratch(setting), _forked(setting, folder, switch - back)
    assert forked.state.forked_from == switch - back
    for key in (M.VAL_ACC, M.VAL_LOSS, M.TRAIN_LOSS, M.PHASE, M.TRAINABLE_PARAMS, M.LR, M.SWITCH_EPOCH, M.FREEZE_EPOCH):
        assert [h[key] for h in forked.state.history] == [h[key] for h in scratch.state.history], key
    a, b = scratch.summary(), forked.summary()
    for key in (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.RANKS, M.FINAL_VAL_ACC, M.BEST_VAL_ACC):
        assert a[key] == b[key], key
    assert a[M.SWITCH_EPOCH] == switch and b["epochs_trained"] == EPOCHS - (switch - back)
    for name, tensor in scratch.model.state_dict().items():
        assert torch.equal(tensor, forked.model.state_dict()[name]), name


def test_a_fork_must_start_from_a_full_training_checkpoint(trunk):
    folder, _ = trunk
    state = load_state_file(fork.checkpoint_path(folder, 4))
    state["loop"]["phase"] = "lora"
    loop = TrainingLoop(settings(*SETTINGS[0]), LocalRuntime(), fork=ForkStart(state=state, snapshots=[]))
    with pytest.raises(ValueError, match="full-training checkpoint"):
        loop.run()


# -- reuse ----------------------------------------------------------------------------------------


def test_reuse_key_ignores_what_only_decides_the_switch_and_the_run_names():
    point = SwitchPoint(epoch=4, ranks={"query": [2, 4]})
    a = settings(2, 1, 5.0, 20.0, "mean")
    b = settings(3, 2, 9.0, 30.0, "last", "name=other", "tracking.run_name=x", "prelora.r_min=1")
    assert fork.reuse_key(a, point) == fork.reuse_key(b, point)
    assert fork.reuse_key(a, point) != fork.reuse_key(a, SwitchPoint(epoch=5, ranks={"query": [2, 4]}))
    assert fork.reuse_key(a, point) != fork.reuse_key(a, SwitchPoint(epoch=4, ranks={"query": [2, 8]}))
    assert fork.reuse_key(a, point) != fork.reuse_key(a.replace(**{"prelora.warmup": 3}), point)
    assert fork.reuse_key(a, point) != fork.reuse_key(a.replace(**{"optim.lora_lr": 0.01}), point)


def test_registry_first_claim_trains_later_ones_wait_then_reuse(tmp_path):
    reg = fork.ResultRegistry(tmp_path)
    assert reg.claim("k", "trial_a") is None
    assert reg.claim("k", "trial_a") is None  # its own claim again (a restarted trial)
    assert reg.claim("k", "trial_b")["state"] == "claimed"
    reg.finish("k", "trial_a", run_id="r1", report={"final_val_acc": 0.9})
    record = reg.claim("k", "trial_b")
    assert record["state"] == "finished" and record["run_id"] == "r1"
    reg2 = fork.ResultRegistry(tmp_path / "other")
    assert reg2.claim("k", "a") is None
    reg2.fail("k", "a", "boom")
    assert reg2.claim("k", "b") is None  # the owner failed: the next trial trains it itself
    assert json.loads((tmp_path / "other" / "k.json").read_text())["owner"] == "b"


def test_a_twin_waits_for_a_beating_claim_and_takes_over_a_silent_one(tmp_path, caplog):
    """A trial whose twin claimed the same result waits while the twin's claim beats, and reuses its result; a claim
    that stops changing (its owner died without a word: a trial lost to a killed sweep) is taken over, not waited on
    forever."""
    import threading
    import time

    from prelora_ray.orchestration.forking import claim_heartbeat, claim_or_wait

    registry = fork.ResultRegistry(tmp_path / "results")
    assert registry.claim("ghost-key", "ghost") is None  # claimed, then the owner died
    started = time.monotonic()
    assert claim_or_wait(registry, "ghost-key", "heir", stale_s=0.5, poll_s=0.05) is None
    assert time.monotonic() - started >= 0.5 and registry.read("ghost-key") == {
        "owner": "heir",
        "state": "claimed",
        "taken_from": "ghost",
    }
    assert "has not been heard from" in caplog.text

    assert registry.claim("live-key", "owner") is None

    def train() -> None:
        with claim_heartbeat(registry, "live-key", "owner", every_s=0.1):
            time.sleep(1.5)  # three times the stale limit: only the beats keep the waiter waiting
        registry.finish("live-key", "owner", run_id="r1")

    thread = threading.Thread(target=train)
    thread.start()
    record = claim_or_wait(registry, "live-key", "twin", stale_s=0.5, poll_s=0.05)
    thread.join()
    assert record is not None and record["state"] == "finished" and record["run_id"] == "r1"
