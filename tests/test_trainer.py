"""The training loop without Ray: phases, the switch, the freeze, exact resume, step windows, export."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTForImageClassification

from prelora_ray.config import TrainSettings
from prelora_ray.runtime import LocalRuntime, StopTraining
from prelora_ray.switch import Phase, injected_ranks
from prelora_ray.trainer import TrainingLoop, lr_factor, train
from tests.conftest import FAST_SWITCH

BASE = ["epochs=6", "deterministic=true", "tracking.enabled=false", *FAST_SWITCH]


def cfg(*extra: str) -> TrainSettings:
    return TrainSettings.load(None, [*BASE, *extra])


def run(settings: TrainSettings, runtime: LocalRuntime | None = None) -> tuple[TrainingLoop, LocalRuntime, dict]:
    runtime = runtime or LocalRuntime()
    loop = TrainingLoop(settings, runtime)
    return loop, runtime, loop.run()


@pytest.fixture(scope="module")
def reference():
    return run(cfg())


def test_phases_switch_and_freeze(reference):
    loop, runtime, summary = reference
    phases = [r["phase"] for r in runtime.reports]
    s, f = summary["switch_epoch"], summary["freeze_epoch"]
    # k=2, m=1: the first test runs at the end of epoch 1 and the thresholds are wide open
    assert s == 1 and f == s + 1  # warmup w = 1 epoch
    assert phases == ["full"] * (s + 1) + ["warmup"] * (f - s) + ["lora"] * (6 - f - 1)
    fractions = [r["trainable_fraction"] for r in runtime.reports]
    assert fractions[0] == 1.0 and fractions[s + 1] > 1.0 and fractions[-1] < 0.5  # warmup adds LoRA; LoRA-only is small
    assert loop.state.phase is Phase.LORA
    frozen = [n for n, p in loop.model.named_parameters() if not p.requires_grad]
    assert frozen and all("lora_" not in n for n in frozen)
    assert all("lora_" in n for n, p in loop.model.named_parameters() if p.requires_grad)
    # the adapters carry the assigned per-layer ranks
    got = injected_ranks(loop.model)
    for family, ranks in summary["ranks"].items():
        module = {"query": "attention.q_proj", "key": "attention.k_proj", "value": "attention.v_proj", "attn_out": "attention.o_proj", "mlp_in": "mlp.fc1", "mlp_out": "mlp.fc2"}[family]
        assert [got[f"vit.layers.{i}.{module}"] for i in range(len(ranks))] == ranks


def test_optimizer_holds_state_only_for_trainable_parameters_after_freeze(reference):
    loop, _, _ = reference
    trainable = {id(p) for p in loop.model.parameters() if p.requires_grad}
    assert {id(p) for p in loop.optimizer.state} <= trainable
    assert all(p.grad is None for p in loop.model.parameters() if not p.requires_grad)


def test_full_strategy_never_switches():
    _, runtime, summary = run(cfg("strategy=full"))
    assert summary["switch_epoch"] == -1 and summary["ranks"] == {}
    assert {r["phase"] for r in runtime.reports} == {"full"}


@pytest.mark.parametrize("stop_after", [0, 3])  # before the switch, and after it (in the LoRA phase)
def test_interrupted_run_resumes_exactly(reference, stop_after):
    _, ref_runtime, ref = reference
    first = LocalRuntime(stop_after_epoch=stop_after)
    with pytest.raises(StopTraining):
        run(cfg(), first)
    _, resumed_runtime, summary = run(cfg(), LocalRuntime(resume_from=first.checkpoints[-1]))
    for key in ("switch_epoch", "freeze_epoch", "ranks", "final_val_acc", "best_val_acc"):
        assert summary[key] == ref[key], key
    ref_losses = [r["train_loss"] for r in ref_runtime.reports]
    assert [r["train_loss"] for r in first.reports] + [r["train_loss"] for r in resumed_runtime.reports] == ref_losses


def test_step_windows_switch_mid_run_and_train_to_the_end():
    _, runtime, summary = run(cfg("prelora.window_unit=step", "prelora.m=4", "epochs=4"))
    assert summary["switch_epoch"] == 0  # 23 steps per epoch: the first boundary at step 8 already passes
    assert runtime.reports[0]["phase"] == "full" and runtime.reports[-1]["phase"] == "lora"
    assert summary["freeze_epoch"] == 1


def test_no_switch_when_thresholds_are_strict():
    _, _, summary = run(cfg("prelora.tau=0.0001", "prelora.zeta=0.0001", "epochs=4"))
    assert summary["switch_epoch"] == -1


def test_export_is_a_plain_vit_with_the_loops_outputs(tmp_path):
    settings = cfg("epochs=4")
    loop = TrainingLoop(settings, LocalRuntime())
    loop.run()
    loop.wrapped.eval()
    x = torch.stack([loop.data.val[i][0] for i in range(16)])
    with torch.no_grad():
        expected = loop.wrapped(pixel_values=x).logits
    loop.export_merged(tmp_path / "merged")
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, expected, atol=1e-5)


def test_train_function_summary():
    summary = train(cfg("epochs=3"))
    assert set(summary) >= {"mean_epoch_time_s", "final_val_acc", "best_val_acc", "total_train_time_s", "switch_epoch", "ranks"}
    assert 0.0 <= summary["final_val_acc"] <= summary["best_val_acc"] <= 1.0


def test_divergence_stops_with_a_clear_error():
    with pytest.raises(FloatingPointError, match="diverged"):
        run(cfg("optim.lr=1e6", "optim.grad_clip=null", "optim.lr_warmup_epochs=0", "epochs=3"))


@pytest.mark.parametrize(
    "step, expected",
    [(0, 0.1), (9, 1.0), (10, 1.0), (55, 0.5), (100, 0.0)],
)
def test_lr_schedule_warmup_then_cosine(step, expected):
    # 10 warmup steps: step 0 -> 1/10; cosine over the remaining 90: step 55 is halfway -> 0.5
    assert lr_factor(step, total_steps=100, warmup_steps=10, schedule="cosine", min_ratio=0.0) == pytest.approx(expected)
