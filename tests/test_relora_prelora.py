"""`strategy: relora_prelora` on a real vit-digits ViT with real PEFT adapters (no Ray): FULL -> RELORA
with merges -> the per-layer switch -> WARMUP -> LORA, Algorithm 1's input continuous across merges and
the switch, the jagged LR, exact resume mid-RELORA, at the switch and after the freeze, and the settings'
one-line errors. Synthetic data (256 images, batch 32: 8 steps per epoch) keeps each run at seconds."""

from __future__ import annotations

import math

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
# RELORA from epoch 1 (step 8): its own LR warmup over steps 8-9 (phase steps 0-1), LR 0 on steps 13, 18, 23, 28
# (phase steps 5, 10, 15, 20) and a merge right after each, 4 steps of rewarm; the test may pass from epoch 3 on
RELORA = [
    *BASE,
    f"epochs={EPOCHS}",
    "strategy=relora_prelora",
    "optim.lr_warmup_epochs=1",
    "relora.start_epoch=1",
    "relora.merge_every=5",
    "relora.warmup_steps=2",
    "relora.rewarm_steps=4",
    "relora.rank=4",
    "prelora.min_switch_epoch=3",
    "prelora.warmup=1",
]
ZERO_LR_STEPS = [13, 18, 23, 28]  # 0-based index of the optimizer step that runs at LR 0; the merge follows it

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
        lr_of_the_step = [g["lr"] for g in lp.optimizer.param_groups]
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
                lr_of_the_step,
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
    # state.step counts the steps taken: each merge comes right after the zero-LR step (ReLoRA's order)
    assert [step for step, *_ in seen["merges"]] == [s + 1 for s in ZERO_LR_STEPS]
    assert all(lr == [0.0] * len(lr) for *_, lr in seen["merges"])
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
    for step, before, after, b_nonzero, a_nonzero, _ in seen["merges"]:
        assert after == before, step  # W + s·B·A, bit for bit
        assert not any(b_nonzero) and all(a_nonzero), step  # B = 0, A != 0 after each re-init
    before, after = seen["switch"]
    assert after == before


def _phase_cosine(i: int) -> float:
    """RELORA's cosine at phase step i, by hand: 48 - 8 = 40 phase steps, 2 of warmup, floor 0.1."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - 2) / 38))


def test_relora_restarts_the_lr_with_its_own_warmup_and_zero_lr_steps_before_merges(reference):
    """ReLoRA's warm start: a fresh schedule from RELORA's first step (step/W from 0); at each restart r the factor
    is 0, then (i - r)/R of the cosine at r + R (worked by hand from ReLoRA's cosine_restarts)."""
    loop, *_ = reference
    strategy = loop.strategy
    loop.state.phase = Phase.FULL
    assert strategy.lr_factor(loop, 6) == 7 / 8  # FULL: the run's schedule, its warmup (step + 1) / 8 steps
    loop.state.phase = Phase.RELORA
    try:
        expected = {
            8: 0.0,  # RELORA's first step: its warmup from 0
            9: 0.5,
            10: 1.0,  # the cosine's peak
            12: _phase_cosine(4),
            13: 0.0,  # phase step 5: the first restart (merge after it)
            14: 0.25 * _phase_cosine(9),
            16: 0.75 * _phase_cosine(9),
            17: _phase_cosine(9),
            18: 0.0,
            20: 0.5 * _phase_cosine(14),
            22: _phase_cosine(14),
            47: _phase_cosine(39),
        }
        for step, factor in expected.items():
            assert strategy.lr_factor(loop, step) == pytest.approx(factor, abs=1e-12), step
        loop.state.phase = Phase.LORA  # after RELORA: the same cosine, no restarts
        assert strategy.lr_factor(loop, 23) == pytest.approx(_phase_cosine(15))
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


def test_start_epoch_0_is_relora_from_the_first_step_with_the_references_scale_and_dropout():
    loop = TrainingLoop(cfg("epochs=2", "relora.start_epoch=0", "prelora.min_switch_epoch=5"), LocalRuntime())
    loop.run()
    assert [(h[M.PHASE], h[RELORA_MERGES]) for h in loop.state.history] == [
        ("relora", 1),
        ("relora", 3),
    ]  # merges after the zero-LR steps 5, 10, 15 (0-based)
    adapters = [m for m in adapter_root(loop.model).modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
    assert adapters and {m.scaling[ADAPTER] for m in adapters} == {8.0}  # lora_alpha 32 / rank 4
    assert {m.lora_dropout[ADAPTER].p for m in adapters} == {0.1}


def test_a_fixed_scale_is_a_named_option():
    loop = TrainingLoop(
        cfg("epochs=1", "relora.start_epoch=0", "relora.alpha_scale=2.0", "relora.lora_dropout=0.0"), LocalRuntime()
    )
    loop.run()
    adapters = [m for m in adapter_root(loop.model).modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
    assert {m.scaling[ADAPTER] for m in adapters} == {2.0}
    assert {type(m.lora_dropout[ADAPTER]) for m in adapters} == {torch.nn.Identity}


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
    "overrides, message",
    [
        (["relora.warmup_steps=6"], "relora.warmup_steps=6 is invalid: an integer in [0, relora.merge_every] = [0, 5]"),
        (["optim.lr_warmup_epochs=2"], "relora.start_epoch=1 is invalid: 0 or >= optim.lr_warmup_epochs (2)"),
        (["optim.lr_warmup_epochs=1.5"], "relora.start_epoch=1 is invalid: 0 or >= optim.lr_warmup_epochs (1.5)"),
    ],
)
def test_a_restart_inside_the_first_lr_warmup_is_refused_naming_the_keys(overrides, message):
    """ReLoRA: assert adjust_step + first_warmup_steps <= restart_every (here adjust_step is 0: merges count from
    RELORA's start); RELORA's start restarts the LR, so it may not fall inside the FULL phase's warmup either."""
    with pytest.raises(ValueError) as err:
        cfg(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_warmup_may_end_on_the_first_restart_and_start_epoch_0_ignores_the_full_warmup():
    assert cfg("relora.warmup_steps=5").relora.warmup_steps == 5  # == merge_every: allowed, as in ReLoRA
    assert cfg("relora.start_epoch=0", "optim.lr_warmup_epochs=3").relora.start_epoch == 0  # no FULL phase
    assert cfg("relora.start_epoch=3", "optim.lr_warmup_epochs=3").relora.start_epoch == 3


@pytest.mark.parametrize(
    "override, key",
    [
        ("relora.rank=0", "relora.rank"),
        ("relora.prune=1.0", "relora.prune"),
        ("relora.prune=0", "relora.prune"),  # no reset unless asked for by name (relora.reset=none)
        ("relora.prune=-0.1", "relora.prune"),
        ("relora.reset=zero", "relora.reset"),
        ("relora.merge_every=1", "relora.merge_every"),
        ("relora.start_epoch=6", "relora.start_epoch"),
        ("relora.rewarm_steps=5", "relora.rewarm_steps"),
        ("relora.min_lr_ratio=0", "relora.min_lr_ratio"),
        ("relora.lora_alpha=0", "relora.lora_alpha"),
        ("relora.alpha_scale=0", "relora.alpha_scale"),
        ("relora.lora_dropout=1.0", "relora.lora_dropout"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ValueError) as err:
        cfg(override)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_no_reset_is_a_named_choice():
    assert cfg("relora.reset=none", "relora.prune=0").relora.reset == "none"
