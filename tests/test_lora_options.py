"""Beyond-the-paper options are correct: rank 0 means no adapter and frozen; a frozen prefix changes no number."""

from __future__ import annotations

import copy

import torch

from prelora_ray.config import ModelSettings, PreLoRASettings
from prelora_ray.models import FAMILY_MODULES, build_model
from prelora_ray.switch import Phase, inject_lora, set_trainable


def _model():
    torch.manual_seed(0)
    return build_model(ModelSettings(), num_classes=10, image_size=8, num_channels=1)


def _prefix_ranks() -> dict[str, list[int]]:
    return {f: [0, 0, 4, 8] for f in FAMILY_MODULES}  # layers 0-1 stable: rank 0


def test_rank_zero_layers_have_no_adapter_and_freeze():
    settings = PreLoRASettings(zero_rank_below=0.5)
    model = inject_lora(_model(), _prefix_ranks(), settings)
    set_trainable(model, Phase.LORA, settings)
    root = model.base_model.model
    for layer in (0, 1):
        for module in FAMILY_MODULES.values():
            m = root.get_submodule(f"vit.layers.{layer}.{module}")
            assert not hasattr(m, "lora_A")
            assert not m.weight.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if "layers.0." in n or "layers.1." in n)


def test_frozen_prefix_gives_the_same_loss_and_adapter_grads_as_the_plain_path():
    settings = PreLoRASettings()
    frozen = inject_lora(_model(), _prefix_ranks(), settings)
    with torch.no_grad():
        for name, p in frozen.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plain = copy.deepcopy(frozen)
    set_trainable(frozen, Phase.LORA, settings)  # prefix frozen: backward stops at layer 2
    set_trainable(plain, Phase.WARMUP, settings)  # everything requires grad: backward runs to the input
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 10
    losses, grads = [], []
    for model in (frozen, plain):
        model.train()
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    # and the frozen prefix really got no gradient
    assert all(p.grad is None for n, p in frozen.named_parameters() if "layers.0." in n or "embeddings" in n)
