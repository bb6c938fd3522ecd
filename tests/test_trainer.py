"""The training loop without Ray (`TrainingLoop`, `train`, `LocalRuntime`): the switch at the first
boundary that passes, full -> warmup -> lora with the freeze w epochs later, the baseline that never
switches, an exact resume before and after the switch, step windows, and the merged export.

A small synthetic data set (256 train images of 3x8x8, batch 32: 8 steps per epoch) keeps a
12-epoch run at a few seconds on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch
from transformers import ViTForImageClassification

from prelora_ray import metrics as M
from prelora_ray.adapters.lora import injected_ranks
from prelora_ray.algorithms import partial_convergence_test, percent_change
from prelora_ray.config import TrainSettings
from prelora_ray.models import FAMILY_MODULES
from prelora_ray.optim import lr_factor
from prelora_ray.runtime import LocalRuntime, StopTraining
from prelora_ray.significance import unpack_hits
from prelora_ray.strategies import Phase
from prelora_ray.trainer import TrainingLoop, train
from tests.builders import LOOP_BASE, LOOP_EPOCHS

EPOCHS = LOOP_EPOCHS
STEPS_PER_EPOCH = 8  # 256 samples / batch 32
BASE = LOOP_BASE


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (conftest)


def cfg(*extra: str) -> TrainSettings:
    return TrainSettings.load(None, [*BASE, *extra])


def run(settings: TrainSettings, runtime: LocalRuntime | None = None) -> tuple[TrainingLoop, LocalRuntime, dict]:
    runtime = runtime or LocalRuntime()
    loop = TrainingLoop(settings, runtime)
    return loop, runtime, loop.run()


@pytest.fixture(scope="module")
def reference(one_thread):
    """The uninterrupted run every other test compares against."""
    return run(cfg())


def first_passing_epoch(reports: list[dict], settings: TrainSettings) -> int:
    """Algorithm 1 recomputed from the reports (k = 2, m = 1: windows are single epochs), -1 if none."""
    p = settings.prelora
    assert p.k == 2 and p.m == 1 and p.window_stat == "mean"
    for e in range(1, len(reports)):
        if reports[e - 1][M.PHASE] != "full":
            break
        norms = {f: [reports[e - 1][f"{M.NORM_PREFIX}{f}"], reports[e][f"{M.NORM_PREFIX}{f}"]] for f in p.modules}
        losses = [reports[e - 1][M.TRAIN_LOSS], reports[e][M.TRAIN_LOSS]]
        if e >= p.min_switch_epoch and partial_convergence_test(norms, losses, p.tau, p.zeta):
            return e
    return -1


def phases(runtime: LocalRuntime) -> list[str]:
    return [r[M.PHASE] for r in runtime.reports]


# -- the switch, the warmup, the freeze -------------------------------------------------------------


def test_switch_at_the_first_passing_boundary_then_warmup_then_freeze(reference):
    loop, runtime, summary = reference
    settings = cfg()
    s, f, w = summary[M.SWITCH_EPOCH], summary[M.FREEZE_EPOCH], settings.prelora.warmup
    # k = 2, m = 1: the first boundary is the end of epoch 1, and τ = ζ = 50 % lets it pass
    assert s == first_passing_epoch(runtime.reports, settings) == 1
    assert f == s + w == 3
    assert phases(runtime) == ["full"] * (s + 1) + ["warmup"] * w + ["lora"] * (EPOCHS - f - 1)
    assert [r[M.EPOCH] for r in runtime.reports] == list(range(EPOCHS))
    assert [r[M.PHASE_INDEX] for r in runtime.reports] == [Phase(p).index for p in phases(runtime)]
    # the events are repeated in every report once they happened, -1 before
    assert [r[M.SWITCH_EPOCH] for r in runtime.reports] == [-1] * s + [s] * (EPOCHS - s)
    assert [r[M.FREEZE_EPOCH] for r in runtime.reports] == [-1] * f + [f] * (EPOCHS - f)
    assert loop.state.phase is Phase.LORA and len(loop.state.history) == EPOCHS


def test_trainable_fraction_rises_with_lora_and_drops_after_the_freeze(reference):
    _, runtime, summary = reference
    s, f = summary[M.SWITCH_EPOCH], summary[M.FREEZE_EPOCH]
    fractions = [r[M.TRAINABLE_FRACTION] for r in runtime.reports]
    assert fractions[: s + 1] == [1.0] * (s + 1)  # full: every parameter of the plain ViT
    warm = fractions[s + 1 : f + 1]
    assert all(x > 1.0 for x in warm) and len(set(warm)) == 1  # base + LoRA
    lora = fractions[f + 1 :]
    assert lora and all(x < 0.5 for x in lora) and len(set(lora)) == 1  # LoRA only
    assert max(lora) < min(warm)


def test_after_the_freeze_only_lora_trains(reference):
    loop, _, summary = reference
    named = dict(loop.model.named_parameters())
    lora = {n for n in named if "lora_A" in n or "lora_B" in n}
    assert lora
    assert {n for n, p in named.items() if p.requires_grad} == lora
    base = [p for n, p in named.items() if n not in lora]
    assert base and all(not p.requires_grad for p in base)
    assert all(p.grad is None for p in base)
    # the rebuilt optimizer holds only the trainable parameters, and state only for them
    in_optimizer = {id(p) for g in loop.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(named[n]) for n in lora}
    assert {id(p) for p in loop.optimizer.state} <= in_optimizer


def test_the_model_carries_the_assigned_ranks(reference):
    loop, _, summary = reference
    ranks = summary[M.RANKS]
    assert set(ranks) == set(cfg().prelora.modules)
    got = injected_ranks(loop.model)
    for family, family_ranks in ranks.items():
        assert len(family_ranks) == 4
        assert all(r in (2, 4, 8, 16) for r in family_ranks)  # default r_min 2, r_max 16
        assert [got[f"vit.layers.{i}.{FAMILY_MODULES[family]}"] for i in range(4)] == family_ranks
    # Algorithm 2 over the monitor as it stood at the switch (it records nothing afterwards)
    p = cfg().prelora
    assert loop.strategy.monitor.ranks(p.r_min, p.r_max, tie_rank=p.tie_rank) == ranks
    assert loop.strategy.monitor.units == summary[M.SWITCH_EPOCH] + 1


def test_lr_schedule_runs_on_across_the_phase_changes(reference):
    loop, runtime, _ = reference
    o = cfg().optim
    assert loop.steps_per_epoch == STEPS_PER_EPOCH
    assert loop.state.step == EPOCHS * STEPS_PER_EPOCH
    for e, report in enumerate(runtime.reports):
        last_step = (e + 1) * STEPS_PER_EPOCH - 1  # the lr reported is the epoch's last step's
        factor = lr_factor(
            last_step,
            total_steps=EPOCHS * STEPS_PER_EPOCH,
            warmup_steps=int(o.lr_warmup_epochs * STEPS_PER_EPOCH),
            schedule=o.schedule,
            min_ratio=o.min_lr_ratio,
        )
        assert report[M.LR] == pytest.approx(o.lr * factor), e


def test_a_later_boundary_when_the_first_fails(reference):
    _, ref_runtime, _ = reference
    r0, r1 = ref_runtime.reports[0], ref_runtime.reports[1]  # epochs 0 and 1 do not depend on ζ
    first_change = abs(percent_change(r0[M.TRAIN_LOSS], r1[M.TRAIN_LOSS]))
    settings = cfg("epochs=6", f"prelora.zeta={0.9 * first_change}")  # just below: the first boundary fails
    _, runtime, summary = run(settings)
    assert runtime.reports[1][M.TRAIN_LOSS] == r1[M.TRAIN_LOSS]  # same run so far
    s = summary[M.SWITCH_EPOCH]
    assert s == first_passing_epoch(runtime.reports, settings)
    assert s >= 2
    assert summary[M.FREEZE_EPOCH] in (s + 2, -1)  # w = 2 (or the run ends first)


def test_min_switch_epoch_delays_the_switch():
    settings = cfg("epochs=4", "prelora.warmup=1", "prelora.min_switch_epoch=2")
    _, runtime, summary = run(settings)
    assert summary[M.SWITCH_EPOCH] == 2 == first_passing_epoch(runtime.reports, settings)
    assert summary[M.FREEZE_EPOCH] == 3
    assert phases(runtime) == ["full", "full", "full", "warmup"]


def test_switch_at_epoch_switches_there_whatever_algorithm_1_says_with_algorithm_2_ranks():
    settings = cfg("epochs=5", "prelora.warmup=1", "prelora.switch_at_epoch=2")
    assert first_passing_epoch(run(settings.replace(**{"prelora.switch_at_epoch": None}))[1].reports, settings) == 1
    loop, runtime, summary = run(settings)  # Algorithm 1 would pass at 1: not asked
    assert summary[M.SWITCH_EPOCH] == 2 and summary[M.FREEZE_EPOCH] == 3
    assert phases(runtime) == ["full", "full", "full", "warmup", "lora"]
    p = settings.prelora
    assert (
        loop.strategy.monitor.units == 3
        and loop.strategy.monitor.ranks(p.r_min, p.r_max, tie_rank=p.tie_rank) == summary[M.RANKS]
    )
    assert [d["epoch"] for d in loop.strategy.decisions] == [2]


def test_warmup_0_freezes_at_the_switch():
    _, runtime, summary = run(cfg("epochs=4", "prelora.warmup=0"))
    assert summary[M.SWITCH_EPOCH] == summary[M.FREEZE_EPOCH] == 1
    assert phases(runtime) == ["full", "full", "lora", "lora"]


def test_full_strategy_never_switches():
    loop, runtime, summary = run(cfg("strategy=full", "epochs=5"))
    assert summary[M.SWITCH_EPOCH] == -1 and summary[M.FREEZE_EPOCH] == -1 and summary[M.RANKS] == {}
    assert phases(runtime) == ["full"] * 5
    assert all(r[M.TRAINABLE_FRACTION] == 1.0 for r in runtime.reports)
    assert not hasattr(loop.model, "peft_config")
    assert not any("lora_" in n for n, _ in loop.model.named_parameters())
    assert all(p.requires_grad for p in loop.model.parameters())
    assert not hasattr(loop.strategy, "monitor") and loop.strategy.state_dict() == {}  # the test is never even run


def test_no_switch_when_the_thresholds_are_never_met():
    _, runtime, summary = run(cfg("epochs=4", "prelora.tau=0.0001", "prelora.zeta=0.0001"))
    assert summary[M.SWITCH_EPOCH] == -1 and phases(runtime) == ["full"] * 4


# -- exact resume -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_after",
    [
        pytest.param(0, id="before-switch"),  # the monitor holds one snapshot; the resumed run must use it
        pytest.param(1, id="at-switch"),  # the checkpoint right after LoRA went in
        pytest.param(3, id="at-freeze"),  # the checkpoint right after the base froze
        pytest.param(6, id="in-lora"),
    ],
)
def test_interrupted_run_resumes_exactly(reference, stop_after):
    ref_loop, ref_runtime, ref = reference
    first = LocalRuntime(stop_after_epoch=stop_after)
    with pytest.raises(StopTraining):
        run(cfg(), first)
    assert len(first.reports) == stop_after + 1
    checkpoint = first.checkpoints[-1]
    assert checkpoint["loop"]["epoch"] == stop_after + 1
    loop, resumed, summary = run(cfg(), LocalRuntime(resume_from=checkpoint))
    for key in (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.RANKS, M.FINAL_VAL_ACC, M.BEST_VAL_ACC):
        assert summary[key] == ref[key], key  # exactly, not approximately
    assert summary["resumed_at"] == [stop_after + 1]
    assert [r[M.EPOCH] for r in resumed.reports] == list(range(stop_after + 1, EPOCHS))
    for key in (M.TRAIN_LOSS, M.VAL_LOSS, M.VAL_ACC, M.PHASE, M.TRAINABLE_PARAMS):
        assert [h[key] for h in loop.state.history] == [h[key] for h in ref_loop.state.history], key
        assert [r[key] for r in first.reports + resumed.reports] == [r[key] for r in ref_runtime.reports], key
    assert loop.state.step == ref_loop.state.step
    ref_state = ref_loop.model.state_dict()
    state = loop.model.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state), "final weights differ"


# -- step windows -----------------------------------------------------------------------------------


def test_step_windows_switch_mid_epoch_and_train_to_the_end():
    settings = cfg("epochs=4", "prelora.window_unit=step", "prelora.m=3", "prelora.warmup=1")
    loop, runtime, summary = run(settings)
    k, m = settings.prelora.k, settings.prelora.m
    # the first boundary is at optimizer step k·m = 6, inside epoch 0 (8 steps), and passes at τ = ζ = 50
    assert summary[M.SWITCH_EPOCH] == 0
    assert loop.strategy.monitor.units == k * m == 6  # recording stopped at the switch: it happened at step 6
    assert loop.strategy.monitor.units % STEPS_PER_EPOCH != 0  # mid-epoch
    assert summary[M.FREEZE_EPOCH] == 1  # switch epoch + w
    assert phases(runtime) == ["full", "warmup", "lora", "lora"]
    assert loop.state.step == 4 * STEPS_PER_EPOCH  # every step of every epoch ran
    assert len(loop.state.history) == 4 and loop.state.phase is Phase.LORA
    # the LoRA B matrices started at zero and trained from step 7 of epoch 0 on
    assert any(torch.count_nonzero(p) > 0 for n, p in loop.model.named_parameters() if "lora_B" in n)


@pytest.mark.slow
def test_step_windows_resume_exactly_with_a_window_spanning_the_checkpoint():
    # k = 2, m = 5: the first boundary is step 10, in epoch 1; the checkpoint after epoch 0 holds 8 of
    # the 10 step snapshots, and the resumed run must decide at step 10 exactly as the uninterrupted one
    settings = cfg("epochs=4", "prelora.window_unit=step", "prelora.m=5", "prelora.warmup=1")
    ref_loop, ref_runtime, ref = run(settings)
    assert ref[M.SWITCH_EPOCH] == 1 and ref_loop.strategy.monitor.units == 10
    first = LocalRuntime(stop_after_epoch=0)
    with pytest.raises(StopTraining):
        run(settings, first)
    assert first.checkpoints[-1]["strategy"]["monitor"]["units"] == STEPS_PER_EPOCH
    loop, resumed, summary = run(settings, LocalRuntime(resume_from=first.checkpoints[-1]))
    for key in (M.SWITCH_EPOCH, M.FREEZE_EPOCH, M.RANKS, M.FINAL_VAL_ACC):
        assert summary[key] == ref[key], key
    assert [h[M.TRAIN_LOSS] for h in loop.state.history] == [h[M.TRAIN_LOSS] for h in ref_loop.state.history]
    assert loop.strategy.monitor.units == 10


# -- merged export ----------------------------------------------------------------------------------


def test_train_export_writes_a_plain_vit_with_the_loops_final_outputs(tmp_path):
    settings = cfg("epochs=5")
    runtime = LocalRuntime()
    summary = train(settings, runtime, export_to=tmp_path / "merged")
    assert summary[M.SWITCH_EPOCH] == 1 and summary[M.FREEZE_EPOCH] == 3  # the export folds in real adapters
    assert summary["merged_model_path"] == str(tmp_path / "merged")
    exported = ViTForImageClassification.from_pretrained(summary["merged_model_path"]).eval()
    assert type(exported) is ViTForImageClassification
    assert not any("lora" in n for n, _ in exported.named_parameters())
    # the loop's final model, rebuilt from the last checkpoint (attached to the last epoch's report)
    final = TrainingLoop(settings, LocalRuntime())
    final.load_state_dict(runtime.checkpoints[-1])
    assert final.state.epoch == 5 and final.state.phase is Phase.LORA
    final.wrapped.eval()
    val = final.data.val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        expected = final.wrapped(pixel_values=x).logits
        got = exported(pixel_values=x).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert float((got.argmax(-1) == y).float().mean()) == pytest.approx(summary[M.FINAL_VAL_ACC])


def test_export_merged_from_the_loop_itself(tmp_path, reference):
    loop, _, summary = reference
    x = torch.stack([loop.data.val[i][0] for i in range(32)])
    loop.wrapped.eval()
    with torch.no_grad():
        expected = loop.wrapped(pixel_values=x).logits.clone()
    # export a copy, so the shared reference loop keeps its PEFT model for the other tests
    import copy

    clone = copy.copy(loop)
    clone.wrapped = copy.deepcopy(loop.wrapped)
    path = clone.export_merged(tmp_path / "m")
    loaded = ViTForImageClassification.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, expected, atol=1e-5)


def test_each_validation_images_correctness_is_recorded_in_the_data_sets_order(reference):
    loop, runtime, summary = reference
    loop.wrapped.eval()
    val = loop.data.val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.stack([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        hits = (loop.wrapped(pixel_values=x).logits.argmax(-1) == y).numpy()
    assert summary[M.VAL_N] == len(val) and summary[M.VAL_CORRECT] == int(hits.sum())
    assert (unpack_hits(summary[M.VAL_HITS]) == hits).all()
    assert summary[M.FINAL_VAL_ACC] == pytest.approx(summary[M.VAL_CORRECT] / summary[M.VAL_N])
    for record, report in zip(loop.state.history, runtime.reports, strict=True):  # every epoch's, reported too
        epoch_hits = unpack_hits(record[M.VAL_HITS])
        assert epoch_hits.size == record[M.VAL_N] == report[M.VAL_N] == len(val)
        assert int(epoch_hits.sum()) == record[M.VAL_CORRECT] == report[M.VAL_CORRECT]
        assert record[M.VAL_ACC] == pytest.approx(record[M.VAL_CORRECT] / len(val))


# -- small pieces -----------------------------------------------------------------------------------


def test_train_returns_the_summary():
    summary = train(cfg("epochs=2"))
    assert set(summary) >= {
        M.MEAN_EPOCH_TIME_S,
        M.FINAL_VAL_ACC,
        M.BEST_VAL_ACC,
        M.TOTAL_TRAIN_TIME_S,
        M.SWITCH_EPOCH,
        M.FREEZE_EPOCH,
        M.RANKS,
    }
    assert 0.0 <= summary[M.FINAL_VAL_ACC] <= summary[M.BEST_VAL_ACC] <= 1.0
    assert "merged_model_path" not in summary


def test_divergence_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="diverged"):
        run(cfg("optim.lr=1e6", "optim.grad_clip=null", "optim.lr_warmup_epochs=0", "epochs=3"))


@pytest.mark.parametrize(
    "step, schedule, expected",
    [
        # 10 warmup steps of 100: step s < 10 -> (s+1)/10
        (0, "cosine", 0.1),
        (9, "cosine", 1.0),
        # cosine over the remaining 90 steps: progress (s-10)/90; 0.5 (1 + cos(pi p))
        (10, "cosine", 1.0),
        (55, "cosine", 0.5),  # p = 0.5
        (100, "cosine", 0.0),  # p = 1
        (55, "linear", 0.5),  # 1 - p
        (28, "linear", 0.8),  # p = 18/90 = 0.2
        (55, "constant", 1.0),
    ],
)
def test_lr_factor(step, schedule, expected):
    assert lr_factor(step, total_steps=100, warmup_steps=10, schedule=schedule, min_ratio=0.0) == pytest.approx(
        expected
    )


def test_lr_factor_min_ratio():
    # cosine at its end with min_ratio 0.1: 0.1 + 0.9 * 0 = 0.1; halfway: 0.1 + 0.9 * 0.5 = 0.55
    assert lr_factor(100, total_steps=100, warmup_steps=10, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(55, total_steps=100, warmup_steps=10, schedule="cosine", min_ratio=0.1) == pytest.approx(0.55)
