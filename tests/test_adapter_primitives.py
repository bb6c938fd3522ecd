"""The adapter primitives of `adapters.lora` on real PEFT adapters over a real vit-digits ViT: each adapter's
delta, fold + re-initialise (function unchanged, B = 0, A != 0, B trainable), which parameters are
adapters', and the post-injection checks that survive `python -O`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from prelora_ray.adapters.lora import adapter_deltas, adapter_root, fold_adapters, inject_lora, reinit_adapters
from prelora_ray.adapters.names import ADAPTER, is_adapter_param
from prelora_ray.models import FAMILY_MODULES, family_module_names
from prelora_ray.monitor import layer_norms
from prelora_ray.strategies.prelora import PreLoRASettings
from tests.builders import images, randomize_lora_b, ranks_for, tiny_vit

FAMILIES = tuple(FAMILY_MODULES)


def _injected(rank_pattern: list[int] | None = None) -> torch.nn.Module:
    rank_pattern = [2, 8, 4] if rank_pattern is None else rank_pattern
    return inject_lora(tiny_vit(), ranks_for(4, rank_pattern), PreLoRASettings(), seed=3)


def _b_grads_nonzero(model: torch.nn.Module) -> bool:
    model.zero_grad(set_to_none=True)
    logits = model(pixel_values=images()).logits
    torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)) % 10).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    return bool(grads) and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_delta_is_scale_times_b_times_a_for_every_adapter():
    model = _injected()
    randomize_lora_b(model)
    deltas = adapter_deltas(model)
    root = adapter_root(model)
    assert len(deltas) == 4 * len(FAMILIES)
    for name, delta in deltas.items():
        mod = root.get_submodule(name)
        by_hand = mod.scaling[ADAPTER] * mod.lora_B[ADAPTER].weight @ mod.lora_A[ADAPTER].weight
        assert torch.allclose(delta, by_hand, atol=1e-6) and delta.shape == mod.base_layer.weight.shape


def test_fold_and_reinit_leave_the_function_and_the_norms_unchanged_and_b_trainable():
    model = _injected()
    assert _b_grads_nonzero(model), "right after injection: B = 0, A != 0, so B must get a gradient"
    randomize_lora_b(model)
    names = family_module_names(adapter_root(model), FAMILIES)
    before_out, before_norms = model(pixel_values=images()).logits.detach(), layer_norms(model, names)
    params_before = {n: p for n, p in model.named_parameters()}
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert fold_adapters(model) == 4 * len(FAMILIES)
    assert layer_norms(model, names) == before_norms  # Algorithm 1's input: W + s·B·A, bit for bit
    assert reinit_adapters(model, seed=11) == 4 * len(FAMILIES)
    after_out = model(pixel_values=images()).logits.detach()
    assert ((after_out - before_out).norm() / before_out.norm()) <= 1e-5
    assert layer_norms(model, names) == before_norms
    for name, p in model.named_parameters():
        assert p is params_before[name]  # in place: an optimizer's references stay valid
        if "lora_B" in name:
            assert not p.any()
        if "lora_A" in name:
            assert p.abs().sum() > 0 and not torch.equal(p, a_before[name])
    assert _b_grads_nonzero(model), "after a re-init B must get a gradient again (never A = B = 0)"


def test_reinit_draws_the_same_a_from_the_same_seed_and_leaves_the_global_rng_alone():
    one, two = _injected(), _injected()
    state = torch.get_rng_state()
    reinit_adapters(one, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    reinit_adapters(two, seed=5)
    a_one = [p for n, p in one.named_parameters() if "lora_A" in n]
    a_two = [p for n, p in two.named_parameters() if "lora_A" in n]
    assert all(torch.equal(x, y) for x, y in zip(a_one, a_two, strict=True))
    bound = max(1 / p.shape[1] ** 0.5 for p in a_one)  # Kaiming-uniform a = √5: U(-1/√fan_in, 1/√fan_in)
    assert all(p.abs().max() <= bound for p in a_one)


def test_is_adapter_param_picks_exactly_the_lora_tensors():
    model = _injected()
    adapters = {n for n, _ in model.named_parameters() if is_adapter_param(n)}
    assert len(adapters) == 2 * 4 * len(FAMILIES)
    assert all(n.endswith((f"lora_A.{ADAPTER}.weight", f"lora_B.{ADAPTER}.weight")) for n in adapters)
    assert not is_adapter_param("base_model.model.vit.layers.0.attention.q_proj.base_layer.weight")
    assert not is_adapter_param("module.base_model.model.classifier.weight")
    assert is_adapter_param("module.base_model.model.vit.layers.0.mlp.fc1.lora_A.default.weight")


def test_a_mis_ranked_injection_raises_even_under_python_O():
    # PEFT ignores a rank_pattern key that matches nothing and gives the default rank (the paper's bug):
    # here every key is spoiled, so layers whose rank differs from the first get the wrong one
    code = textwrap.dedent("""
        import re, types
        assert False, "asserts are on: this check needs python -O"
        from prelora_ray.adapters import lora
        from prelora_ray.config import ModelSettings
        from prelora_ray.models import build_model
        from prelora_ray.strategies.prelora import PreLoRASettings
        lora.re = types.SimpleNamespace(escape=lambda name: "nothing-" + re.escape(name))
        model = build_model(ModelSettings(preset="vit-digits"), num_classes=10, image_size=8, num_channels=1)
        try:
            lora.inject_lora(model, {"query": [2, 8, 2, 8]}, PreLoRASettings())
        except RuntimeError as exc:
            print("RAISED", exc)
        """)
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RAISED vit.layers.1.attention.q_proj: PEFT gave LoRA rank 2, assigned 8" in out.stdout
