"""LoRA-the-Explorer's parallel low-rank heads on a linear layer, and the reset-less merge (torch only).

`LTELinear` wraps a target linear (W, b) with H heads: A_h [r x in], B_h [out x r] and their copies at
the last merge A_h^prev, B_h^prev (buffers). In training, the batch is cut into H equal chunks and
head h computes W·x_h + b + s·(B_h·A_h − B_h^prev·A_h^prev)·x_h on its chunk x_h; in eval the layer
is W·x + b (the base alone: evaluate right after a merge). A merge adds the mean over all heads of
δ_h = s·(B_h·A_h − B_h^prev·A_h^prev) to W and sets prev ← current; A, B and the optimizer state are
kept ("reset-less"), so right after a merge every head's effective weight is W again and, telescoping,
W = W_0 + (s/H)·Σ_h B_h·A_h. See docs/algorithms.md, "LTE".

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
    "head_generators",
    "inject_lte_heads",
    "is_head_param",
    "is_head_state",
    "local_mean_deltas",
    "lte_modules",
    "remove_lte_heads",
    "set_lte_trainable",
]


class LTELinear(nn.Module):
    """A linear with H LoRA heads; each head sees its own chunk of the batch (see the module docstring)."""

    def __init__(
        self, base: nn.Linear, *, heads: int, rank: int, scale: float, generators: list[torch.Generator]
    ) -> None:
        super().__init__()
        if len(generators) != heads:
            raise ValueError(f"{heads} heads need one generator each, got {len(generators)}")
        self.base_layer = base
        self.heads, self.rank, self.scale = heads, rank, scale
        out_features, in_features = base.weight.shape
        w = base.weight
        a = torch.empty(heads, rank, in_features, dtype=w.dtype)
        for h, gen in enumerate(generators):
            # the reference's init: orthogonal rows, scaled by √(in/r); B = 0 so the function is unchanged
            nn.init.orthogonal_(a[h], generator=gen)
        a.mul_(math.sqrt(in_features / rank))
        self.lte_A = nn.Parameter(a.to(w.device))
        self.lte_B = nn.Parameter(torch.zeros(heads, out_features, rank, dtype=w.dtype, device=w.device))
        self.register_buffer("lte_prev_A", self.lte_A.detach().clone())
        self.register_buffer("lte_prev_B", self.lte_B.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.training:
            return out
        n = x.shape[0]
        if n % self.heads:
            raise ValueError(f"a batch of {n} cannot be cut into lte.heads_per_worker={self.heads} equal chunks")
        # chunk h = rows h·n/H ... (h+1)·n/H of the batch: [H, tokens of the chunk, in]
        xs = x.reshape(self.heads, -1, x.shape[-1])
        a = torch.cat([self.lte_A, self.lte_prev_A], dim=1)  # [H, 2r, in]
        b = torch.cat([self.lte_B, -self.lte_prev_B], dim=2)  # [H, out, 2r]: B·A − B^prev·A^prev in one product
        delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
        return out + self.scale * delta.reshape(out.shape)

    def effective_weight(self) -> torch.Tensor:
        """W, detached: the weight of eval (each head's own differs from it only between merges)."""
        return self.base_layer.weight.detach()

    @torch.no_grad()
    def head_deltas(self) -> torch.Tensor:
        """δ_h = s·(B_h·A_h − B_h^prev·A_h^prev) of every head, [H, out, in]."""
        return self.scale * (torch.bmm(self.lte_B, self.lte_A) - torch.bmm(self.lte_prev_B, self.lte_prev_A))

    @torch.no_grad()
    def head_weights(self) -> torch.Tensor:
        """Each head's effective weight W + δ_h, [H, out, in] (detached)."""
        return self.base_layer.weight.detach() + self.head_deltas()

    @torch.no_grad()
    def apply_merge(self, mean_delta: torch.Tensor) -> None:
        """W += the mean δ over all heads of all workers; prev ← current (A, B untouched)."""
        self.base_layer.weight.add_(mean_delta.to(self.base_layer.weight.dtype))
        self.lte_prev_A.copy_(self.lte_A)
        self.lte_prev_B.copy_(self.lte_B)


def head_generators(seed: int, first_head: int, heads: int) -> list[torch.Generator]:
    """One generator per head, seeded by the head's global index (rank · heads_per_worker + h).

    So two workers with one head each draw the same A as one worker emulating both heads.
    """
    return [
        torch.Generator().manual_seed((seed * 1_000_003 + (first_head + h) * 7_919 + 0x17E) % 2**63)
        for h in range(heads)
    ]


def inject_lte_heads(
    model: nn.Module, names: list[str], *, heads: int, rank: int, scale: float, seed: int, first_head: int
) -> int:
    """Replace each named nn.Linear of `model` by an LTELinear around it (in place); returns how many.

    The named modules are visited in the given order, each head drawing its A from its own generator,
    so a head's A depends on (seed, its global index, the module order) only.
    """
    gens = head_generators(seed, first_head, heads)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LTELinear):
            raise ValueError(f"{name} already has LTE heads")
        if type(base) is not nn.Linear:
            raise ValueError(f"{name} is a {type(base).__name__}, LTE heads need an nn.Linear")
        setattr(parent, child, LTELinear(base, heads=heads, rank=rank, scale=scale, generators=gens))
    return len(names)


def lte_modules(model: nn.Module) -> dict[str, LTELinear]:
    """Module name -> LTELinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LTELinear)}


@torch.no_grad()
def local_mean_deltas(model: nn.Module) -> list[torch.Tensor]:
    """Per LTELinear (model order), the mean over this worker's heads of δ_h, [out, in]."""
    return [m.head_deltas().mean(0) for m in lte_modules(model).values()]


@torch.no_grad()
def apply_merge(model: nn.Module, mean_deltas: list[torch.Tensor]) -> None:
    """W += the all-head mean δ of each LTELinear (the order of `local_mean_deltas`); prev ← current."""
    modules = list(lte_modules(model).values())
    if len(modules) != len(mean_deltas):
        raise ValueError(f"{len(mean_deltas)} mean deltas for {len(modules)} LTE modules: the workers' models differ")
    for module, delta in zip(modules, mean_deltas, strict=True):
        module.apply_merge(delta)


def remove_lte_heads(model: nn.Module) -> nn.Module:
    """Put each LTELinear's base linear back (in place): the plain model, computing W·x + b.

    Merge first: what the heads learned since the last merge is dropped.
    """
    for name in list(lte_modules(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).base_layer)
    return model


def set_lte_trainable(model: nn.Module, train_others: bool) -> None:
    """Heads train; the headed linears' weights never do (they move only at merges); the rest iff `train_others`."""
    headed = {f"{n}{BASE_WEIGHT}" for n in lte_modules(model)}
    for name, param in model.named_parameters():
        param.requires_grad_(is_head_param(name) or (train_others and name not in headed))
        if not param.requires_grad:
            param.grad = None
