"""The paper's two algorithms as pure functions over plain numbers.

Algorithm 1 (partial convergence test) and Algorithm 2 (rank assignment) of PreLoRA, read as
docs/algorithms.md fixes them (its sections "Algorithm 1" and "Algorithm 2"). Nothing here imports
torch, Ray or PEFT, so a user can call both from any training loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "percent_change",
    "partial_convergence_test",
    "candidate_ranks",
    "assign_ranks",
    "is_power_of_two",
    "window_values",
    "replay_switch",
    "SwitchPoint",
]

Snapshot = tuple[Mapping[str, Sequence[float]], float]
"""One window unit: module family -> per-layer weight norms, and the all-worker mean training loss."""


def is_power_of_two(value: int) -> bool:
    """True for 1, 2, 4, 8, ...; False for zero, negatives and non-integers."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


def percent_change(previous: float, current: float) -> float:
    """(current - previous) / previous * 100, the paper's ΔW and ΔL.

    A zero `previous` has no relative change: 0 -> 0 is 0 %, 0 -> anything else is +inf % (so the
    test fails rather than dividing by zero).
    """
    if previous == 0:
        return 0.0 if current == 0 else math.inf
    return (current - previous) / abs(previous) * 100.0


def partial_convergence_test(
    module_norms: Mapping[str, Sequence[float]],
    losses: Sequence[float],
    tau: float,
    zeta: float,
) -> bool:
    """Algorithm 1: True when weight norms and loss have stopped moving.

    Args:
        module_norms: module family -> its window values W_1..W_k (each already the mean over the
            family's layers and over the window).
        losses: the training loss of each window, L_1..L_k.
        tau: largest allowed |ΔW| between consecutive windows, in percent.
        zeta: largest allowed |ΔL| between consecutive windows, in percent.

    Returns:
        True when |ΔW_t^a| <= tau for every family a and t = 2..k, and |ΔL_t| <= zeta for every t.
        A NaN anywhere fails the test (nothing has converged).
    """
    if tau <= 0 or zeta <= 0:
        raise ValueError(f"tau and zeta must be > 0 (percent); got tau={tau}, zeta={zeta}")
    k = len(losses)
    if k < 2:
        raise ValueError(f"the test needs at least 2 windows of losses; got {k}")
    if not module_norms:
        raise ValueError("module_norms is empty: give at least one module family")
    for family, norms in module_norms.items():
        if len(norms) != k:
            raise ValueError(
                f"module family {family!r} has {len(norms)} window values but losses has {k}; "
                "every series must cover the same k windows"
            )
    for t in range(1, k):
        if not abs(percent_change(losses[t - 1], losses[t])) <= zeta:  # NaN never passes
            return False
        for norms in module_norms.values():
            if not abs(percent_change(norms[t - 1], norms[t])) <= tau:
                return False
    return True


def candidate_ranks(r_min: int, r_max: int) -> list[int]:
    """The rank set R of Algorithm 2: every power of two from r_min to r_max, both included."""
    if not is_power_of_two(r_min) or not is_power_of_two(r_max):
        raise ValueError(f"r_min and r_max must be powers of two (1, 2, 4, 8, ...); got r_min={r_min}, r_max={r_max}")
    if r_min > r_max:
        raise ValueError(f"r_min must be <= r_max; got r_min={r_min}, r_max={r_max}")
    return [2**p for p in range(int(math.log2(r_min)), int(math.log2(r_max)) + 1)]


def _bucket(v: float, n: int) -> int:
    """Index into R for a min-max normalised value v in [0, 1] (Algorithm 2, lines 12-16)."""
    if v <= 0:
        return 0
    # rounded so that a value on a bucket edge (0.25 computed as 0.25000000000000006) stays in the
    # lower bucket, as the paper's exact arithmetic puts it
    return min(n - 1, max(0, math.ceil(round(v * n, 9)) - 1))


