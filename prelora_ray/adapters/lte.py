"""LoRA-the-Explorer's parallel low-rank heads on a linear layer, and the reset-less merge (torch only).

`LTELinear` wraps a target linear (W, b) with H heads: A_h [r x in], B_h [out x r] and their copies at
the last merge A_h^prev, B_h^prev (buffers). In training, the batch is cut into H equal contiguous
chunks and head h computes W·x_h + b + s·(B_h·A_h − B_h^prev·A_h^prev)·x_h on its chunk x_h; in eval
the layer is W·x + b (the base alone: stale between merges). A merge adds the mean over all heads of
δ_h = s·(B_h·A_h − B_h^prev·A_h^prev) to W and sets prev ← current; A, B and the optimizer state are
kept ("reset-less"), so right after a merge every head's effective weight is W again and, telescoping,
W = W_0 + (s/H)·Σ_h B_h·A_h. See docs/algorithms.md, "LTE".

A patch projection (a Conv2d whose kernel equals its stride, as a ViT's patch embedding) is a linear
over each patch's c·p·p values: `LTELinear` wraps it too, its heads acting on the flattened patches
(in = c·p·p, in the conv weight's own order), as the reference's ViT example turns it into a Linear
(`lte.misc.replace_conv_proj_with_linear`). The base stays the Conv2d, so the export is a plain ViT.

No PEFT, no Ray: `adapters.model` reaches these through its shared primitives (effective weight, the
export), `strategies.lte` applies them. The heads' parameter names are `adapters.names`'.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prelora_ray.adapters.names import BASE_WEIGHT, HEAD_PARAMS, PREV_BUFFERS, is_head_param, is_head_state

__all__ = [
    "HEAD_PARAMS",
    "PREV_BUFFERS",
    "LTELinear",
    "apply_merge",
    "add_to_base",
    "clip_per_head",
    "every_linear",
    "head_generators",
    "inject_lte_heads",
    "is_head_param",
    "is_patch_projection",
    "is_head_state",
    "local_mean_deltas",
    "lte_modules",
    "remove_lte_heads",
    "restore_base",
    "set_lte_trainable",
]


def is_patch_projection(module: nn.Module) -> bool:
    """Whether `module` is a Conv2d that is a linear over non-overlapping patches (kernel = stride, no padding)."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == module.stride
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


