"""The switch's parts (`adapters.lora`, `adapters.model`, the phases) on real PEFT adapters and real transformers
ViTs (built from configs, nothing downloaded):
output unchanged at injection, per-layer ranks and alphas exactly as assigned (layer 1 vs 10/11),
rank 0 means no adapter, what trains in each phase, and the merged export."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from prelora_ray.adapters import lean as lean_module
from prelora_ray.adapters.lora import inject_lora, injected_ranks, rank_by_module
from prelora_ray.adapters.model import merge_adapters as merge_lora
from prelora_ray.adapters.model import set_trainable
from prelora_ray.adapters.names import ADAPTER
from prelora_ray.models import FAMILY_MODULES
from prelora_ray.strategies import Phase
from prelora_ray.strategies.phases import phase_index
from prelora_ray.strategies.prelora import PreLoRASettings
from tests.builders import FAMILIES, images, randomize_lora_b, ranks_for, tiny_vit


def vit12(seed: int = 0) -> ViTForImageClassification:
    """12 encoder layers (so `layers.1.` could wrongly match layers 10 and 11), hidden 32."""
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    return ViTForImageClassification(cfg).eval()


def lora_module(peft_model: nn.Module, layer: int, family: str) -> nn.Module:
    return peft_model.base_model.model.get_submodule(f"vit.layers.{layer}.{FAMILY_MODULES[family]}")


def assert_ranks_match(peft_model: nn.Module, ranks: dict[str, list[int]], alpha_scale: float) -> None:
    for family, family_ranks in ranks.items():
        for layer, rank in enumerate(family_ranks):
            module = lora_module(peft_model, layer, family)
            where = f"layer {layer} {family}"
            if rank == 0:
                assert not hasattr(module, "lora_A"), f"{where}: rank 0 must get no adapter"
                assert type(module) is nn.Linear, where
                continue
            assert module.r[ADAPTER] == rank, f"{where}: r={module.r[ADAPTER]}, assigned {rank}"
            assert module.lora_alpha[ADAPTER] == pytest.approx(alpha_scale * rank), where
            assert module.scaling[ADAPTER] == pytest.approx(alpha_scale), where
            base = module.base_layer
            assert module.lora_A[ADAPTER].weight.shape == (rank, base.in_features), where
            assert module.lora_B[ADAPTER].weight.shape == (base.out_features, rank), where


# -- injection leaves the function unchanged -------------------------------------------------------


@pytest.mark.parametrize(
    "settings, pattern, families",
    [
        pytest.param(PreLoRASettings(), [2, 4, 8, 16], FAMILIES, id="default"),
        pytest.param(PreLoRASettings(lora_dropout=0.1), [2, 4, 8, 16], FAMILIES, id="lora-dropout"),
        pytest.param(PreLoRASettings(alpha_scale=4.0), [1, 2], FAMILIES, id="alpha-scale-4"),
        pytest.param(PreLoRASettings(), [4, 0, 8, 0], FAMILIES, id="with-rank-0"),
        pytest.param(PreLoRASettings(modules=("query", "value")), [8, 2], ("query", "value"), id="two-families"),
    ],
)
def test_inject_lora_leaves_eval_outputs_unchanged(settings, pattern, families):
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        before = model(pixel_values=x).logits.clone()
        peft_model = inject_lora(model, ranks_for(4, pattern, families), settings).eval()
        after = peft_model(pixel_values=x).logits
    assert torch.allclose(before, after, atol=1e-6), (before - after).abs().max()


def test_adapters_start_with_b_zero_and_a_non_zero_so_training_can_start():
    model = inject_lora(tiny_vit(), ranks_for(4, [2, 4]), PreLoRASettings())
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert a and len(a) == len(b) == 4 * len(FAMILIES)
    assert all(torch.count_nonzero(p) == 0 for p in b)
    assert all(torch.count_nonzero(p) > 0 for p in a)  # A = 0 and B = 0 would give both zero gradient
    model.train()
    loss = nn.functional.cross_entropy(model(pixel_values=images()).logits, torch.arange(6) % 10)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b)


# -- per-layer ranks -------------------------------------------------------------------------------


def test_per_layer_ranks_and_scaling_equal_the_assignment_4_layers():
    ranks = ranks_for(4, [2, 4, 8, 16])
    model = inject_lora(tiny_vit(), ranks, PreLoRASettings())
    assert_ranks_match(model, ranks, 2.0)
    assert injected_ranks(model) == {
        f"vit.layers.{i}.{FAMILY_MODULES[f]}": r for f, rs in ranks.items() for i, r in enumerate(rs)
    }


@pytest.mark.parametrize("alpha_scale", [2.0, 4.0, 0.5])
def test_alpha_is_scale_times_rank_per_layer(alpha_scale):
    ranks = ranks_for(4, [1, 2, 4, 8])
    model = inject_lora(tiny_vit(), ranks, PreLoRASettings(alpha_scale=alpha_scale))
    assert_ranks_match(model, ranks, alpha_scale)


@pytest.mark.parametrize(
    "special",
    [
        pytest.param({1: 16, 10: 4, 11: 8}, id="layer1-high"),  # a `layers.1` prefix would give 10 and 11 rank 16
        pytest.param({1: 2, 10: 16, 11: 16}, id="layer1-low"),  # or give layer 1 rank 16 from `layers.1*`
        pytest.param({0: 8, 1: 4, 10: 16, 11: 2}, id="first-and-last"),
    ],
)
def test_twelve_layers_layer_1_and_layers_10_11_get_their_own_ranks(special):
    ranks = {f: [2] * 12 for f in FAMILIES}
    for family in FAMILIES:
        for layer, rank in special.items():
            ranks[family][layer] = rank
    ranks["value"][1], ranks["value"][10], ranks["value"][11] = 8, 1, 4  # a family with a different pattern
    model = inject_lora(vit12(), ranks, PreLoRASettings())
    assert_ranks_match(model, ranks, 2.0)
    got = injected_ranks(model)
    assert got["vit.layers.1.attention.q_proj"] == special[1]
    assert got["vit.layers.10.attention.q_proj"] == special[10]
    assert got["vit.layers.11.attention.q_proj"] == special[11]
    assert (
        got["vit.layers.1.attention.v_proj"],
        got["vit.layers.10.attention.v_proj"],
        got["vit.layers.11.attention.v_proj"],
    ) == (8, 1, 4)
    assert len(got) == 12 * len(FAMILIES)


def test_twelve_layers_every_layer_distinct_rank_and_output_unchanged():
    pattern = [1, 2, 4, 8, 16, 1, 2, 4, 8, 16, 2, 1]
    ranks = {f: [pattern[(i + j) % 12] for i in range(12)] for j, f in enumerate(FAMILIES)}
    model = vit12()
    x = images()
    with torch.no_grad():
        before = model(pixel_values=x).logits.clone()
    peft_model = inject_lora(model, ranks, PreLoRASettings(alpha_scale=2.0)).eval()
    assert_ranks_match(peft_model, ranks, 2.0)
    with torch.no_grad():
        assert torch.allclose(before, peft_model(pixel_values=x).logits, atol=1e-6)


def test_rank_by_module_uses_unwrapped_names_and_drops_rank_0():
    targets = rank_by_module(vit12(), {"query": [0] + [4] * 10 + [8], "mlp_in": [2] * 12})
    assert "vit.layers.0.attention.q_proj" not in targets
    assert targets["vit.layers.1.attention.q_proj"] == 4 and targets["vit.layers.11.attention.q_proj"] == 8
    assert not any(name.startswith("module.") for name in targets)
    assert len(targets) == 11 + 12


# -- rank 0 ----------------------------------------------------------------------------------------


def test_rank_0_layers_get_no_adapter_and_stay_frozen_after_the_freeze():
    ranks = {f: [0, 4, 0, 8] for f in FAMILIES}
    ranks["query"] = [0, 0, 0, 2]
    settings = PreLoRASettings()
    model = inject_lora(tiny_vit(), ranks, settings)
    assert_ranks_match(model, ranks, 2.0)
    got = injected_ranks(model)
    assert all(int(name.split(".")[2]) in (1, 3) for name in got)
    assert "vit.layers.1.attention.q_proj" not in got and got["vit.layers.3.attention.q_proj"] == 2
    set_trainable(model, Phase.LORA, settings)
    for layer in (0, 2):
        for family in FAMILIES:
            assert not lora_module(model, layer, family).weight.requires_grad


def test_all_rank_0_is_an_error():
    with pytest.raises(ValueError, match="rank 0"):
        inject_lora(tiny_vit(), {f: [0, 0, 0, 0] for f in FAMILIES}, PreLoRASettings())


def test_wrong_number_of_ranks_is_an_error():
    with pytest.raises(ValueError, match="2 ranks for 4 layers"):
        inject_lora(tiny_vit(), {"query": [2, 2]}, PreLoRASettings())


def test_injecting_twice_is_an_error():
    model = inject_lora(tiny_vit(), ranks_for(4, [2]), PreLoRASettings())
    with pytest.raises(ValueError, match="already"):
        inject_lora(model, ranks_for(4, [2]), PreLoRASettings())


# -- what trains in each phase ----------------------------------------------------------------------


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_and_warmup_train_everything():
    settings = PreLoRASettings()
    plain = tiny_vit()
    set_trainable(plain, Phase.FULL, settings)
    assert trainable_names(plain) == {n for n, _ in plain.named_parameters()}
    model = inject_lora(plain, ranks_for(4, [2, 4]), settings)
    set_trainable(model, Phase.WARMUP, settings)
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}


def test_lora_phase_trains_only_lora_parameters():
    settings = PreLoRASettings()
    model = inject_lora(tiny_vit(), ranks_for(4, [2, 4]), settings)
    set_trainable(model, Phase.LORA, settings)
    names = {n for n, _ in model.named_parameters()}
    lora = {n for n in names if "lora_A" in n or "lora_B" in n}
    assert lora and trainable_names(model) == lora
    base = names - lora
    assert any(n.endswith("q_proj.base_layer.weight") for n in base)
    assert any("classifier" in n for n in base) and any("embeddings" in n for n in base)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in base)


def test_lora_phase_with_head_keeps_exactly_lora_and_classifier():
    settings = PreLoRASettings(trainable_after_freeze=("head",))
    model = inject_lora(tiny_vit(), ranks_for(4, [2, 4]), settings)
    set_trainable(model, Phase.LORA, settings)
    expected = {
        n for n, _ in model.named_parameters() if "lora_" in n or n.endswith(("classifier.weight", "classifier.bias"))
    }
    assert trainable_names(model) == expected
    assert sum("classifier" in n for n in expected) == 2


def test_lora_phase_drops_gradients_of_frozen_weights():
    settings = PreLoRASettings()
    model = inject_lora(tiny_vit(), ranks_for(4, [2]), settings)
    set_trainable(model, Phase.WARMUP, settings)
    nn.functional.cross_entropy(model(pixel_values=images()).logits, torch.arange(6) % 10).backward()
    set_trainable(model, Phase.LORA, settings)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_phase_index_is_fixed_per_phase_not_by_enum_order():
    # stored MLflow runs hold these numbers: a new phase takes the next free one, none is renumbered
    assert {p.value: p.index for p in Phase} == {"full": 0, "warmup": 1, "lora": 2, "relora": 3, "lte": 4}
    PHASE_INDEX = phase_index()
    assert PHASE_INDEX == {p: p.index for p in Phase} and len(set(PHASE_INDEX.values())) == len(Phase)


# -- merged export ----------------------------------------------------------------------------------


def test_merge_equals_the_adapter_model_and_round_trips_through_save_pretrained(tmp_path):
    original = tiny_vit()
    x = images(8)
    with torch.no_grad():
        plain_before = original(pixel_values=x).logits.clone()
    model = inject_lora(original, ranks_for(4, [2, 4, 8, 0]), PreLoRASettings())
    randomize_lora_b(model)
    model.eval()
    with torch.no_grad():
        adapted = model(pixel_values=x).logits.clone()
    assert not torch.allclose(adapted, plain_before, atol=1e-3)  # the adapters really do something
    merged = merge_lora(model).eval()
    with torch.no_grad():
        plain = merged(pixel_values=x).logits
    assert torch.allclose(adapted, plain, atol=1e-5), (adapted - plain).abs().max()
    # a plain transformers ViT: no PEFT wrapper, no LoRA modules, the plain model's parameter names
    assert type(merged) is ViTForImageClassification
    assert not hasattr(merged, "peft_config")
    assert not any(hasattr(m, "lora_A") or hasattr(m, "base_layer") for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny_vit().state_dict())
    merged.save_pretrained(tmp_path / "merged")
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(loaded) is ViTForImageClassification
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, plain, atol=1e-6)


def test_merge_on_twelve_layers_with_distinct_ranks(tmp_path):
    ranks = {f: [1, 16, 2, 4, 8, 2, 1, 4, 8, 2, 8, 16] for f in FAMILIES}
    model = inject_lora(vit12(), ranks, PreLoRASettings(alpha_scale=2.0))
    randomize_lora_b(model, std=0.3)
    model.eval()
    x = images()
    with torch.no_grad():
        adapted = model(pixel_values=x).logits.clone()
        merged = merge_lora(model).eval()
        assert torch.allclose(adapted, merged(pixel_values=x).logits, atol=1e-5)
    merged.save_pretrained(tmp_path / "m12")
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "m12").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, adapted, atol=1e-5)


def test_merge_of_a_plain_model_is_the_model():
    model = tiny_vit()
    assert merge_lora(model) is model


def test_lean_forward_matches_pefts_own_forward():
    lean_lora_forward = getattr(lean_module, "lean_lora_forward", None)
    if lean_lora_forward is None:
        pytest.skip("this version of the adapters has no lean LoRA forward")
    model = inject_lora(tiny_vit(), ranks_for(4, [2, 4, 8]), PreLoRASettings())
    randomize_lora_b(model)
    model.eval()
    x = images()
    with torch.no_grad():
        lean = model(pixel_values=x).logits.clone()
        assert lean_lora_forward(model, False) == 4 * len(FAMILIES)
        stock = model(pixel_values=x).logits.clone()
        assert lean_lora_forward(model, True) == 4 * len(FAMILIES)
    assert torch.allclose(lean, stock, atol=1e-6)
