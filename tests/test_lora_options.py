"""The LoRA phase's options and its cost-cutting: rank 0 (frozen prefix), dropout, the lean forward, the freeze.

No timings here (benchmarks/ measures them); these check that each saving leaves the results unchanged.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from prelora_ray.adapters.lean import LeanLoraLinear, lean_lora_forward
from prelora_ray.adapters.lora import inject_lora, injected_ranks
from prelora_ray.adapters.model import merge_adapters as merge_lora
from prelora_ray.adapters.model import set_trainable
from prelora_ray.algorithms import assign_ranks
from prelora_ray.config import ModelSettings, TrainSettings
from prelora_ray.models import FAMILY_MODULES, build_model
from prelora_ray.runtime import LocalRuntime
from prelora_ray.strategies import Phase
from prelora_ray.strategies.prelora import PreLoRASettings
from prelora_ray.trainer import TrainingLoop
from tests.builders import FAST_SWITCH

FAMILIES = tuple(FAMILY_MODULES)


def vit(layers: int = 4, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    if layers == 4:
        return build_model(ModelSettings(preset="vit-digits"), num_classes=10, image_size=8, num_channels=1)
    cfg = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(cfg)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def prefix_ranks(layers: int, frozen: int, rank: int = 4) -> dict[str, list[int]]:
    """Rank 0 on every family of the first `frozen` layers, `rank` on the rest."""
    return {f: [0 if i < frozen else rank for i in range(layers)] for f in FAMILIES}


def randomize_lora_b(model: torch.nn.Module, seed: int = 2) -> None:
    """B starts at zero; give it values so that the adapters change outputs and gradients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def loss_and_grads(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- rank 0: no adapter, frozen ----------------------------------------------------------------------


def test_rank_zero_module_has_no_adapter_and_a_frozen_base_after_the_freeze():
    changes = {f: [0.05, 0.5, 2.0, 4.0] for f in FAMILIES}  # |ΔW| per layer, percent
    ranks = assign_ranks(changes, 2, 16, zero_rank_below=0.1)
    assert all(r[0] == 0 and all(v > 0 for v in r[1:]) for r in ranks.values())
    settings = PreLoRASettings(zero_rank_below=0.1)
    model = inject_lora(vit(), ranks, settings)
    set_trainable(model, Phase.LORA, settings)
    root = model.base_model.model
    for family, module in FAMILY_MODULES.items():
        zero = root.get_submodule(f"vit.layers.0.{module}")
        assert not hasattr(zero, "lora_A") and type(zero) is torch.nn.Linear  # a plain linear: no adapter at all
        assert not zero.weight.requires_grad and not zero.bias.requires_grad
        kept = root.get_submodule(f"vit.layers.1.{module}")
        assert kept.r["default"] == ranks[family][1]
        assert not kept.base_layer.weight.requires_grad and kept.lora_A["default"].weight.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if "layers.0." in n)  # the whole layer
    assert set(injected_ranks(model)) == {f"vit.layers.{i}.{m}" for i in (1, 2, 3) for m in FAMILY_MODULES.values()}
    # WARMUP trains everything, the rank-0 linears included; LORA freezes them again
    set_trainable(model, Phase.WARMUP, settings)
    assert root.get_submodule("vit.layers.0.attention.q_proj").weight.requires_grad


@pytest.mark.parametrize(
    "settings",
    [
        PreLoRASettings(zero_rank_below=1.0),
        PreLoRASettings(lora_dropout=0.3),
        PreLoRASettings(lora_dropout=0.3, zero_rank_below=1.0),
    ],
    ids=["zero_rank_below", "dropout", "both"],
)
def test_outputs_unchanged_at_injection(settings):
    model = vit().eval()
    x, _ = batch()
    changes = {f: [0.2, 3.0, 0.5, 9.0] for f in FAMILIES}
    ranks = assign_ranks(changes, 2, 16, zero_rank_below=settings.zero_rank_below)
    with torch.no_grad():
        before = model(pixel_values=x).logits
        after = inject_lora(model, ranks, settings).eval()(pixel_values=x).logits
    assert torch.equal(before, after)  # B = 0: exactly the same, not just close


