"""ViT presets built from transformers' ViTConfig (never downloaded), the module families and parameter groups.

The one place that knows transformers' ViT naming. Light to import (torch and transformers load when a model is
built): the strategies' config sections read the family and group names before anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from prelora_ray.config import ModelSettings


@dataclass(frozen=True, kw_only=True)
class ViTShape:
    """Transformer width and depth of a preset."""

    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_size: int
    patch_size: int


PRESETS: dict[str, ViTShape] = {
    "vit-digits": ViTShape(hidden_size=64, num_layers=4, num_heads=4, mlp_size=128, patch_size=2),
    # digits with a LoRA phase cheaper than full training on CPU: 5 tokens of width 256, so the frozen
    # weights' gradients and optimizer state are most of a step (benchmarks/demo_model.py)
    "vit-digits-wide": ViTShape(hidden_size=256, num_layers=2, num_heads=4, mlp_size=256, patch_size=4),
    "vit-tiny": ViTShape(hidden_size=192, num_layers=12, num_heads=3, mlp_size=768, patch_size=16),
    "vit-small": ViTShape(hidden_size=384, num_layers=12, num_heads=6, mlp_size=1536, patch_size=16),
    "vit-base": ViTShape(hidden_size=768, num_layers=12, num_heads=12, mlp_size=3072, patch_size=16),
    "vit-large": ViTShape(hidden_size=1024, num_layers=24, num_heads=16, mlp_size=4096, patch_size=16),
    "vit-huge": ViTShape(hidden_size=1280, num_layers=32, num_heads=16, mlp_size=5120, patch_size=14),
}

FAMILY_MODULES: dict[str, str] = {
    "query": "attention.q_proj",
    "key": "attention.k_proj",
    "value": "attention.v_proj",
    "attn_out": "attention.o_proj",
    "mlp_in": "mlp.fc1",
    "mlp_out": "mlp.fc2",
}
"""Module family -> linear inside each encoder layer `vit.layers.<i>` (transformers 5.x names)."""

MODULE_FAMILIES = tuple(FAMILY_MODULES)
"""Module families that can get adapters (see docs/algorithms.md for the transformers module names)."""

LAYER_PREFIX = "vit.layers"

PARAM_GROUPS = ("head", "norms", "embeddings", "biases")
"""Groups of a ViT's parameters by role (e.g. those `prelora.trainable_after_freeze` keeps training)."""


def in_param_group(name: str, group: str) -> bool:
    """Whether a parameter (by name, on the plain or the PEFT model, with or without a DDP prefix) is in `group`."""
    if group == "head":
        return ".classifier." in f".{name}"
    if group == "norms":
        return "layernorm" in name
    if group == "embeddings":
        return ".embeddings." in f".{name}"
    if group == "biases":
        return name.endswith(".bias")
    raise ValueError(f"unknown parameter group {group!r}: one of {', '.join(PARAM_GROUPS)}")


def check_model_shape(settings: ModelSettings, image_size: int) -> None:
    """Raise ValueError when the patch size does not tile the image (before any work starts)."""
    patch = settings.patch_size or PRESETS[settings.preset].patch_size
    if image_size % patch != 0:
        raise ValueError(
            f"model.patch_size={patch} does not divide the image size {image_size}: "
            f"set model.patch_size to a divisor of {image_size} or data.image_size to a multiple of {patch}"
        )


def build_model(settings: ModelSettings, *, num_classes: int, image_size: int, num_channels: int) -> nn.Module:
    """A randomly initialised ViTForImageClassification for the preset and data shape."""
    from transformers import ViTConfig, ViTForImageClassification

    check_model_shape(settings, image_size)
    shape = PRESETS[settings.preset]
    config = ViTConfig(
        image_size=image_size,
        patch_size=settings.patch_size or shape.patch_size,
        num_channels=num_channels,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.mlp_size,
        hidden_dropout_prob=settings.dropout,
        attention_probs_dropout_prob=settings.attention_dropout,
        num_labels=num_classes,
    )
    return ViTForImageClassification(config)


def family_module_names(model: nn.Module, families: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """Family -> full module names, one per encoder layer in order, on an unwrapped ViT.

    Works on the plain model (`vit.layers.0.attention.q_proj`) and raises when a family's module is
    missing, which is how a changed transformers naming would show up.
    """
    names = {name for name, _ in model.named_modules()}
    num_layers = len(model.get_submodule(LAYER_PREFIX))
    out: dict[str, list[str]] = {}
    for family in families:
        layer_names = [f"{LAYER_PREFIX}.{i}.{FAMILY_MODULES[family]}" for i in range(num_layers)]
        missing = [n for n in layer_names if n not in names]
        if missing:
            raise RuntimeError(f"module family {family!r}: {missing[0]} not found in the model; the ViT naming changed")
        out[family] = layer_names
    return out
