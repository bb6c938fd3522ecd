"""Pareto fronts: pure computations on bare arrays, and the sweep table built on them.

numpy and pandas only (no MLflow, no plotting, no Ray), so the sweep (orchestration/tune.py) and
analysis/ both use it and it is cheap to import and to test. Reading runs from MLflow is
tracking.search_runs / sweep_record.py; drawing is analysis/.

Conventions shared by the array functions:

* ``values`` is an ``(n_points, n_objectives)`` array (or nested sequence) of floats. A 1-D
  sequence is accepted when there is exactly one objective; an empty sequence means no points.
* ``directions`` gives one of ``"max"``/``"maximize"`` or ``"min"``/``"minimize"`` per objective
  (case and surrounding blanks ignored). Internally every objective is turned into "larger is
  better" by flipping the sign of the minimised ones.
* Rows with NaN or +/-inf in any objective (failed or diverged trials) are never on a front,
  never a knee and add no hypervolume; they are otherwise ignored, not an error.
* Bad input (wrong shape, unknown direction, mismatched lengths) raises ``ValueError`` with a
  message that says what was wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from prelora_ray import metrics as M
from prelora_ray.significance import (
    accuracy_interval,
    compare_accuracy,
    compare_interval,
    compare_repeated,
    dominated_rows,
    mcnemar,
    repeated_accuracy,
)

__all__ = [
    "TRIAL_METRICS",
    "format_front",
    "hypervolume",
    "knee_point",
    "pareto_front",
    "pareto_mask",
    "speedup_at_equal_accuracy",
    "sweep_table",
]

SPEEDUP, SPEEDUP_LO, SPEEDUP_HI, SPEEDUP_WALL = "speedup", "speedup_lo", "speedup_hi", "speedup_wall"
ACC_LO, ACC_HI, P_VS_BASELINE, VERDICT, FRONT = "acc_lo", "acc_hi", "p_vs_baseline", "verdict", "front"
NOISE_COLUMNS = (SPEEDUP_LO, SPEEDUP_HI, SPEEDUP_WALL, M.VAL_N, ACC_LO, ACC_HI, P_VS_BASELINE, VERDICT, FRONT)
"""The front table's noise columns (pareto.csv, scan.csv): names other tools read, kept as they are."""
EARLY_STOPPED = "early_stopped"
"""Column: the trial was stopped at a rung (`early_stopping:`); its `front` is `stopped`."""
NOISE_METRICS = (M.VAL_N, M.VAL_CORRECT, SPEEDUP, SPEEDUP_LO, SPEEDUP_HI)
"""Run metrics the noise columns read (speedup and its interval: each run's own calibrated measure, where logged)."""
INTERVAL_COLUMNS = {M.FINAL_VAL_ACC: (ACC_LO, ACC_HI)}
"""An objective's interval columns where they are not `<metric>_lo` / `<metric>_hi`."""

TRIAL_METRICS = (
    M.SWITCH_EPOCH,
    M.FREEZE_EPOCH,
    M.FINAL_VAL_ACC,
    M.BEST_VAL_ACC,
    M.MEAN_EPOCH_TIME_S,
    M.PEAK_MEM_MB,
    M.TRAINABLE_FRACTION,
    M.TOTAL_TRAIN_TIME_S,
)

ArrayLike2D = np.ndarray | Sequence[Sequence[float]]

_DIRECTIONS = {"max": 1.0, "maximize": 1.0, "min": -1.0, "minimize": -1.0}


def _signs(directions: Sequence[str]) -> np.ndarray:
    """+1 for each maximised objective, -1 for each minimised one (validated)."""
    if isinstance(directions, str | bytes):
        raise ValueError(
            "directions must be a sequence with one entry per objective, e.g. ['max', 'min'], "
            f"not the string {directions!r}"
        )
    directions = list(directions)
    if not directions:
        raise ValueError("directions is empty: give at least one objective ('max' or 'min')")
    signs = []
    for d in directions:
        key = d.strip().lower() if isinstance(d, str) else d
        if key not in _DIRECTIONS:
            raise ValueError(f"direction {d!r} is invalid: use 'max', 'min', 'maximize' or 'minimize'")
        signs.append(_DIRECTIONS[key])
    return np.asarray(signs)


