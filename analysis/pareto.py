"""Pareto fronts on bare arrays: front, knee, hypervolume, speed-up at equal accuracy.

numpy only (no MLflow, no plotting). Directions are "max"/"min" (or "maximize"/"minimize") per
objective. Rows with NaN or inf in any objective are never on a front and add no volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_DIRECTIONS = {"max": 1.0, "maximize": 1.0, "min": -1.0, "minimize": -1.0}


def _as_max(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Values turned so that larger is better in every column (validated)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1 and len(directions) == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"values must be 2-D (points x objectives), got shape {arr.shape}")
    if arr.shape[1] != len(directions):
        raise ValueError(f"{arr.shape[1]} objectives in values but {len(directions)} directions")
    signs = []
    for d in directions:
        if d not in _DIRECTIONS:
            raise ValueError(f"direction {d!r} is invalid: max, min, maximize or minimize")
        signs.append(_DIRECTIONS[d])
    return arr * np.asarray(signs)


def pareto_mask(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """True for each point that no other point dominates (at least as good everywhere, better once).

    Exact duplicates that are otherwise non-dominated are all on the front.
    """
    arr = _as_max(values, directions)
    finite = np.isfinite(arr).all(axis=1)
    mask = np.zeros(len(arr), dtype=bool)
    idx = np.flatnonzero(finite)
    pts = arr[idx]
    for k, i in enumerate(idx):
        ge = (pts >= pts[k]).all(axis=1)
        gt = (pts > pts[k]).any(axis=1)
        mask[i] = not (ge & gt).any()
    return mask


def pareto_front(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Indices of the front, best first by the first objective."""
    arr = _as_max(values, directions)
    idx = np.flatnonzero(pareto_mask(values, directions))
    return idx[np.argsort(-arr[idx, 0], kind="stable")]


def knee_point(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str], mask: np.ndarray | None = None) -> int:
    """Index of the knee: the front point closest to the utopia point after min-max normalisation.

    Each objective is scaled to [0, 1] over the front (1 = best); the knee minimises the Euclidean
    distance to (1, ..., 1). An objective that is constant over the front scales to 1. Ties: the
    lowest index.
    """
    arr = _as_max(values, directions)
    mask = pareto_mask(values, directions) if mask is None else np.asarray(mask, dtype=bool)
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        raise ValueError("no finite point on the front: no knee")
    pts = arr[idx]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    scaled = np.where(hi > lo, (pts - lo) / span, 1.0)
    dist = np.sqrt(((1.0 - scaled) ** 2).sum(axis=1))
    return int(idx[int(np.argmin(dist))])


def _hv_max(points: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume of points (maximisation) above ref, by slicing on the last objective."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(points[:, 0].max() - ref[0])
    order = np.argsort(-points[:, -1], kind="stable")
    pts = points[order]
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i, -1]
        lower = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if upper > lower:
            volume += (upper - lower) * _hv_max(pts[: i + 1, :-1], ref[:-1])
    return volume


def hypervolume(values: np.ndarray | Sequence[Sequence[float]], directions: Sequence[str], reference: Sequence[float]) -> float:
    """Exact volume dominated by the points and dominating the reference point.

    Points that do not strictly beat the reference in every objective contribute nothing; NaN/inf
    rows are ignored.
    """
    arr = _as_max(values, directions)
    ref = _as_max([list(reference)], directions)[0]
    if not np.isfinite(ref).all():
        raise ValueError(f"reference point must be finite, got {list(reference)}")
    keep = np.isfinite(arr).all(axis=1) & (arr > ref).all(axis=1)
    pts = arr[keep]
    if len(pts) == 0:
        return 0.0
    pts = pts[pareto_mask(pts, ["max"] * pts.shape[1])]
    pts = np.unique(pts, axis=0)
    return float(_hv_max(pts, ref))


def speedup_at_equal_accuracy(acc: Sequence[float], epoch_time_s: Sequence[float], baseline_acc: float, baseline_time_s: float,
                              within_points: float = 0.5) -> tuple[int | None, float | None]:
    """The fastest trial whose accuracy is within `within_points` percentage points of the baseline's.

    Accuracies are fractions in [0, 1]; returns (its index, baseline_time_s / its time), or
    (None, None) when no trial qualifies.
    """
    a = np.asarray(acc, dtype=float)
    t = np.asarray(epoch_time_s, dtype=float)
    if a.shape != t.shape:
        raise ValueError(f"acc and epoch_time_s differ in length: {len(a)} vs {len(t)}")
    if within_points < 0:
        raise ValueError(f"within_points must be >= 0, got {within_points}")
    if not (np.isfinite(baseline_time_s) and baseline_time_s > 0):
        raise ValueError(f"baseline_time_s must be a positive number, got {baseline_time_s}")
    ok = np.isfinite(a) & np.isfinite(t) & (t > 0) & (a >= baseline_acc - within_points / 100.0 - 1e-12)
    if not ok.any():
        return None, None
    idx = np.flatnonzero(ok)
    best = int(idx[np.argmin(t[idx])])
    return best, float(baseline_time_s / t[best])
