"""What every adapter kind shares, on a whole model: the effective weight, requires_grad per phase, the adapters
taken out of the forward for a while, the export as a plain ViT, the DDP unwrap and a weights checksum.

A phase's trainable set is its own rule (`strategies.phases.Phase.trains`, declared by its strategy);
this module only applies it. PEFT is not imported here: LoRA layers are recognised by their attributes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prelora_ray.adapters import lora
from prelora_ray.adapters.lte import LTELinear, remove_lte_heads

if TYPE_CHECKING:
    from prelora_ray.strategies.phases import Phase

adapter_root = lora.adapter_root


def effective_weight(module: nn.Module) -> torch.Tensor:
    """A linear's weight as the forward sees it, detached: W, or W + s·B·A for each active LoRA adapter.

    An adapter layer that says its own (`effective_weight()`, e.g. LTE heads: W, the weight of eval) is asked.
    """
    own = getattr(module, "effective_weight", None)
    if callable(own):
        return own()
    if lora.is_lora_layer(module):
        return lora.lora_effective_weight(module)
    return module.weight.detach()


def set_trainable(model: nn.Module, phase: Phase, settings: Any) -> None:
    """requires_grad of every parameter as `phase.trains(name, settings)` says (`settings`: the strategy's own).

    A frozen parameter drops its gradient buffer.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(bool(phase.trains(name, settings)))
        if not param.requires_grad:
            param.grad = None


@contextlib.contextmanager
def adapters_bypassed(model: nn.Module) -> Iterator[None]:
    """Inside, the forward is the plain ViT's: PEFT's LoRA layers disabled, LTE heads bypassed (in training too).

    Nothing else changes, but PEFT sets requires_grad of a LoRA layer's adapter as it disables and enables it:
    a caller that needs requires_grad as it was restores it (calibration.py does).
    """
    lora_layers = [m for m in model.modules() if lora.is_lora_layer(m) and not m.disable_adapters]
    heads = [m for m in model.modules() if isinstance(m, LTELinear) and not m.bypass]
    for m in lora_layers:
        m.enable_adapters(False)
    for m in heads:
        m.bypass = True
    try:
        yield
    finally:
        for m in lora_layers:
            m.enable_adapters(True)
        for m in heads:
            m.bypass = False


def merge_adapters(model: nn.Module) -> nn.Module:
    """Every adapter folded into its base weight: a plain ViT with no adapter overhead (the export).

    LTE heads are removed, leaving W (their last merge is in it: `strategies.lte` ends every run with a
    merge); PEFT's LoRA is merged and unloaded.
    """
    return lora.merge_and_unload(remove_lte_heads(model))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def weights_checksum(model: nn.Module) -> str:
    """sha256 (16 hex digits) of every parameter's name and bytes, on the CPU: equal iff the weights are identical."""
    digest = hashlib.sha256()
    for name, param in unwrap(model).named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