def assign_ranks(
    changes: Mapping[str, Sequence[float]],
    r_min: int,
    r_max: int,
    *,
    tie_rank: str = "min",
    zero_rank_below: float | None = None,
) -> dict[str, list[int]]:
    """Algorithm 2: a LoRA rank per layer of each module family.

    Args:
        changes: module family -> per-layer weight-norm change ΔW_k (percent, between the last two
            windows). The sign is dropped: a layer that shrinks moves as much as one that grows.
        r_min, r_max: rank bounds, powers of two, r_min <= r_max.
        tie_rank: rank given to every layer of a family whose changes are all equal (one layer, all
            zero, or identical), where min-max normalisation is 0/0. "min" (default: the paper's
            line 15 with v = 0 gives R[0]), "max" or "middle" (R[len(R) // 2]).
        zero_rank_below: beyond the paper, off by default. A layer whose |ΔW_k| is below this
            threshold (percent) gets rank 0: no adapter, frozen. The other layers are bucketed among
            themselves; when every layer of a family is below, its most-changed layer keeps the tie
            rank, so no family is left without an adapter.

    Returns:
        module family -> list of ranks, one per layer, in the order given.
    """
    ranks = candidate_ranks(r_min, r_max)
    tie_choices = {"min": ranks[0], "max": ranks[-1], "middle": ranks[len(ranks) // 2]}
    if tie_rank not in tie_choices:
        raise ValueError(f"tie_rank must be one of {sorted(tie_choices)}; got {tie_rank!r}")
    if zero_rank_below is not None and zero_rank_below < 0:
        raise ValueError(f"zero_rank_below must be >= 0 or None; got {zero_rank_below}")
    result: dict[str, list[int]] = {}
    for family, values in changes.items():
        if len(values) == 0:
            raise ValueError(f"module family {family!r} has no layers")
        magnitudes = [abs(float(v)) for v in values]
        if not all(math.isfinite(v) for v in magnitudes):
            raise ValueError(f"module family {family!r} has a non-finite weight-norm change: {list(values)}")
        active = [i for i, v in enumerate(magnitudes) if zero_rank_below is None or v >= zero_rank_below]
        if not active:  # every layer below: the one that moved most keeps an adapter, so the family still learns
            active = [max(range(len(magnitudes)), key=lambda i: magnitudes[i])]
        family_ranks = [0] * len(magnitudes)
        if active:
            lo = min(magnitudes[i] for i in active)
            hi = max(magnitudes[i] for i in active)
            for i in active:
                if hi == lo:  # min-max normalisation would be 0/0: the documented tie rank
                    family_ranks[i] = tie_choices[tie_rank]
                else:
                    family_ranks[i] = ranks[_bucket((magnitudes[i] - lo) / (hi - lo), len(ranks))]
        result[family] = family_ranks
    return result


def window_values(
    snapshots: Sequence[Snapshot], k: int, m: int, window_stat: str = "mean"
) -> tuple[dict[str, list[list[float]]], list[float]]:
    """The k windows of m units over the last k·m snapshots: family -> window -> per-layer value, and L_1..L_k.

    A window's value is the mean of its m snapshots (`mean`) or its last one (`last`).
    """
    if window_stat not in ("mean", "last"):
        raise ValueError(f"window_stat must be mean or last; got {window_stat!r}")
    if len(snapshots) < k * m:
        raise ValueError(f"the windows need k*m = {k * m} recorded units, have {len(snapshots)}")
    snaps = list(snapshots)[len(snapshots) - k * m :]

    def reduce(values: list[float]) -> float:
        return values[-1] if window_stat == "last" else sum(values) / len(values)

    chunks = [snaps[i * m : (i + 1) * m] for i in range(k)]
    first = snaps[0][0]
    per_layer = {
        fam: [
            [reduce([float(s[0][fam][layer]) for s in chunk]) for layer in range(len(first[fam]))] for chunk in chunks
        ]
        for fam in first
    }
    return per_layer, [reduce([float(s[1]) for s in chunk]) for chunk in chunks]


@dataclass(frozen=True, kw_only=True)
class SwitchPoint:
    """Where Algorithm 1 passes on a recorded history, and what Algorithm 2 gives there."""

    epoch: int  # the unit (0-based epoch) at whose end the test passed
    ranks: dict[str, list[int]]


def replay_switch(
    history: Sequence[Snapshot],
    *,
    tau: float,
    zeta: float,
    k: int,
    m: int,
    r_min: int,
    r_max: int,
    window_stat: str = "mean",
    min_switch_epoch: int = 0,
    families: Sequence[str] | None = None,
    tie_rank: str = "min",
    zero_rank_below: float | None = None,
    switch_at_epoch: int | None = None,
) -> SwitchPoint | None:
    """Replay Algorithm 1 (and 2) on a recorded per-unit history, as the live loop would run them.

    `history[i]` is unit i's snapshot (epoch i). The test runs after unit i when i + 1 >= k·m,
    (i + 1) % m == 0 and i >= min_switch_epoch, over the last k·m units; the first pass is returned
    with Algorithm 2's ranks over its last two windows. None: it never passes on this history.
    `families` restricts the test to those module families (the trial's `prelora.modules`).
    `switch_at_epoch` skips Algorithm 1: the switch is at that unit (None until the history holds it),
    with Algorithm 2's ranks over the k windows ending there.
    """
    if families is not None:
        history = [({f: norms[f] for f in families}, loss) for norms, loss in history]
    if switch_at_epoch is not None:
        if len(history) <= switch_at_epoch:
            return None
        per_layer, _ = window_values(history[: switch_at_epoch + 1], k, m, window_stat)
        ranks = assign_ranks(
            last_window_changes(per_layer), r_min, r_max, tie_rank=tie_rank, zero_rank_below=zero_rank_below
        )
        return SwitchPoint(epoch=switch_at_epoch, ranks=ranks)
    for i in range(k * m - 1, len(history)):
        if (i + 1) % m or i < min_switch_epoch:
            continue
        per_layer, losses = window_values(history[: i + 1], k, m, window_stat)
        if partial_convergence_test(family_means(per_layer), losses, tau, zeta):
            ranks = assign_ranks(
                last_window_changes(per_layer), r_min, r_max, tie_rank=tie_rank, zero_rank_below=zero_rank_below
            )
            return SwitchPoint(epoch=i, ranks=ranks)
    return None


def family_means(per_layer: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """W_t^a: each window's mean over the family's layers (Algorithm 1's input)."""
    return {fam: [sum(w) / len(w) for w in wins] for fam, wins in per_layer.items()}


def last_window_changes(per_layer: Mapping[str, Sequence[Sequence[float]]]) -> dict[str, list[float]]:
    """ΔW_k per layer: % change of each layer's window value between the last two windows (Algorithm 2's input)."""
    return {
        fam: [percent_change(p, c) for p, c in zip(wins[-2], wins[-1], strict=True)] for fam, wins in per_layer.items()
    }
