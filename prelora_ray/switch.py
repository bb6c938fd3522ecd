"""Applying the switch to a model: the only module that imports PEFT or knows its names.

inject (LoRA with per-layer ranks, output unchanged, checked), set which parameters train in each
phase, the adapter primitives every strategy needs (each adapter's delta s·B·A, fold it into the
base, re-initialise, is-adapter-parameter, the effective weight), and merge the adapters back into a
plain ViT.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import warnings
from typing import Any

import torch
from torch import nn

from prelora_ray.config import PreLoRASettings
from prelora_ray.lte_heads import LTELinear, is_head_param, remove_lte_heads
from prelora_ray.models import family_module_names


class Phase(str, enum.Enum):
    """Training phases. Their numbers (`index`, MLflow's `phase_index`) are fixed in PHASE_INDEX."""

    FULL = "full"
    WARMUP = "warmup"
    LORA = "lora"
    RELORA = "relora"
    LTE = "lte"

    @property
    def index(self) -> int:
        """The phase as a stable number (MLflow's `phase_index`): see PHASE_INDEX."""
        return PHASE_INDEX[self]


PHASE_INDEX: dict[Phase, int] = {Phase.FULL: 0, Phase.WARMUP: 1, Phase.LORA: 2, Phase.RELORA: 3, Phase.LTE: 4}
"""Stored in every MLflow run as `phase_index`: never renumber; a new phase takes the next free number."""


ADAPTER = "default"


def rank_by_module(model: nn.Module, ranks: dict[str, list[int]]) -> dict[str, int]:
    """Full module name (unwrapped model, no `module.` prefix) -> rank, for ranks > 0 only."""
    names = family_module_names(model, list(ranks))
    out: dict[str, int] = {}
    for family, family_ranks in ranks.items():
        if len(family_ranks) != len(names[family]):
            raise ValueError(f"family {family!r}: {len(family_ranks)} ranks for {len(names[family])} layers")
        for name, rank in zip(names[family], family_ranks):
            if rank > 0:
                out[name] = int(rank)
    return out


def inject_lora(
    model: nn.Module, ranks: dict[str, list[int]], settings: PreLoRASettings, *, seed: int | None = None
) -> nn.Module:
    """Wrap the plain ViT with LoRA adapters of the given per-layer ranks; returns the PEFT model.

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
    injected = set(_adapter_modules(model))
    if injected != set(targets):
        raise RuntimeError(f"LoRA on {sorted(injected ^ set(targets))} differs from the assignment")


class _LeanForward:
    """The forward of `LeanLoraLinear` (PEFT's LoRA Linear with a cheaper forward), as a mixin.

    PEFT computes `result + lora_B(lora_A(dropout(x))) * scaling`: a matmul, then a multiply and an
    add over the whole output (two more passes and two more tensors of the layer's output size), and
    first casts x to the LoRA weights' dtype, which under bf16 autocast is a full fp32 copy of every
    bf16 input (o_proj, fc2) that the LoRA matmul then casts back to bf16 and saves for backward.
    Here the LoRA term is folded into the base output with one `addmm` (scaling as its alpha), and x
    goes to the LoRA matmul as it is (autocast casts the small LoRA weights instead). The math is the
    same: outputs and gradients agree with PEFT's to float rounding, and exactly while B is zero.

    Without autocast (CPU training), with no LoRA dropout and a plain nn.Linear base, the layer runs
    as one autograd function, `_LoraLinearFn`, instead: see there (it is what makes the LoRA phase
    cheaper than full training on small models on CPU).

    Anything else (adapters disabled or merged, several adapters, DoRA or another variant, a LoRA
    bias, extra forward arguments, x in a dtype other than the weights' outside autocast) takes
    PEFT's own forward.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lora_a = self.lora_A[ADAPTER].weight if ADAPTER in self.lora_A else None
        autocast = torch.is_autocast_enabled(x.device.type)
        if (
            args
            or kwargs
            or lora_a is None
            or self.disable_adapters
            or self.merged
            or self.active_adapters != [ADAPTER]
            or ADAPTER in self.lora_variant
            or self.lora_B[ADAPTER].bias is not None
            or not (autocast or x.dtype == lora_a.dtype)
        ):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        if (
            not autocast
            and type(base) is nn.Linear
            and type(self.lora_dropout[ADAPTER]) is nn.Identity
            and x.dtype == base.weight.dtype == lora_a.dtype
        ):
            return _LoraLinearFn.apply(
                x, base.weight, base.bias, lora_a, self.lora_B[ADAPTER].weight, self.scaling[ADAPTER]
            )
        result = self.base_layer(x)
        hidden = nn.functional.linear(self.lora_dropout[ADAPTER](x), lora_a)
        lora_b = self.lora_B[ADAPTER].weight
        out_2d = result.reshape(-1, result.shape[-1])
        hidden_2d = hidden.reshape(-1, hidden.shape[-1])
        scaling = self.scaling[ADAPTER]
        if autocast or not result.is_contiguous():
            out_2d = torch.addmm(out_2d, hidden_2d, lora_b.t(), alpha=scaling)
        else:  # out_2d is a view of the base output, which nothing saved for backward: add into it
            out_2d = out_2d.addmm_(hidden_2d, lora_b.t(), alpha=scaling)
        return out_2d.view(result.shape)


class _LoraLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x Aᵀ) Bᵀ as one autograd function, its rank-r matmuls in fast CPU layouts.

    Autograd through PEFT's two small linears runs rank-r matmuls whose operand layouts (`g @ B`
    with B of shape out x r, `gᵀ @ h`) hit slow CPU GEMM paths: at rank 2-8 on a hidden-64 ViT each
    costs about as much as the full out x in matmul that freezing W saves
    (benchmarks/demo_model.py). Here h = x Aᵀ and y = x Wᵀ + b + s·h Bᵀ (PEFT's products, so the
    forward is the same bit for bit); backward d = g B, dx = g W + s·d A (one addmm), dA = s·dᵀx and
    dB = s·(hᵀg)ᵀ in the fast layouts, and dW = gᵀx, db = Σg only when W and b train (WARMUP): one
    graph node instead of seven, no autograd bookkeeping per product. (d = (Bᵀgᵀ)ᵀ would be faster
    still but moves gradients by more float rounding.) The products are the same in every phase, so
    gradients do not depend on what else trains. Saved for backward: x and h (PEFT saves the same
    two). Used only without autocast and without LoRA dropout (anything else takes the path below).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):  # noqa: D102 (see the class)
        x2 = x.reshape(-1, x.shape[-1])
        out = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
        hidden = torch.mm(x2, lora_a.t())  # h, tokens x r (the same product as PEFT's, bit for bit)
        out.addmm_(hidden, lora_b.t(), alpha=scaling)
        hidden_t = hidden.t()
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x2, hidden_t, weight, lora_a, lora_b)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102 (see the class)
        x2, hidden_t, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        d_t = torch.mm(g2, lora_b).t() if need_x or need_a else None  # dᵀ, r x tokens
        if need_x:
            grad_x = torch.mm(g2, weight).addmm_(d_t.t(), lora_a, alpha=s).view(ctx.x_shape)
        if need_w:
            grad_w = torch.mm(g2.t(), x2)
        if need_bias:
            grad_bias = g2.sum(0)
        if need_a:
            grad_a = torch.mm(d_t, x2).mul_(s)
        if need_b:
            grad_b = torch.mm(hidden_t, g2).mul_(s).t().contiguous()
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


