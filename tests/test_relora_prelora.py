"""`strategy: relora_prelora` on a real vit-digits ViT with real PEFT adapters (no Ray): FULL -> RELORA
with merges -> the per-layer switch -> WARMUP -> LORA, Algorithm 1's input continuous across merges and
the switch, the jagged LR, exact resume mid-RELORA, at the switch and after the freeze, and the settings'
one-line errors. Synthetic data (256 images, batch 32: 8 steps per epoch) keeps each run at seconds."""

from __future__ import annotations

import pytest
import torch

from prelora_ray import metrics as M
from prelora_ray.adapters.lora import adapter_root, injected_ranks
from prelora_ray.adapters.names import ADAPTER
from prelora_ray.config import TrainSettings
from prelora_ray.runtime import LocalRuntime, StopTraining
from prelora_ray.strategies import Phase
from prelora_ray.strategies.relora_prelora import RELORA_MERGES
from prelora_ray.trainer import TrainingLoop
from tests.builders import LOOP_BASE as BASE

EPOCHS = 6
# RELORA from epoch 1 (step 8), merges at steps 13, 18, 23, 28; the test may pass from epoch 3 on
RELORA = [
    *BASE,
    f"epochs={EPOCHS}",
    "strategy=relora_prelora",
    "relora.start_epoch=1",
    "relora.merge_every=5",
    "relora.rewarm_steps=2",
    "relora.rank=4",
    "prelora.min_switch_epoch=3",
    "prelora.warmup=1",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(*extra: str) -> TrainSettings:
    return TrainSettings.load(None, [*RELORA, *extra])


@pytest.fixture(scope="module")
def reference(one_thread):
    """The uninterrupted run, watched at each merge and at the switch (watching reads, never writes)."""
    runtime = LocalRuntime()
    loop = TrainingLoop(cfg(), runtime)
    strategy, seen = loop.strategy, {"merges": [], "switch": None}
    merge, switch = strategy._merge, strategy._switch

    def watched_merge(lp):
        before = lp.norms()
        merge(lp)
        root = adapter_root(lp.model)
        adapters = [m for m in root.modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
        seen["merges"].append(
            (
                lp.state.step,
                before,
                lp.norms(),
                [bool(m.lora_B[ADAPTER].weight.any()) for m in adapters],
                [bool(m.lora_A[ADAPTER].weight.any()) for m in adapters],
            )
        )

    def watched_switch(lp, ranks):
        before = lp.norms()
        switch(lp, ranks)
        seen["switch"] = (before, lp.norms())

    strategy._merge, strategy._switch = watched_merge, watched_switch
    summary = loop.run()
    return loop, runtime, summary, seen


def test_phases_merges_and_the_per_layer_switch(reference):
    loop, runtime, summary, seen = reference
    assert [r[M.PHASE] for r in runtime.reports] == ["full", "relora", "relora", "relora", "warmup", "lora"]
    assert [r[M.PHASE_INDEX] for r in runtime.reports] == [0, 3, 3, 3, 1, 2]
    assert [r[RELORA_MERGES] for r in runtime.reports] == [0, 1, 3, 4, 4, 4]
    assert [step for step, *_ in seen["merges"]] == [13, 18, 23, 28]
    assert summary[M.SWITCH_EPOCH] == 3 and summary[M.FREEZE_EPOCH] == 4
    assert injected_ranks(loop.model) and set(injected_ranks(loop.model).values()) <= {
        2,
        4,
        8,
        16,
    }  # per-layer, not the uniform 4
    fractions = [r[M.TRAINABLE_FRACTION] for r in runtime.reports]
    assert fractions[0] == 1.0 and fractions[1] < 0.5 and fractions[4] > 1.0 and fractions[5] < 0.5


def test_algorithm_1_input_is_identical_across_each_merge_and_the_switch(reference):
    _, _, _, seen = reference
    for step, before, after, b_nonzero, a_nonzero in seen["merges"]:
        assert after == before, step  # W + s·B·A, bit for bit
        assert not any(b_nonzero) and all(a_nonzero), step  # B = 0, A != 0 after each re-init
    before, after = seen["switch"]
    assert after == before


def test_the_lr_is_zero_at_each_merge_and_back_on_the_cosine_rewarm_steps_later(reference):
    loop, *_ = reference
    strategy = loop.strategy
    loop.state.phase = Phase.RELORA  # the schedule of the RELORA phase (the run ended in LORA)
    try:
        for merge in (13, 18, 23, 28):
            assert strategy.lr_factor(loop, merge) == 0.0
            cosine = super(type(strategy), strategy).lr_factor(loop, merge + 2)
            assert strategy.lr_factor(loop, merge + 2) == pytest.approx(cosine)
    finally:
        loop.state.phase = Phase.LORA


@pytest.mark.parametrize(
    "stop_after",
    [
        pytest.param(1, id="mid-relora-between-merges"),
        pytest.param(3, id="at-switch"),
        pytest.param(4, id="after-freeze"),
    ],
)
def test_interrupted_run_resumes_exactly(reference, stop_after):
    ref_loop, ref_runtime, ref, _ = reference
    first = LocalRuntime(stop_after_epoch=stop_after)
    with pytest.raises(StopTraining):
        TrainingLoop(cfg(), first).run()
    loop = TrainingLoop(cfg(), LocalRuntime(resume_from=first.checkpoints[-1]))
    summary = loop.run()
    for key in (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.RANKS, M.FINAL_VAL_ACC):
        assert summary[key] == ref[key], key
    for key in (M.TRAIN_LOSS, M.VAL_LOSS, M.PHASE, RELORA_MERGES, M.LR, M.TRAINABLE_PARAMS):
        assert [h[key] for h in loop.state.history] == [h[key] for h in ref_loop.state.history], key
    state, ref_state = loop.model.state_dict(), ref_loop.model.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


def test_start_epoch_0_is_relora_from_the_first_step():
    loop = TrainingLoop(cfg("epochs=2", "relora.start_epoch=0", "prelora.min_switch_epoch=5"), LocalRuntime())
    loop.run()
    assert [(h[M.PHASE], h[RELORA_MERGES]) for h in loop.state.history] == [
        ("relora", 1),
        ("relora", 3),
    ]  # merges at 5, 10, 15


def test_switch_at_epoch_is_the_per_layer_switch_out_of_relora_before_min_switch_epoch():
    loop = TrainingLoop(
        cfg("prelora.switch_at_epoch=2"), LocalRuntime()
    )  # min_switch_epoch=3: a given epoch ignores it, as in prelora
    summary = loop.run()
    assert [h[M.PHASE] for h in loop.state.history] == ["full", "relora", "relora", "warmup", "lora", "lora"]
    assert summary[M.SWITCH_EPOCH] == 2 and summary[M.FREEZE_EPOCH] == 3
    assert set(injected_ranks(loop.model).values()) <= {2, 4, 8, 16}


def test_switch_at_epoch_before_the_relora_phase_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        cfg("relora.start_epoch=2", "prelora.switch_at_epoch=1")
    assert "prelora.switch_at_epoch=1 is invalid: >= relora.start_epoch (2)" in str(err.value) and "\n" not in str(
        err.value
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("relora.rank=0", "relora.rank"),
        ("relora.prune=1.0", "relora.prune"),
        ("relora.prune=-0.1", "relora.prune"),
        ("relora.merge_every=0", "relora.merge_every"),
        ("relora.start_epoch=6", "relora.start_epoch"),
        ("relora.rewarm_steps=5", "relora.rewarm_steps"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ValueError) as err:
        cfg(override)
    assert key in str(err.value) and "\n" not in str(err.value)
