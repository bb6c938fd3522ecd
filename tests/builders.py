"""Small things many test modules build: a tiny ViT and its inputs, rank patterns, the loop's synthetic base config, a
runtime that stops at the switch, the export check, and the config of a short Ray Train run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from prelora_ray import metrics as M
from prelora_ray.config import ModelSettings, TrainSettings
from prelora_ray.models import FAMILY_MODULES, build_model
from prelora_ray.runtime import LocalRuntime, StopTraining
from prelora_ray.trainer import TrainingLoop

FAMILIES = tuple(FAMILY_MODULES)
# a switch within a few epochs on digits: thresholds wide open, short windows, on the 4-layer vit-digits
FAST_SWITCH = [
    "prelora.k=2",
    "prelora.m=1",
    "prelora.tau=50",
    "prelora.zeta=50",
    "prelora.warmup=1",
    "model.preset=vit-digits",
]


def tiny_vit(seed: int = 0) -> nn.Module:
    """vit-digits: 4 layers, hidden 64, 8x8 single-channel input."""
    torch.manual_seed(seed)
    return build_model(ModelSettings(preset="vit-digits"), num_classes=10, image_size=8, num_channels=1).eval()


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def ranks_for(layers: int, pattern: list[int], families=FAMILIES) -> dict[str, list[int]]:
    """A different per-layer pattern per family (shifted), so a mix-up between families shows."""
    return {f: [pattern[(i + j) % len(pattern)] for i in range(layers)] for j, f in enumerate(families)}


def randomize_lora_b(model: nn.Module, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def synthetic_run(epochs: int) -> list[str]:
    """A short deterministic run's --set values: vit-digits on synthetic 3x8x8 data, 8 steps per epoch, untracked."""
    return [
        f"epochs={epochs}",
        "deterministic=true",
        "model.preset=vit-digits",
        "tracking.enabled=false",
        "data.name=synthetic",
        "data.image_size=8",
        "data.synthetic_samples=256",
        "data.batch_size=32",
    ]


def short_scan(epochs: int) -> list[str]:
    """A short deterministic scan's --set values on digits: vit-digits, windows of k=2 x m=1 epoch, warmup 1."""
    return [
        f"epochs={epochs}",
        "deterministic=true",
        "model.preset=vit-digits",
        "prelora.k=2",
        "prelora.m=1",
        "prelora.warmup=1",
    ]


# The loop's own tests' run: synthetic 3x8x8 data, 8 steps per epoch, a switch at the first boundary that passes.
LOOP_EPOCHS = 12
LOOP_BASE = [
    *synthetic_run(LOOP_EPOCHS),
    "prelora.k=2",
    "prelora.m=1",
    "prelora.tau=50",
    "prelora.zeta=50",
    "prelora.warmup=2",
]


class StopAtSwitch(LocalRuntime):
    """Stops a live run right after the epoch whose report carries the switch."""

    def report(self, metrics, state):
        super().report(metrics, state)
        if metrics.get(M.SWITCH_EPOCH, -1) >= 0:
            raise StopTraining("switched")


def check_export(name: str, loop: TrainingLoop, tmp_path: Path) -> None:
    """`export_merged` of a finished run: a plain ViT that transformers loads, with the run's eval outputs."""
    from transformers import ViTForImageClassification

    shape = (6, loop.data.num_channels, loop.data.image_size, loop.data.image_size)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    loop.wrapped.eval()
    with torch.no_grad():
        trained = loop.wrapped(pixel_values=x).logits.clone()
    path = loop.export_merged(tmp_path / f"{name}-merged")
    loaded = ViTForImageClassification.from_pretrained(path).eval()
    assert type(loaded) is ViTForImageClassification
    assert not any("lora_" in n or "lte_" in n or "base_layer" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, trained, atol=1e-5)


def ray_run_config(tmp_path: Path, tracking_uri: str, experiment: str, *extra: str) -> TrainSettings:
    """A short deterministic digits run for Ray Train tests: 6 epochs, a switch within them, its storage, outputs and
    MLflow experiment in the test's folder and store."""
    return TrainSettings.load(
        None,
        [
            "epochs=6",
            "deterministic=true",
            *FAST_SWITCH,
            f"cluster.storage_path={tmp_path / 'ray'}",
            f"output_dir={tmp_path / 'out'}",
            f"tracking.uri={tracking_uri}",
            f"tracking.experiment={experiment}",
            *extra,
        ],
    )