_LEAN_CLASS: type | None = None


def _lean_class() -> type:
    """LeanLoraLinear, built on first use (PEFT is imported lazily: it takes seconds)."""
    global _LEAN_CLASS
    if _LEAN_CLASS is None:
        from peft.tuners.lora.layer import Linear

        _LEAN_CLASS = type(
            "LeanLoraLinear", (_LeanForward, Linear), {"__module__": __name__, "__doc__": _LeanForward.__doc__}
        )
    return _LEAN_CLASS


def __getattr__(name: str) -> Any:
    if name == "LeanLoraLinear":  # importable by name, so a pickled model loads
        return _lean_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lean_lora_forward(model: nn.Module, enabled: bool = True) -> int:
    """Give the LoRA linears of a PEFT model the lean forward (enabled) or PEFT's own (not).

    `inject_lora` turns it on; turning it off is for benchmarks and tests that compare the two.
    Only the class changes (no weights, no state-dict keys). Returns how many modules changed.
    """
    from peft.tuners.lora.layer import Linear

    lean = _lean_class()
    changed = 0
    for module in model.modules():
        if enabled and type(module) is Linear:
            module.__class__ = lean
            changed += 1
        elif not enabled and type(module) is lean:
            module.__class__ = Linear
            changed += 1
    return changed


