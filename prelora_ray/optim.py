"""Optimizer tools as pure functions: learning-rate schedules of the step, and AdamW moment pruning.

Torch only (no PEFT, no Ray). `relora_lr_factor` and `prune_moments` follow ReLoRA (Guitaricet/relora,
`peft_pretraining/training_utils.py`; see docs/algorithms.md, "ReLoRA hybrid").
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


def relora_lr_factor(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    restart_every: int,
    rewarm_steps: int,
    min_ratio: float,
) -> float:
    """ReLoRA's `cosine_restarts` schedule (Guitaricet/relora, `peft_pretraining/training_utils.py`) at `step`.

    `step` counts optimizer steps from the schedule's own start (0-based: the step that runs with this
    factor). Linear warmup `step / warmup_steps` (so step 0 runs at 0); then a cosine from 1 down to
    `min_ratio` over the remaining `total_steps - warmup_steps`. At every restart step r = j·restart_every
    (j >= 1) the factor is 0 and rises linearly, `(step - r) / rewarm_steps` times the cosine's value at
    r + rewarm_steps, which it meets there. `rewarm_steps` 0: no restarts (the plain cosine). The caller
    merges right after the zero-factor step r, as the reference does. Needs warmup_steps <= restart_every
    (the reference asserts it: no restart inside the first warmup).
    """

    def cosine(s: int) -> float:
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    if step < warmup_steps:
        return step / warmup_steps
    since = step % restart_every
    if step >= restart_every and since < rewarm_steps:
        return since / rewarm_steps * cosine(step - since + rewarm_steps)
    return cosine(step)


RESET_MODES = ("magnitude", "random", "topk")
"""How `prune_moments` chooses the entries it zeroes (ReLoRA's optimizer reset; see there)."""


def prune_moments(
    optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *, mode: str, ratio: float, seed: int = 0
) -> int:
    """Zero about a `ratio` fraction of `exp_avg` and `exp_avg_sq` of each of `params`; the survivors keep their value.

    Per tensor and per moment, as `mode` says:
    - `magnitude` (ReLoRA's `magnitude_pruning_`): keep the entries with |x| > the `ratio`-quantile of |x|
      (torch.quantile's linear interpolation, computed in float32): every entry tied at the threshold is zeroed.
    - `random` (ReLoRA's `random_pruning_`): keep the entries whose uniform draw in [0, 1) is > `ratio`. The draws
      come from a generator seeded with `seed` (the global RNG is untouched, every worker draws the same), in
      the order of `params`, m before v.
    - `topk`: keep exactly round((1 - ratio) · numel) entries, the largest by |x| (ties broken by `torch.topk`).
    `ratio` 0 zeroes nothing in `topk` (and, as in ReLoRA, nearly nothing in the others); 1 zeroes everything. The step
    counter and every other parameter's state are untouched. Returns the number of pruned tensors.
    """
    import torch  # here, not at the top: the schedules above are read where torch is not loaded (config, sweeps)

    if mode not in RESET_MODES:
        raise ValueError(f"mode={mode!r} is invalid: one of {', '.join(RESET_MODES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio={ratio!r} is invalid: a fraction in [0, 1]")
    generator = torch.Generator().manual_seed(seed) if mode == "random" else None
    pruned = 0
    with torch.no_grad():
        for param in params:
            state = optimizer.state.get(param)
            if not state:
                continue
            for key in MOMENTS:
                moment = state[key]
                moment.masked_fill_(~_survivors(moment, mode, ratio, generator), 0.0)
                pruned += 1
    return pruned


def _survivors(moment: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """The boolean mask (shape of `moment`) of the entries `prune_moments` keeps."""
    import torch

    if moment.numel() == 0:
        return torch.ones_like(moment, dtype=torch.bool)
    magnitude = moment.abs()
    if mode == "magnitude":
        return magnitude > _quantile(magnitude.flatten().float(), ratio).to(moment.dtype)
    if mode == "random":
        draws = torch.rand(moment.shape, generator=generator, dtype=torch.float32)
        return (draws > ratio).to(moment.device)
    n_keep = round((1.0 - ratio) * moment.numel())
    keep = torch.zeros(moment.numel(), dtype=torch.bool, device=moment.device)
    if n_keep:
        keep[torch.topk(magnitude.flatten(), n_keep, sorted=False).indices] = True
    return keep.view(moment.shape)


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q) (1-d float32, linear interpolation) by two k-th order statistics.

    The same arithmetic: the position q·(n - 1) in float32, the values at its floor and ceiling, `lerp` by the
    fraction; without torch.quantile's limit on the input's size (2^24 entries).
    """
    import torch

    position = torch.tensor(q, dtype=torch.float32) * (values.numel() - 1)
    below, above = int(position.floor()), int(position.ceil())
    low = values.kthvalue(below + 1).values
    high = low if above == below else values.kthvalue(above + 1).values
    return torch.lerp(low, high, float(position - below))


def reset_moments(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Zero `exp_avg` and `exp_avg_sq` of `params` (the step counter stays): `topk` pruning keeping nothing."""
    return prune_moments(optimizer, params, mode="topk", ratio=1.0)