class LTELinear(nn.Module):
    """A linear (or a patch projection) with H LoRA heads; each head sees its own chunk of the batch (see the module
    docstring)."""

    bypass = False
    """True: the forward is the base layer's alone, in training too (calibration's full-training step)."""

    def __init__(
        self, base: nn.Linear | nn.Conv2d, *, heads: int, rank: int, scale: float, generators: list[torch.Generator]
    ) -> None:
        super().__init__()
        if len(generators) != heads:
            raise ValueError(f"{heads} heads need one generator each, got {len(generators)}")
        self.base_layer = base
        self.heads, self.rank, self.scale = heads, rank, scale
        self.patch = base.kernel_size if isinstance(base, nn.Conv2d) else None
        w = base.weight
        out_features, in_features = w.shape[0], w[0].numel()
        a = torch.empty(heads, rank, in_features, dtype=w.dtype)
        for h, gen in enumerate(generators):
            # the reference's init: orthogonal rows, scaled by √(in/r); B = 0 so the function is unchanged
            nn.init.orthogonal_(a[h], generator=gen)
        a.mul_(math.sqrt(in_features / rank))
        self.lte_A = nn.Parameter(a.to(w.device))
        self.lte_B = nn.Parameter(torch.zeros(heads, out_features, rank, dtype=w.dtype, device=w.device))
        self.register_buffer("lte_prev_A", self.lte_A.detach().clone())
        self.register_buffer("lte_prev_B", self.lte_B.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (transformers reads the patch projection's `weight.dtype`)."""
        return self.base_layer.weight

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """[n, c, H, W] images -> [n, patches, c·p·q]: each patch flattened in the conv weight's (c, p, q) order."""
        n, c, height, width = x.shape
        p, q = self.patch
        x = x.reshape(n, c, height // p, p, width // q, q).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (height // p) * (width // q), c * p * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.training or self.bypass:
            return out
        n = x.shape[0]
        if n % self.heads:
            raise ValueError(f"a batch of {n} cannot be cut into the worker's {self.heads} LTE heads' equal chunks")
        inputs = self._patches(x) if self.patch is not None else x
        # chunk h = rows h·n/H ... (h+1)·n/H of the batch: [H, tokens of the chunk, in]
        xs = inputs.reshape(self.heads, -1, inputs.shape[-1])
        a = torch.cat([self.lte_A, self.lte_prev_A], dim=1)  # [H, 2r, in]
        b = torch.cat([self.lte_B, -self.lte_prev_B], dim=2)  # [H, out, 2r]: B·A − B^prev·A^prev in one product
        delta = self.scale * torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        if self.patch is None:
            return out + delta.reshape(out.shape)
        # [H, n/H · patches, out] -> [n, out, H/p, W/q], the conv's layout
        return out + delta.reshape(n, out.shape[2], out.shape[3], out.shape[1]).permute(0, 3, 1, 2)

    def effective_weight(self) -> torch.Tensor:
        """W, detached: the weight of eval (each head's own differs from it only between merges)."""
        return self.base_layer.weight.detach()

    @torch.no_grad()
    def head_deltas(self) -> torch.Tensor:
        """δ_h = s·(B_h·A_h − B_h^prev·A_h^prev) of every head, [H, out, in] (in = c·p·q for a patch projection)."""
        return self.scale * (torch.bmm(self.lte_B, self.lte_A) - torch.bmm(self.lte_prev_B, self.lte_prev_A))

    @torch.no_grad()
    def head_weights(self) -> torch.Tensor:
        """Each head's effective weight W + δ_h, [H, out, in] (detached; a patch projection's W flattened)."""
        return self.base_layer.weight.detach().flatten(1) + self.head_deltas()

    @torch.no_grad()
    def apply_merge(self, mean_delta: torch.Tensor) -> None:
        """W += the mean δ over all heads of all workers; prev ← current (A, B untouched)."""
        self.add_to_base(mean_delta)
        self.lte_prev_A.copy_(self.lte_A)
        self.lte_prev_B.copy_(self.lte_B)

    @torch.no_grad()
    def add_to_base(self, delta: torch.Tensor) -> None:
        """W += delta ([out, in], reshaped to a patch projection's weight), heads and prev untouched."""
        weight = self.base_layer.weight
        weight.add_(delta.to(weight.dtype).view_as(weight))


def head_generators(seed: int, global_heads: list[int]) -> list[torch.Generator]:
    """One generator per head, seeded by the head's global index (its index among all workers' heads).

    So a head draws the same A whichever worker holds it, and however many heads that worker holds.
    """
    return [torch.Generator().manual_seed((seed * 1_000_003 + g * 7_919 + 0x17E) % 2**63) for g in global_heads]


def every_linear(model: nn.Module) -> list[str]:
    """Every nn.Linear and every patch projection (`is_patch_projection`) of `model`, in model order.

    The reference's ViT example heads exactly these (the patch projection turned into a Linear first).
    """
    return [n for n, m in model.named_modules() if type(m) is nn.Linear or is_patch_projection(m)]


def inject_lte_heads(
    model: nn.Module, names: list[str], *, rank: int, scale: float, seed: int, global_heads: list[int]
) -> int:
    """Replace each named nn.Linear (or patch projection) of `model` by an LTELinear around it, with one head per
    entry of `global_heads` (in place); returns how many modules.

    The named modules are visited in the given order, each head drawing its A from its own generator,
    so a head's A depends on (seed, its global index, the module order) only.
    """
    gens = head_generators(seed, global_heads)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LTELinear):
            raise ValueError(f"{name} already has LTE heads")
        if type(base) is not nn.Linear and not is_patch_projection(base):
            raise ValueError(
                f"{name} is a {type(base).__name__}, LTE heads need an nn.Linear or a patch projection (Conv2d with "
                "kernel = stride)"
            )
        setattr(parent, child, LTELinear(base, heads=len(gens), rank=rank, scale=scale, generators=gens))
    return len(names)


def lte_modules(model: nn.Module) -> dict[str, LTELinear]:
    """Module name -> LTELinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LTELinear)}


@torch.no_grad()
def local_mean_deltas(model: nn.Module) -> list[torch.Tensor]:
    """Per LTELinear (model order), the mean over this worker's heads of δ_h, [out, in] (in = c·p·q for a patch
    projection)."""
    return [m.head_deltas().mean(0) for m in lte_modules(model).values()]


@torch.no_grad()
def apply_merge(model: nn.Module, mean_deltas: list[torch.Tensor]) -> None:
    """W += the all-head mean δ of each LTELinear (the order of `local_mean_deltas`); prev ← current."""
    modules = list(lte_modules(model).values())
    if len(modules) != len(mean_deltas):
        raise ValueError(f"{len(mean_deltas)} mean deltas for {len(modules)} LTE modules: the workers' models differ")
    for module, delta in zip(modules, mean_deltas, strict=True):
        module.apply_merge(delta)


@torch.no_grad()
def add_to_base(model: nn.Module, mean_deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """W += the all-head mean δ of each LTELinear, heads and prev untouched (a look at the merged model between
    merges); returns the weights before, for `restore_base`."""
    modules = list(lte_modules(model).values())
    if len(modules) != len(mean_deltas):
        raise ValueError(f"{len(mean_deltas)} mean deltas for {len(modules)} LTE modules: the workers' models differ")
    before = [m.base_layer.weight.detach().clone() for m in modules]
    for module, delta in zip(modules, mean_deltas, strict=True):
        module.add_to_base(delta)
    return before


@torch.no_grad()
def restore_base(model: nn.Module, weights: list[torch.Tensor]) -> None:
    """Each LTELinear's W set back to `weights` (what `add_to_base` returned), exactly."""
    for module, weight in zip(lte_modules(model).values(), weights, strict=True):
        module.base_layer.weight.copy_(weight)


def remove_lte_heads(model: nn.Module) -> nn.Module:
    """Put each LTELinear's base linear back (in place): the plain model, computing W·x + b.

    Merge first: what the heads learned since the last merge is dropped.
    """
    for name in list(lte_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).base_layer)
    return model


@torch.no_grad()
def clip_per_head(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip each head's gradient on its own: head h's A_h and B_h in every LTELinear are one vector, scaled by
    max_norm / (its norm + 1e-6) when that is below 1 (`torch.nn.utils.clip_grad_norm_`'s rule, applied to each head
    as if it trained alone). Returns the heads' norms before clipping, [H]."""
    grads = [p.grad for m in lte_modules(model).values() for p in (m.lte_A, m.lte_B) if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([g.float().pow(2).sum(dim=(1, 2)) for g in grads]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, 1, 1).to(g.dtype))
    return norms


def set_lte_trainable(model: nn.Module, train_others: bool) -> None:
    """Heads train; the headed linears' weights never do (they move only at merges); the rest iff `train_others`."""
    headed = {f"{n}{BASE_WEIGHT}" for n in lte_modules(model)}
    for name, param in model.named_parameters():
        param.requires_grad_(is_head_param(name) or (train_others and name not in headed))
        if not param.requires_grad:
            param.grad = None