def injected_ranks(model: nn.Module) -> dict[str, int]:
    """Module name -> LoRA rank actually present in a PEFT model (for checks and reports)."""
    return {n: mod.r[ADAPTER] for n, mod in _adapter_modules(model).items()}


def adapter_root(model: nn.Module) -> nn.Module:
    """The ViT inside a PEFT model (module names as on the plain model), or the model itself."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def _adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module name (plain-model names) -> LoRA layer carrying the adapter, in model order."""
    return {
        n: mod for n, mod in adapter_root(model).named_modules() if hasattr(mod, "lora_A") and ADAPTER in mod.lora_A
    }


def effective_weight(module: nn.Module) -> torch.Tensor:
    """A linear's weight as the forward sees it, detached: W, or W + s·B·A for each active adapter.

    With LTE heads: W, the weight of eval (each head's own differs from it only between merges).
    """
    if isinstance(module, LTELinear):
        return module.base_layer.weight.detach()
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight.detach()
    weight = base.weight.detach()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight


@torch.no_grad()
def adapter_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> s·B·A of its adapter (shape of the base weight)."""
    return {name: mod.get_delta_weight(ADAPTER).detach() for name, mod in _adapter_modules(model).items()}


@torch.no_grad()
def fold_adapters(model: nn.Module) -> int:
    """W += s·B·A in every adapter's base layer, then B = 0: the model computes the same function.

    In place (the tensors keep their identity, so an optimizer's references stay valid); A is
    kept, so re-initialise it next (`reinit_adapters`) for a fresh low-rank direction. Returns the
    number of folded modules.
    """
    modules = _adapter_modules(model)
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
    modules = _adapter_modules(model)
    for mod in modules.values():
        a = mod.lora_A[ADAPTER].weight
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=√5): gain √(2/6), bound gain·√(3/fan_in)
        fresh = torch.rand(a.shape, generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound)
        a.copy_(fresh.to(a.device, a.dtype))
        mod.lora_B[ADAPTER].weight.zero_()
    return len(modules)


def weights_checksum(model: nn.Module) -> str:
    """sha256 (16 hex digits) of every parameter's name and bytes, on the CPU: equal iff the weights are bit-identical."""
    digest = hashlib.sha256()
    for name, param in unwrap(model).named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def is_adapter_param(name: str) -> bool:
    """Whether a parameter (by its name in the PEFT model, with or without a DDP prefix) is an adapter's.

    PEFT names every LoRA tensor `lora_<part>` (`lora_A`, `lora_B`, `lora_embedding_A`, DoRA's
    `lora_magnitude_vector`); base weights, `modules_to_save` copies and the head never carry it.
    LTE heads' A and B (`lte_heads.HEAD_PARAMS`) are adapters too.
    """
    return "lora_" in name or is_head_param(name)


def _extra_group(name: str, group: str) -> bool:
    """Whether a base parameter belongs to a `trainable_after_freeze` group."""
    if group == "head":
        return ".classifier." in f".{name}"
    if group == "norms":
        return "layernorm" in name
    if group == "embeddings":
        return ".embeddings." in f".{name}"
    if group == "biases":
        return name.endswith(".bias")
    raise ValueError(f"unknown trainable group {group!r}")


def set_trainable(model: nn.Module, phase: Phase, settings: PreLoRASettings) -> None:
    """requires_grad for a phase: all (FULL), base and LoRA (WARMUP), LoRA plus chosen groups (LORA),
    everything but the adapted layers' base weights (RELORA: ReLoRA trains embeddings, norms, biases and head in full)."""
    for name, param in model.named_parameters():
        if phase is Phase.RELORA:
            param.requires_grad_(is_adapter_param(name) or not name.endswith(".base_layer.weight"))
        elif phase is not Phase.LORA or is_adapter_param(name):
            param.requires_grad_(True)
        else:
            param.requires_grad_(any(_extra_group(name, g) for g in settings.trainable_after_freeze))
        if not param.requires_grad:
            param.grad = None  # a frozen weight keeps no gradient buffer


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights: a plain ViT with no adapter overhead.

    LTE heads are removed, leaving W (their last merge is in it: `strategies.lte` merges at every epoch's end).
    """
    model = remove_lte_heads(model)
    if not hasattr(model, "peft_config"):
        return model
    return model.merge_and_unload()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )
