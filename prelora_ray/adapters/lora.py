"""PEFT LoRA on a ViT: the only module that imports PEFT or knows its classes.

Inject adapters with per-layer ranks (output unchanged, every key checked to have matched), read the
ranks back, each adapter's delta s·B·A, fold it into the base and re-initialise (ReLoRA's merge), and
the effective weight of a LoRA layer. The export as a plain ViT is `adapters.model.merge_adapters`.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from prelora_ray.adapters.lean import lean_lora_forward
from prelora_ray.adapters.names import ADAPTER
from prelora_ray.models import family_module_names

if TYPE_CHECKING:
    from prelora_ray.strategies.prelora import PreLoRASettings


def rank_by_module(model: nn.Module, ranks: dict[str, list[int]]) -> dict[str, int]:
    """Full module name (unwrapped model, no `module.` prefix) -> rank, for ranks > 0 only."""
    names = family_module_names(model, list(ranks))
    out: dict[str, int] = {}
    for family, family_ranks in ranks.items():
        if len(family_ranks) != len(names[family]):
            raise ValueError(f"family {family!r}: {len(family_ranks)} ranks for {len(names[family])} layers")
        for name, rank in zip(names[family], family_ranks, strict=True):
            if rank > 0:
                out[name] = int(rank)
    return out


def inject_lora(
    model: nn.Module, ranks: dict[str, list[int]], settings: PreLoRASettings, *, seed: int | None = None
) -> nn.Module:
    """Wrap the plain ViT with LoRA adapters of the given per-layer ranks; returns the PEFT model.

    `settings` gives `alpha_scale` and `lora_dropout` (the prelora section, or a copy with another scale).
    Keys of rank_pattern/alpha_pattern are whole, escaped module names: PEFT matches them as
    `(.*\\.)?KEY$`, so `vit\\.layers\\.1\\.attention\\.q_proj` cannot match layer 11. Each module
    is checked afterwards to carry its rank and alpha (a key that matches nothing is silently ignored
    by PEFT). B starts at zero, so the model's output is unchanged.

    With `seed`, A is drawn from its own generator state and the global RNG is left as it was: the
    injection then draws nothing from the training's random stream, so a run forked from a
    checkpoint taken after the switch epoch continues exactly as the run that switched live.
    """
    from peft import LoraConfig, get_peft_model

    if hasattr(model, "peft_config"):
        raise ValueError("the model already has LoRA adapters")
    targets = rank_by_module(model, ranks)
    if not targets:
        raise ValueError("every layer got rank 0: nothing to inject (lower prelora.zero_rank_below)")
    first = next(iter(targets.values()))
    config = LoraConfig(
        r=first,
        lora_alpha=settings.alpha_scale * first,
        target_modules=list(targets),
        rank_pattern={re.escape(name): r for name, r in targets.items()},
        alpha_pattern={re.escape(name): settings.alpha_scale * r for name, r in targets.items()},
        lora_dropout=settings.lora_dropout,
        bias="none",
    )
    with warnings.catch_warnings():  # transformers' own deprecation notice, raised inside PEFT
        warnings.simplefilter("ignore", FutureWarning)
        if seed is None:
            peft_model = get_peft_model(model, config)
        else:
            device = next(model.parameters()).device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                peft_model = get_peft_model(model, config)
    lean_lora_forward(peft_model, True)
    check_injection(peft_model, targets, settings.alpha_scale)
    return peft_model


def check_injection(model: nn.Module, targets: dict[str, int], scale: float) -> None:
    """Raise RuntimeError unless exactly `targets` carry an adapter, each of its rank and of scale alpha/r = `scale`.

    A raise, not an assert: it must hold under `python -O` too, since a silently mis-ranked layer
    (PEFT ignores a pattern key that matches nothing) is the bug of the paper's own code.
    """
    root = adapter_root(model)
    for name, rank in targets.items():
        module = root.get_submodule(name)
        got_r = getattr(module, "r", {}).get(ADAPTER)
        got_scale = getattr(module, "scaling", {}).get(ADAPTER)
        if got_r != rank:
            raise RuntimeError(f"{name}: PEFT gave LoRA rank {got_r}, assigned {rank}")
        if got_scale is None or abs(got_scale - scale) > 1e-9:
            raise RuntimeError(f"{name}: LoRA scale {got_scale}, expected {scale}")
    injected = set(adapter_modules(model))
    if injected != set(targets):
        raise RuntimeError(f"LoRA on {sorted(injected ^ set(targets))} differs from the assignment")


def adapter_root(model: nn.Module) -> nn.Module:
    """The ViT inside a PEFT model (module names as on the plain model), or the model itself."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name (plain-model names) -> LoRA layer carrying the adapter, in model order."""
    return {
        n: mod for n, mod in adapter_root(model).named_modules() if hasattr(mod, "lora_A") and ADAPTER in mod.lora_A
    }


def injected_ranks(model: nn.Module) -> dict[str, int]:
    """Module name -> LoRA rank actually present in a PEFT model (for checks and reports)."""
    return {n: mod.r[ADAPTER] for n, mod in adapter_modules(model).items()}


def is_lora_layer(module: nn.Module) -> bool:
    """Whether a module is a PEFT LoRA layer (a base layer wrapped with adapters)."""
    return hasattr(module, "lora_A") and hasattr(module, "base_layer")


def lora_effective_weight(module: nn.Module) -> torch.Tensor:
    """A LoRA layer's weight as the forward sees it, detached: W + s·B·A for each active adapter."""
    weight = module.base_layer.weight.detach()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight


@torch.no_grad()
def adapter_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> s·B·A of its adapter (shape of the base weight)."""
    return {name: mod.get_delta_weight(ADAPTER).detach() for name, mod in adapter_modules(model).items()}


@torch.no_grad()
def fold_adapters(model: nn.Module) -> int:
    """W += s·B·A in every adapter's base layer, then B = 0: the model computes the same function.

    In place (the tensors keep their identity, so an optimizer's references stay valid); A is
    kept, so re-initialise it next (`reinit_adapters`) for a fresh low-rank direction. Returns the
    number of folded modules.
    """
    modules = adapter_modules(model)
    for mod in modules.values():
        base = mod.get_base_layer().weight
        base.add_(mod.get_delta_weight(ADAPTER).to(base.dtype))
        mod.lora_B[ADAPTER].weight.zero_()
    return len(modules)


@torch.no_grad()
def reinit_adapters(model: nn.Module, *, seed: int) -> int:
    """B = 0 and A freshly drawn (PEFT's and ReLoRA's Kaiming-uniform, a = √5), in place.

    Never both zero: with A = B = 0 neither gets a gradient (ReLoRA's issue #18). A comes from its
    own generator seeded with `seed` (the global RNG is untouched), so a resumed run redraws the
    same A. Returns the number of re-initialised modules.
    """
    generator = torch.Generator().manual_seed(seed)
    modules = adapter_modules(model)
    for mod in modules.values():
        a = mod.lora_A[ADAPTER].weight
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=√5): gain √(2/6), bound gain·√(3/fan_in)
        fresh = torch.rand(a.shape, generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound)
        a.copy_(fresh.to(a.device, a.dtype))
        mod.lora_B[ADAPTER].weight.zero_()
    return len(modules)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the PEFT adapters into their base weights and drop the wrappers (a model without them: as it is)."""
    if not hasattr(model, "peft_config"):
        return model
    return model.merge_and_unload()