def _as_max(values: ArrayLike2D, directions: Sequence[str]) -> np.ndarray:
    """``values`` as a float ``(n, m)`` array in which larger is better in every column (validated)."""
    signs = _signs(directions)
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"values must be a rectangular array of numbers (points x objectives): {e}") from None
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, len(signs))
    elif arr.ndim == 1 and len(signs) == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(
            f"values must be 2-D (points x objectives), got shape {arr.shape} for {len(signs)} direction(s)"
        )
    if arr.shape[1] != len(signs):
        raise ValueError(f"values have {arr.shape[1]} objective(s) per point but {len(signs)} direction(s) were given")
    return arr * signs


def _nondominated(arr: np.ndarray) -> np.ndarray:
    """Mask of rows of a finite, maximised array that no other row dominates (duplicates kept)."""
    mask = np.ones(len(arr), dtype=bool)
    for i in range(len(arr)):
        ge = (arr >= arr[i]).all(axis=1)
        gt = (arr > arr[i]).any(axis=1)
        mask[i] = not (ge & gt).any()
    return mask


def pareto_mask(values: ArrayLike2D, directions: Sequence[str]) -> npt.NDArray[np.bool_]:
    """Boolean mask of the points on the Pareto front.

    A point is on the front iff no other point is at least as good in every objective and
    strictly better in at least one. Exact duplicates that are otherwise non-dominated are all on
    the front (ties kept). Rows with NaN/inf in any objective are never on the front, and do not
    dominate anything. Any number of objectives; ``O(n^2 m)`` time, vectorised per point.

    Args:
        values: ``(n_points, n_objectives)`` objective values.
        directions: ``"max"``/``"min"`` (or ``"maximize"``/``"minimize"``) per objective.

    Returns:
        A bool array of length ``n_points``.

    Raises:
        ValueError: on a wrong shape, an unknown direction or a directions/objectives mismatch.
    """
    arr = _as_max(values, directions)
    finite = np.isfinite(arr).all(axis=1)
    mask = np.zeros(len(arr), dtype=bool)
    mask[finite] = _nondominated(arr[finite])
    return mask


def pareto_front(values: ArrayLike2D, directions: Sequence[str]) -> npt.NDArray[np.intp]:
    """Indices of the Pareto-front points, sorted by the first objective, best first.

    Points tied on the first objective are ordered by the next objectives (best first), then by
    index. NaN/inf rows are never included (see :func:`pareto_mask`).

    Raises:
        ValueError: as :func:`pareto_mask`.
    """
    arr = _as_max(values, directions)
    idx = np.flatnonzero(pareto_mask(values, directions))
    # np.lexsort sorts by the last key first: index as the final tie-break, objective 0 primary.
    keys = [idx] + [-arr[idx, j] for j in reversed(range(arr.shape[1]))]
    return idx[np.lexsort(keys)].astype(np.intp)