def test_dropout_is_active_in_train_mode_and_off_in_eval_mode():
    settings = PreLoRASettings(lora_dropout=0.5)
    model = inject_lora(vit(), prefix_ranks(4, 0), settings)
    randomize_lora_b(model)
    x, _ = batch()
    with torch.no_grad():
        model.eval()
        a, b = model(pixel_values=x).logits, model(pixel_values=x).logits
        model.train()
        c = model(pixel_values=x).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)


# -- the frozen prefix: backward stops early, nothing else changes -------------------------------------


def test_frozen_prefix_gives_the_same_loss_and_adapter_grads_as_computing_grads_everywhere():
    layers, frozen = 6, 3
    settings = PreLoRASettings()
    prefix = inject_lora(vit(layers), prefix_ranks(layers, frozen), settings)
    randomize_lora_b(prefix)
    set_trainable(prefix, Phase.LORA, settings)
    everywhere = copy.deepcopy(prefix)
    for p in everywhere.parameters():  # same weights, every parameter asks for its gradient
        p.requires_grad_(True)
    prefix.train(), everywhere.train()
    x, y = batch()

    seen = {}
    last_frozen = prefix.base_model.model.vit.layers[frozen - 1]
    last_frozen.register_forward_hook(
        lambda mod, inp, out: seen.update(requires_grad=(out[0] if isinstance(out, tuple) else out).requires_grad)
    )
    loss_prefix, grads_prefix = loss_and_grads(prefix, x, y)
    loss_all, grads_all = loss_and_grads(everywhere, x, y)

    assert seen["requires_grad"] is False  # nothing before layer `frozen` is in the backward graph
    assert torch.equal(loss_prefix, loss_all)
    lora = sorted(n for n in grads_prefix if "lora_" in n)
    assert lora and set(grads_prefix) == set(lora)  # only adapters get gradients
    assert all(f"layers.{i}." not in n for n in lora for i in range(frozen))
    for name in lora:
        assert torch.equal(grads_prefix[name], grads_all[name]), name
    assert any("layers.0.attention.q_proj.weight" in n for n in grads_all)  # the other path did compute them
    assert all(p.grad is None for n, p in prefix.named_parameters() if "layers.0." in n or "embeddings" in n)


