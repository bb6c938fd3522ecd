"""The switch on real PEFT adapters: output unchanged, per-layer ranks as assigned, freeze, merged export."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from prelora_ray.config import ModelSettings, PreLoRASettings
from prelora_ray.models import FAMILY_MODULES, build_model
from prelora_ray.switch import Phase, inject_lora, injected_ranks, merge_lora, set_trainable

FAMILIES = tuple(FAMILY_MODULES)


def tiny_vit(layers: int = 4) -> ViTForImageClassification:
    torch.manual_seed(0)
    if layers == 4:
        return build_model(ModelSettings(), num_classes=10, image_size=8, num_channels=1).eval()
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(cfg).eval()


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def ranks_for(layers: int, pattern: list[int]) -> dict[str, list[int]]:
    return {f: [pattern[(i + j) % len(pattern)] for i in range(layers)] for j, f in enumerate(FAMILIES)}


@pytest.mark.parametrize("settings", [PreLoRASettings(), PreLoRASettings(lora_dropout=0.1), PreLoRASettings(zero_rank_below=0.1)])
def test_output_unchanged_at_injection(settings):
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        before = model(pixel_values=x).logits
        peft_model = inject_lora(model, ranks_for(4, [2, 4, 8, 0]), settings).eval()
        after = peft_model(pixel_values=x).logits
    assert torch.allclose(before, after, atol=1e-6)


def test_per_layer_ranks_and_alpha_match_the_assignment_even_layer_1_vs_11():
    model = tiny_vit(layers=12)
    ranks = {f: [2] * 12 for f in FAMILIES}
    ranks["query"][1], ranks["query"][10], ranks["query"][11] = 16, 4, 8  # the `layers.1.` regex trap
    ranks["mlp_out"][0] = 0  # no adapter at all
    settings = PreLoRASettings(alpha_scale=2.0)
    peft_model = inject_lora(model, ranks, settings)
    got = injected_ranks(peft_model)
    expected = {f"vit.layers.{i}.{FAMILY_MODULES[f]}": r for f, rs in ranks.items() for i, r in enumerate(rs) if r > 0}
    assert got == expected
    root = peft_model.base_model.model
    assert root.get_submodule("vit.layers.1.attention.q_proj").scaling["default"] == pytest.approx(2.0)
    assert root.get_submodule("vit.layers.11.attention.q_proj").lora_A["default"].weight.shape == (8, 32)
    assert not hasattr(root.get_submodule("vit.layers.0.mlp.fc2"), "lora_A")


def test_phases_set_what_trains():
    settings = PreLoRASettings()
    model = inject_lora(tiny_vit(), ranks_for(4, [2, 4]), settings)
    set_trainable(model, Phase.WARMUP, settings)
    assert all(p.requires_grad for p in model.parameters())
    set_trainable(model, Phase.LORA, settings)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_base = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("q_proj.base_layer.weight") for n in frozen_base)
    assert any("classifier" in n for n in frozen_base)


def test_trainable_after_freeze_keeps_head_training():
    settings = PreLoRASettings(trainable_after_freeze=("head", "norms"))
    model = inject_lora(tiny_vit(), ranks_for(4, [2]), settings)
    set_trainable(model, Phase.LORA, settings)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier.weight" in n for n in trainable)
    assert any("layernorm" in n for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable)


def test_merged_export_equals_adapter_model_and_round_trips(tmp_path):
    model = inject_lora(tiny_vit(), ranks_for(4, [2, 4, 8]), PreLoRASettings())
    with torch.no_grad():  # make the adapters do something: B is zero after injection
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.eval()
    x = images()
    with torch.no_grad():
        adapted = model(pixel_values=x).logits
        merged = merge_lora(model).eval()
        plain = merged(pixel_values=x).logits
    assert type(merged) is ViTForImageClassification
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(adapted, plain, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, plain, atol=1e-6)


def test_wrong_number_of_ranks_is_an_error():
    with pytest.raises(ValueError, match="ranks for 4 layers"):
        inject_lora(tiny_vit(), {"query": [2, 2]}, PreLoRASettings())