def knee_point(values: ArrayLike2D, directions: Sequence[str], mask: npt.ArrayLike | None = None) -> int:
    """Index (into ``values``) of the knee of the Pareto front.

    Definition used here: every objective is min-max normalised to ``[0, 1]`` over the front
    points, with 1 the best value on the front (an objective constant over the front scales to 1);
    the knee is the front point with the smallest Euclidean distance to the utopia point
    ``(1, ..., 1)``, all objectives weighted equally. A single-point front returns that point.
    Ties go to the lowest index.

    Args:
        values: ``(n_points, n_objectives)`` objective values.
        directions: ``"max"``/``"min"`` per objective.
        mask: optional bool mask of length ``n_points`` choosing the candidate points (normally a
            precomputed :func:`pareto_mask`); by default the Pareto front. Rows with NaN/inf are
            dropped from it.

    Raises:
        ValueError: on bad values/directions, a mask of the wrong length, or no finite candidate.
    """
    arr = _as_max(values, directions)
    if mask is None:
        cand = pareto_mask(values, directions)
    else:
        cand = np.asarray(mask)
        if cand.dtype != bool:
            if cand.dtype.kind not in "iuO" or not np.isin(cand, [0, 1]).all():
                raise ValueError(f"mask must be a boolean array (True = candidate), got dtype {cand.dtype}")
            cand = cand.astype(bool)
        if cand.shape != (len(arr),):
            raise ValueError(f"mask has shape {cand.shape} but values have {len(arr)} points")
        cand = cand & np.isfinite(arr).all(axis=1)
    idx = np.flatnonzero(cand)
    if len(idx) == 0:
        raise ValueError("no finite point on the front: there is no knee")
    pts = arr[idx]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = hi - lo
    scaled = np.where(span > 0, (pts - lo) / np.where(span > 0, span, 1.0), 1.0)
    dist = np.sqrt(((1.0 - scaled) ** 2).sum(axis=1))
    return int(idx[int(np.argmin(dist))])  # argmin returns the first minimum: the lowest index


def _hv_2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact 2-D hypervolume (maximisation) of points strictly above ``ref``: one sweep."""
    pts = points[np.argsort(-points[:, 0], kind="stable")]
    ys = np.maximum.accumulate(pts[:, 1])  # best y among points with x >= the current x
    xs = np.append(pts[:, 0], ref[0])
    return float(((xs[:-1] - xs[1:]) * (ys - ref[1])).sum())


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume (maximisation) of points strictly above ``ref`` in every objective.

    Hypervolume by slicing objectives (HSO): sort on the last objective, cut the dominated region
    into slabs between consecutive values of it, and each slab's volume is its thickness times the
    (m-1)-D hypervolume of the points reaching it (pruned to their own front).
    """
    if len(points) == 0:
        return 0.0
    m = points.shape[1]
    if m == 1:
        return float(points[:, 0].max() - ref[0])
    if m == 2:
        return _hv_2d(points, ref)
    pts = points[np.argsort(-points[:, -1], kind="stable")]
    volume = 0.0
    for i in range(len(pts)):
        upper = pts[i, -1]
        lower = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if upper > lower:
            proj = pts[: i + 1, :-1]
            proj = np.unique(proj[_nondominated(proj)], axis=0)
            volume += (upper - lower) * _hv(proj, ref[:-1])
    return volume