# -- what the LoRA phase keeps: no copies, no grads, no optimizer state for frozen weights ----------------


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, *, amp: bool = False) -> int:
    """Bytes saved for backward by one forward (parameters excluded; tensors sharing storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            model(pixel_values=x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def test_lora_dropout_zero_saves_no_copy_of_the_layer_input():
    settings = PreLoRASettings(lora_dropout=0.0)
    model = inject_lora(vit(), prefix_ranks(4, 0), settings)
    set_trainable(model, Phase.LORA, settings)
    model.train()
    fc2 = model.base_model.model.vit.layers[2].mlp.fc2
    x = torch.randn(4, 17, 128, requires_grad=True)
    storages = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: storages.append(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        fc2(x)
    assert x.untyped_storage().data_ptr() in storages  # the input itself is what LoRA's A keeps
    params = {q.untyped_storage().data_ptr() for q in fc2.parameters()}
    assert len({p for p in storages if p not in params}) == 2  # x and the rank-r hidden A·x: no copy of x


def test_lean_forward_matches_peft_forward_in_every_phase():
    settings = PreLoRASettings()
    lean = inject_lora(vit(), {f: [2, 0, 4, 8] for f in FAMILIES}, settings)
    assert isinstance(lean.base_model.model.vit.layers[0].attention.q_proj, LeanLoraLinear)
    randomize_lora_b(lean)
    stock = copy.deepcopy(lean)
    assert lean_lora_forward(stock, False) == 18
    x, y = batch(16)
    for phase in (Phase.WARMUP, Phase.LORA):
        for model in (lean, stock):
            set_trainable(model, phase, settings)
            model.train()
        loss_lean, grads_lean = loss_and_grads(lean, x, y)
        loss_stock, grads_stock = loss_and_grads(stock, x, y)
        assert torch.allclose(loss_lean, loss_stock, rtol=1e-6, atol=1e-7)
        assert set(grads_lean) == set(grads_stock)
        for name, grad in grads_lean.items():
            assert torch.allclose(grad, grads_stock[name], rtol=1e-5, atol=1e-7), name


def test_lean_forward_with_dropout_matches_peft_forward():
    settings = PreLoRASettings(lora_dropout=0.2)
    lean = inject_lora(vit(), prefix_ranks(4, 1), settings)
    randomize_lora_b(lean)
    stock = copy.deepcopy(lean)
    lean_lora_forward(stock, False)
    x, _ = batch()
    lean.train(), stock.train()
    torch.manual_seed(5)
    a = lean(pixel_values=x).logits
    torch.manual_seed(5)
    b = stock(pixel_values=x).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_lean_forward_saves_no_fp32_copy_under_bf16_autocast():
    settings = PreLoRASettings()
    lean = inject_lora(vit(), prefix_ranks(4, 0), settings)
    set_trainable(lean, Phase.LORA, settings)
    stock = copy.deepcopy(lean)
    lean_lora_forward(stock, False)
    lean.train(), stock.train()
    x, _ = batch(32)
    assert saved_activation_bytes(lean, x) == saved_activation_bytes(stock, x)  # in fp32 neither copies anything
    # PEFT casts the bf16 inputs of o_proj and fc2 to fp32 (and autocast back to bf16, which it saves)
    assert saved_activation_bytes(lean, x, amp=True) < saved_activation_bytes(stock, x, amp=True)


def test_lean_forward_falls_back_to_peft_when_merged_or_disabled_and_pickles():
    settings = PreLoRASettings()
    model = inject_lora(vit(), prefix_ranks(4, 0), settings).eval()
    randomize_lora_b(model)
    x, _ = batch()
    with torch.no_grad():
        adapted = model(pixel_values=x).logits
        with model.disable_adapter():
            plain = model(pixel_values=x).logits
        assert not torch.allclose(adapted, plain)
        reloaded = pickle.loads(pickle.dumps(model))
        assert torch.equal(reloaded(pixel_values=x).logits, adapted)
        model.base_model.merge_adapter()
        assert torch.allclose(model(pixel_values=x).logits, adapted, atol=1e-5)
        model.base_model.unmerge_adapter()
        merged = merge_lora(model)
        assert type(merged) is ViTForImageClassification
        assert torch.allclose(merged(pixel_values=x).logits, adapted, atol=1e-5)


def test_after_the_freeze_only_trainable_parameters_have_optimizer_state_and_grads():
    cfg = TrainSettings.load(None, ["epochs=8", "tracking.enabled=false", "prelora.zero_rank_below=1.0", *FAST_SWITCH])
    loop = TrainingLoop(cfg, LocalRuntime())
    summary = loop.run()
    assert 0 <= summary["switch_epoch"] < summary["freeze_epoch"] < cfg.epochs - 1 and loop.state.phase is Phase.LORA
    params = dict(loop.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    in_optimizer = {id(p) for g in loop.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(params[n]) for n in trainable}
    assert {id(p) for p in loop.optimizer.state} == in_optimizer  # moments for each trainable one, none else
    for name, p in params.items():
        if not p.requires_grad:
            assert p.grad is None, name
    # on digits the MLP layers change by less than 1 % at the switch: they get rank 0, stay plain and frozen
    zero = [(f, i) for f, rs in summary["ranks"].items() for i, r in enumerate(rs) if r == 0]
    assert zero and len(zero) < sum(len(rs) for rs in summary["ranks"].values())
    root = loop.model.base_model.model
    for family, layer in zero:
        module = root.get_submodule(f"vit.layers.{layer}.{FAMILY_MODULES[family]}")
        assert type(module) is torch.nn.Linear and not module.weight.requires_grad
