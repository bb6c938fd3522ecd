"""The lean forward of PEFT's LoRA linear: the same math with fewer passes, and on CPU one autograd node.

`lora.inject_lora` turns it on for every LoRA linear it makes (`lean_lora_forward`); `LeanLoraLinear` is
the class it gives them (built on first use, importable by name so that a pickled model loads). See
`_LeanForward` for when it applies and `_LoraLinearFn` for the CPU kernel; benchmarks/lora_step_profile.py
measures what each part saves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prelora_ray.adapters.names import ADAPTER


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