def hypervolume(values: ArrayLike2D, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Exact hypervolume of the region dominated by the points and dominating ``reference``.

    Only points that strictly beat the reference in every objective contribute; NaN/inf rows are
    ignored; dominated points add nothing (so a set and its front have the same hypervolume). 2
    objectives: an ``O(n log n)`` sweep; 3 or more: recursive slicing (HSO), fine for tens of
    points. Minimised objectives are handled by flipping signs (the reference is given in the
    objectives' own units and directions).

    Args:
        values: ``(n_points, n_objectives)`` objective values.
        directions: ``"max"``/``"min"`` per objective.
        reference: one finite value per objective, normally worse than every point of interest
            (e.g. the baseline, or the worst acceptable accuracy and time).

    Returns:
        The hypervolume (0.0 when no point beats the reference).

    Raises:
        ValueError: on bad values/directions or a reference of the wrong length or not finite.
    """
    arr = _as_max(values, directions)
    ref = np.asarray(reference, dtype=float)
    if ref.shape != (arr.shape[1],):
        raise ValueError(f"reference must have one value per objective ({arr.shape[1]}), got shape {ref.shape}")
    if not np.isfinite(ref).all():
        raise ValueError(f"reference point must be finite, got {list(np.asarray(reference).tolist())}")
    ref = ref * _signs(directions)
    keep = np.isfinite(arr).all(axis=1) & (arr > ref).all(axis=1)
    pts = arr[keep]
    if len(pts) == 0:
        return 0.0
    pts = np.unique(pts[_nondominated(pts)], axis=0)
    return float(_hv(pts, ref))


def speedup_at_equal_accuracy(
    acc: Sequence[float],
    epoch_time_s: Sequence[float],
    baseline_acc: float,
    baseline_time_s: float,
    within_points: float = 0.5,
) -> tuple[int | None, float | None]:
    """The fastest trial whose accuracy is within ``within_points`` percentage points of the baseline.

    Accuracies are fractions in ``[0, 1]``; ``within_points`` is in percentage points, so the
    default 0.5 admits trials with ``acc >= baseline_acc - 0.005`` (a 1e-12 slack absorbs float
    rounding at the boundary). Trials with a NaN/inf accuracy or a non-finite or non-positive time
    never qualify. Among qualifying trials the smallest ``epoch_time_s`` wins, ties to the lowest
    index.

    Args:
        acc: accuracy (fraction) of each trial.
        epoch_time_s: mean epoch time of each trial, same length as ``acc``.
        baseline_acc: the baseline's accuracy (fraction).
        baseline_time_s: the baseline's mean epoch time (> 0).
        within_points: tolerance in percentage points (>= 0).

    Returns:
        ``(index, baseline_time_s / epoch_time_s[index])``, or ``(None, None)`` when no trial
        qualifies (including when there are no trials).

    Raises:
        ValueError: on mismatched lengths, a non-finite or out-of-range baseline, a negative or
            non-finite tolerance, or accuracies above 1 (percentages given instead of fractions).
    """
    try:
        a = np.asarray(acc, dtype=float)
        t = np.asarray(epoch_time_s, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"acc and epoch_time_s must be 1-D sequences of numbers: {e}") from None
    if a.ndim != 1 or t.ndim != 1:
        raise ValueError(f"acc and epoch_time_s must be 1-D, got shapes {a.shape} and {t.shape}")
    if a.shape != t.shape:
        raise ValueError(f"acc and epoch_time_s differ in length: {len(a)} vs {len(t)}")
    if not (np.isfinite(within_points) and within_points >= 0):
        raise ValueError(f"within_points must be a finite number >= 0 (percentage points), got {within_points}")
    if not (np.isfinite(baseline_time_s) and baseline_time_s > 0):
        raise ValueError(f"baseline_time_s must be a finite positive number, got {baseline_time_s}")
    if not (np.isfinite(baseline_acc) and 0.0 <= baseline_acc <= 1.0):
        raise ValueError(f"baseline_acc must be a fraction in [0, 1], got {baseline_acc}")
    finite_acc = a[np.isfinite(a)]
    if finite_acc.size and (finite_acc.max() > 1.0 or finite_acc.min() < 0.0):
        raise ValueError(
            "accuracies must be fractions in [0, 1] (not percentages), "
            f"got values in [{finite_acc.min()}, {finite_acc.max()}]"
        )
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(a) & np.isfinite(t) & (t > 0) & (a >= baseline_acc - within_points / 100.0 - 1e-12)
    if not ok.any():
        return None, None
    idx = np.flatnonzero(ok)
    best = int(idx[np.argmin(t[idx])])
    return best, float(baseline_time_s / t[best])


def _num(value: Any) -> Any:
    """A param string as a float when it is a number (MLflow stores params as strings)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def sweep_table(
    runs: pd.DataFrame,
    objectives: list[tuple[str, str]],
    sampled: Sequence[str] = (),
    *,
    hits: Mapping[str, np.ndarray] | None = None,
    alpha: float = 0.05,
    repeats: Mapping[str, Mapping[int, np.ndarray]] | None = None,
) -> pd.DataFrame:
    """One row per run: role, status, switch parameters, objectives, speed-up over the baseline, Pareto flag, and
    the noise columns (`noise_columns`: intervals, the paired test against the baseline, verdict, front).

    The Pareto flag is computed over FINISHED trials only (failed trials never reach it; the baseline is
    the reference point, not a candidate). A sweep over strategies (`strategy` among the `sampled`
    keys) also has a column per other sampled key (e.g. relora.start_epoch), set where the trial sampled it.
    `hits`: each run's val_correct.npy by run id (runs without one get empty noise columns). `repeats` (a sweep with
    `repeats:`, sweep_record.repeat_hits): each run's val_correct.npy by seed, repeat 0 included; `final_val_acc` is
    then the mean over a run's repeats (`repeat_means`) before the Pareto flag, and the noise columns are over seeds.
    """
    if runs.empty:
        return pd.DataFrame(columns=["run_id", "run_name", "role", "status", M.PARETO_TAG, "speedup", *NOISE_COLUMNS])
    rows = []
    for _, r in runs.iterrows():
        row: dict[str, Any] = {
            "run_id": r["run_id"],
            "run_name": r.get("tags.mlflow.runName"),
            "role": r.get(f"tags.{M.ROLE_TAG}"),
            "sweep": r.get(f"tags.{M.SWEEP_TAG}"),
            "status": r.get("status"),
            "strategy": r.get("params.strategy"),
            EARLY_STOPPED: str(r.get(f"tags.{M.EARLY_STOPPED_TAG}", "")) == "true",
        }
        for key in M.SWITCH_PARAMS:  # the full baseline never switches: its switch params mean nothing
            row[key] = _num(r.get(f"params.{key}")) if row["strategy"] != "full" else float("nan")
        if "strategy" in sampled:
            own = _sampled_keys(r.get("tags.sampled"))
            for key in (k for k in sampled if k != "strategy" and k not in M.SWITCH_PARAMS):
                row[key] = _num(r.get(f"params.{key}")) if key in own else float("nan")
        for key in TRIAL_METRICS + NOISE_METRICS + tuple(m for m, _ in objectives):
            row[key] = r.get(f"metrics.{key}")
        rows.append(row)
    table = pd.DataFrame(rows)
    base = table[(table["role"] == "baseline") & (table["status"] == "FINISHED")]
    base_time = float(base[M.MEAN_EPOCH_TIME_S].iloc[0]) if len(base) else float("nan")
    table[SPEEDUP_WALL] = base_time / table[M.MEAN_EPOCH_TIME_S].astype(float)
    # `speedup`: each run's own calibrated measure where it logged one, else (runs logged before it) the wall ratio
    measured = table[SPEEDUP].astype(float)
    table[SPEEDUP] = measured.where(measured.notna(), table[SPEEDUP_WALL])
    table = repeat_means(table, repeats or {})
    table[M.PARETO_TAG] = False
    ok = (table["role"] == "trial") & (table["status"] == "FINISHED") & ~table[EARLY_STOPPED].astype(bool)
    if ok.any():
        values = table.loc[ok, [m for m, _ in objectives]].astype(float).to_numpy()
        table.loc[ok, M.PARETO_TAG] = pareto_mask(values, [d for _, d in objectives])
    table = noise_columns(table, objectives, hits or {}, alpha, repeats=repeats)
    first, mode = objectives[0]
    return table.sort_values([M.PARETO_TAG, first], ascending=[False, mode == "min"]).reset_index(drop=True)


def repeat_means(table: pd.DataFrame, repeats: Mapping[str, Mapping[int, np.ndarray]]) -> pd.DataFrame:
    """With repeats: `final_val_acc` the mean of each repeated run's accuracies, `repeats` N, `val_acc_sd` their
    standard deviation (significance.repeated_accuracy); rows without repeats keep their values (N 1, sd NaN).
    Without repeats the table is returned as it is (no new columns)."""
    if not repeats:
        return table
    table = table.copy()
    counts, spreads = [], []
    for i, run_id in enumerate(table["run_id"]):
        own = repeats.get(str(run_id))
        if own:
            stats = repeated_accuracy(list(own.values()))
            table.loc[table.index[i], M.FINAL_VAL_ACC] = stats.mean
            counts.append(stats.repeats)
            spreads.append(stats.sd if stats.repeats > 1 else math.nan)
        else:
            counts.append(1)
            spreads.append(math.nan)
    table[M.REPEATS] = counts
    table[M.VAL_ACC_SD] = spreads
    return table


def noise_columns(
    table: pd.DataFrame,
    objectives: list[tuple[str, str]],
    hits: Mapping[str, np.ndarray],
    alpha: float = 0.05,
    *,
    repeats: Mapping[str, Mapping[int, np.ndarray]] | None = None,
) -> pd.DataFrame:
    """The columns that tell signal from noise (prelora_ray/significance.py states each rule):

    `val_n`; `acc_lo`, `acc_hi` (the 1 - alpha Wilson interval of final_val_acc); `p_vs_baseline` (exact McNemar
    on the images, against the finished baseline; 1 for the baseline itself); `verdict` (`better`, `worse` or
    `indistinguishable` in accuracy against the baseline at `alpha`); `front` (`plausible` or `dominated` among the
    finished trials and the baseline: dominated only when a trial is better in one objective and not worse in
    any, accuracy compared paired where both runs have their images, other objectives by their `<name>_lo/_hi`
    intervals; an objective without an interval (a wall-clock time) never decides). Runs without val_correct.npy
    (logged before it) get empty accuracy noise columns, and a sweep none of whose runs has one no `front`.

    `repeats` ({run id: {seed: hits}}, a sweep or scan with `repeats:`): for a repeated run `final_val_acc` is the mean
    over its repeats, `acc_lo`/`acc_hi` the interval of `significance.repeated_accuracy`, `p_vs_baseline` and
    `verdict` those of `significance.compare_repeated` against the baseline's repeats (paired per seed), and accuracy
    dominance between two repeated runs is decided the same way; plus the columns `repeats` and `val_acc_sd`.
    """
    repeats = repeats or {}
    table = repeat_means(table, repeats)
    for col in (SPEEDUP_LO, SPEEDUP_HI):
        table[col] = table[col].astype(float) if col in table else float("nan")
    done = table["status"] == "FINISHED"
    run_hits = [hits.get(str(r)) for r in table["run_id"]]
    n = table[M.VAL_N].astype(float) if M.VAL_N in table else pd.Series(float("nan"), index=table.index)
    correct = table[M.VAL_CORRECT].astype(float) if M.VAL_CORRECT in table else n * float("nan")
    for i, h in enumerate(run_hits):
        if h is not None and (math.isnan(n.iloc[i]) or math.isnan(correct.iloc[i])):
            n.iloc[i], correct.iloc[i] = h.size, int(h.sum())
    table[M.VAL_N] = n
    intervals = [
        accuracy_interval(int(c), int(k), level=1 - alpha) if k > 0 and not math.isnan(c) else (math.nan, math.nan)
        for c, k in zip(correct, n, strict=True)
    ]
    seeded = [repeats.get(str(r)) for r in table["run_id"]]
    for i, own in enumerate(seeded):
        if own and len(own) > 1:  # one run: its Wilson interval, as without repeats
            stats = repeated_accuracy(list(own.values()), alpha)
            intervals[i] = (stats.lo, stats.hi)
    table[ACC_LO] = [lo for lo, _ in intervals]
    table[ACC_HI] = [hi for _, hi in intervals]
    base = [i for i in range(len(table)) if table["role"].iloc[i] == "baseline" and done.iloc[i]]
    base_hits = run_hits[base[0]] if base else None
    base_seeded = seeded[base[0]] if base else None
    p_values, verdicts = [], []
    for i, h in enumerate(run_hits):
        if base and i == base[0] and base_hits is not None:
            p_values.append(1.0)
            verdicts.append("indistinguishable")
        elif (
            seeded[i]
            and base_seeded
            and done.iloc[i]
            and (len(seeded[i]) > 1 or len(base_seeded) > 1)
            and _sizes_match(seeded[i], base_seeded)
        ):
            test = compare_repeated(seeded[i], base_seeded, alpha)
            p_values.append(test.p)
            verdicts.append(test.verdict)
        elif h is not None and base_hits is not None and h.size == base_hits.size and done.iloc[i]:
            p_values.append(mcnemar(h, base_hits).p)
            verdicts.append(compare_accuracy(h, base_hits, alpha))
        else:
            p_values.append(math.nan)
            verdicts.append("")
    table[P_VS_BASELINE] = p_values
    table[VERDICT] = verdicts
    table[FRONT] = ""
    stopped = table[EARLY_STOPPED].astype(bool) if EARLY_STOPPED in table else pd.Series(False, index=table.index)
    for i in np.flatnonzero(stopped.to_numpy()):  # stopped at a rung: never on the front, never a dominator
        table.loc[table.index[i], FRONT] = "stopped"
    candidates = [
        i
        for i in range(len(table))
        if done.iloc[i] and not stopped.iloc[i] and table["role"].iloc[i] in ("trial", "baseline")
    ]
    if candidates and any(h is not None for h in run_hits):  # stores logged before per-image correctness: no front

        def verdicts(y: int, x: int) -> list[str]:
            if table["role"].iloc[candidates[y]] != "trial":  # the baseline is the reference, never a dominator
                return ["indistinguishable"]
            return [
                _compare(table, run_hits, candidates[y], candidates[x], metric, mode, alpha, seeded)
                for metric, mode in objectives
            ]

        flags = dominated_rows(len(candidates), verdicts)
        for i, flag in zip(candidates, flags, strict=True):
            table.loc[table.index[i], FRONT] = "dominated" if flag else "plausible"
    return table


def _sizes_match(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray]) -> bool:
    sizes = {np.asarray(h).size for h in (*a.values(), *b.values())}
    return len(sizes) == 1


def _compare(
    table: pd.DataFrame,
    run_hits: list[np.ndarray | None],
    y: int,
    x: int,
    metric: str,
    mode: str,
    alpha: float,
    seeded: list[Mapping[int, np.ndarray] | None] | None = None,
) -> str:
    """Row y against row x on one objective (significance.py): paired for accuracy (per seed where both rows were
    repeated), else intervals, else values."""
    hy, hx = run_hits[y], run_hits[x]
    sy, sx = (seeded[y], seeded[x]) if seeded else (None, None)
    if metric == M.FINAL_VAL_ACC and sy and sx and _sizes_match(sy, sx) and (len(sy) > 1 or len(sx) > 1):
        verdict = compare_repeated(sy, sx, alpha).verdict
        return verdict if mode in ("max", "maximize") else {"better": "worse", "worse": "better"}.get(verdict, verdict)
    if metric == M.FINAL_VAL_ACC and hy is not None and hx is not None and hy.size == hx.size:
        verdict = compare_accuracy(hy, hx, alpha)
        return verdict if mode in ("max", "maximize") else {"better": "worse", "worse": "better"}.get(verdict, verdict)
    lo, hi = INTERVAL_COLUMNS.get(metric, (f"{metric}_lo", f"{metric}_hi"))

    def point(i: int) -> tuple[float, float, float]:
        return tuple(
            float(table[c].iloc[i]) if c in table and pd.notna(table[c].iloc[i]) else math.nan for c in (metric, lo, hi)
        )

    a, b = point(y), point(x)
    if any(math.isnan(v) for v in (*a[1:], *b[1:])):  # no interval (a wall-clock time): no confidence either way
        return "indistinguishable"
    return compare_interval(a, b, mode)


def _sampled_keys(tag: Any) -> set[str]:
    """The keys in a trial's `sampled` tag (JSON), none if it has no such tag."""
    try:
        return set(json.loads(tag)) if isinstance(tag, str) else set()
    except ValueError:
        return set()


def trial_strategies(table: pd.DataFrame) -> list[str]:
    """The strategies of a sweep's FINISHED trials, in order of first appearance (several: a strategies sweep)."""
    if table.empty or "strategy" not in table:
        return []
    done = table[(table["role"] == "trial") & (table["status"] == "FINISHED")]
    return [str(s) for s in dict.fromkeys(done["strategy"].dropna())]


def strategy_lines(table: pd.DataFrame) -> list[str]:
    """Per strategy of a strategies sweep: its finished trials, how many are on the front, its best accuracy."""
    lines = []
    done = table[(table["role"] == "trial") & (table["status"] == "FINISHED")]
    for strategy in trial_strategies(table):
        rows = done[done["strategy"] == strategy]
        on_front = int(rows[M.PARETO_TAG].astype(bool).sum())
        best = rows[M.FINAL_VAL_ACC].astype(float).max() if M.FINAL_VAL_ACC in rows else float("nan")
        lines.append(
            f"strategy {strategy}: {len(rows)} finished trials, {on_front} on the front, "
            f"best {M.FINAL_VAL_ACC} {best:.4g}"
        )
    return lines


def format_front(table: pd.DataFrame) -> str:
    """The console table of the Pareto trials and the baseline; a sweep over strategies adds each row's
    strategy and one line per strategy."""
    if table.empty:
        return "no finished trials"
    shown = table[(table[M.PARETO_TAG]) | (table["role"] == "baseline")]
    several = len(trial_strategies(table)) > 1
    known = {
        "run_id",
        "run_name",
        "role",
        "sweep",
        "status",
        "strategy",
        "speedup",
        M.PARETO_TAG,
        *M.SWITCH_PARAMS,
        *TRIAL_METRICS,
    }
    extra = (
        [c for c in table.columns if "." in c and c not in known] if several else []
    )  # other sampled knobs, e.g. relora.*
    cols = [
        "run_name",
        "role",
        *(["strategy"] if several else []),
        *M.SWITCH_PARAMS,
        *extra,
        M.SWITCH_EPOCH,
        M.FINAL_VAL_ACC,
        *([ACC_LO, ACC_HI, VERDICT] if _any(shown, VERDICT) else []),
        *([M.REPEATS, M.VAL_ACC_SD] if M.REPEATS in shown else []),
        M.MEAN_EPOCH_TIME_S,
        "speedup",
        *([SPEEDUP_LO, SPEEDUP_HI] if _any(shown, SPEEDUP_LO) else []),
    ]
    out = shown[[c for c in cols if c in shown.columns]].rename(columns=lambda c: c.replace("prelora.", ""))
    text = out.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    lines = [text, *(strategy_lines(table) if several else []), noise_line(table)]
    return "\n".join(line for line in lines if line)


def _any(table: pd.DataFrame, column: str) -> bool:
    """Whether any row has a value in `column` (runs logged before the noise columns have none)."""
    if column not in table:
        return False
    values = table[column]
    if pd.api.types.is_numeric_dtype(values):
        return bool(values.notna().any())
    return bool((values.fillna("").astype(str) != "").any())


def noise_line(table: pd.DataFrame) -> str:
    """One line on what is noise: an image's weight in accuracy, the verdicts against the baseline, the front.

    Empty when the runs logged no val_correct.npy (a note says so instead).
    """
    trials = table[(table["role"] == "trial") & (table["status"] == "FINISHED")]
    if trials.empty:
        return ""
    if not _any(trials, VERDICT):
        return "noise: these runs logged no val_correct.npy (before per-image correctness): no verdicts or intervals"
    n = int(table[M.VAL_N].dropna().max())
    counts = trials[VERDICT].value_counts()
    plausible = int((trials[FRONT] == "plausible").sum())
    stopped = int((trials[FRONT] == "stopped").sum())
    return (
        f"noise: one image is {100 / n:.2f} points of accuracy (val_n {n}); against the baseline "
        f"{counts.get('indistinguishable', 0)} trials indistinguishable, {counts.get('better', 0)} better, "
        f"{counts.get('worse', 0)} worse; {plausible} of {len(trials)} plausible (not surely dominated)"
        + (f", {stopped} stopped early (at a rung: their verdicts are the rung's)" if stopped else "")
    )
