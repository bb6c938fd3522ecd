"""Optimizer tools as pure functions: learning-rate schedules of the step, and AdamW moment pruning.

Torch only (no PEFT, no Ray). The jagged cosine and the moment pruning follow ReLoRA
(Guitaricet/relora; see docs/algorithms.md, "ReLoRA hybrid").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
"""AdamW's per-parameter moments (m and v); its `step` is never touched here."""


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at an optimizer step: linear warmup, then the schedule."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def jagged_cosine_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    min_ratio: float,
    first_restart: int,
    restart_every: int,
    rewarm_steps: int,
) -> float:
    """The cosine schedule with restarts at steps first_restart + j·restart_every (j >= 0).

    Before `first_restart` it is `lr_factor`'s cosine (linear warmup first). At a restart step r the
    factor is 0, and it rises linearly to the global cosine's value at r + rewarm_steps, which it
    reaches there and follows until the next restart (ReLoRA's cyclical schedule).
    """

    def cosine(s: int) -> float:
        return lr_factor(s, total_steps=total_steps, warmup_steps=warmup_steps, schedule="cosine", min_ratio=min_ratio)

    if step < first_restart or rewarm_steps == 0:
        return cosine(step)
    since = (step - first_restart) % restart_every
    if since >= rewarm_steps:
        return cosine(step)
    return since / rewarm_steps * cosine(step - since + rewarm_steps)


def prune_moments(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], keep: float) -> int:
    """In `exp_avg` and `exp_avg_sq` of each of `params`, keep the top `keep` fraction by |value|, zero the rest.

    Per tensor and per moment, exactly round(keep · numel) entries survive, unchanged (ties broken
    by `torch.topk`); `keep=0` resets both moments. The step counter and every other parameter's
    state are untouched. ReLoRA's `prune` p is `keep = 1 - p`. Returns the number of pruned tensors.
    """
    import torch  # here, not at the top: the schedules above are read where torch is not loaded (config, sweeps)

    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep={keep!r} is invalid: a fraction in [0, 1]")
    pruned = 0
    with torch.no_grad():
        for param in params:
            state = optimizer.state.get(param)
            if not state:
                continue
            for key in MOMENTS:
                moment = state[key]
                n_keep = round(keep * moment.numel())
                if n_keep == 0:
                    moment.zero_()
                elif n_keep < moment.numel():
                    flat = moment.view(-1)
                    survivors = torch.topk(flat.abs(), n_keep, sorted=False).indices
                    mask = torch.zeros_like(flat, dtype=torch.bool)
                    mask[survivors] = True
                    flat.masked_fill_(~mask, 0.0)
                pruned += 1
    return pruned


def reset_moments(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Zero `exp_avg` and `exp_avg_sq` of `params` (the step counter stays): `prune_moments` keeping nothing."""
    return prune_moments(optimizer, params, 0.0)
