"""Noise on a front: accuracy intervals, paired tests and dominance that respects them (pure: numpy and scipy).

A validation set of n images measures an accuracy with a binomial error: on digits (n = 360) one image is
0.28 points and the 95% interval of a 0.97 accuracy is about +-1.8 points wide. Two classifiers scored on
the same images are compared paired, with the exact McNemar test (Dietterich, 1998): only the images that
exactly one of them gets right count, and under "no difference" each of those is a fair coin.

The rules, stated once (docs/sweeps.md, "Reading a front: what is noise", quotes them):

* `accuracy_interval`: the 95% Wilson score interval (or Clopper-Pearson, `method="exact"`) of
  correct / n, from `scipy.stats.binomtest`.
* `mcnemar`: b = images only A gets right, c = images only B gets right; p = the two-sided exact binomial
  test of b successes in b + c trials at 1/2, and p = 1 when b + c = 0.
* `compare_accuracy`: `better` / `worse` when p < alpha and b > c / b < c, else `indistinguishable`.
* `compare_interval` (`compare_speedup`): `better` / `worse` when the two intervals do not overlap (A's low end
  above B's high end, or the reverse), else `indistinguishable`.
* `paired_difference`: A's accuracy minus B's with an interval that excludes 0 exactly when McNemar's p < alpha.
* `repeated_accuracy` (a run repeated with N data-order seeds, `repeats:`): the mean of the N accuracies, their
  standard deviation, and the 1 - alpha interval mean +- t * se with se^2 = sd^2 / N (training noise: the spread
  across seeds) + var_i(h_i) / n (test-sample noise: h_i is image i's hit rate over the N repeats, n images), t of
  Student's distribution with the Welch-Satterthwaite degrees of freedom of those two terms (N - 1 and n - 1).
* `compare_repeated`: A against B per seed (paired: A's repeat with seed s against B's with seed s, on the same
  images): d = the mean over seeds of the accuracy differences, se^2 = sd_s(d_s)^2 / N + var_i(d_i) / n as above
  (d_i: image i's mean difference over the seeds), p = the two-sided t test of d / se with those degrees of
  freedom; `better` / `worse` when p < alpha. Where B ran once (not repeated), each of A's repeats is paired with
  that one run: B's training noise is then not in the spread.
* `dominated`: row X is dominated when some row Y is `better` than X in at least one objective and not
  `worse` in the other. Everything else is `plausible`: a row is never dropped for a difference within
  noise. (`front.noise_columns` lets an objective without an interval, a wall-clock time, decide nothing.)
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


def pack_hits(hits: npt.ArrayLike) -> str:
    """Per-image correctness (bool, the validation set's order) as a short text: "<n>:<base64 of the packed bits>"."""
    bits = np.asarray(hits, dtype=bool)
    return f"{bits.size}:{base64.b64encode(np.packbits(bits).tobytes()).decode()}"


def unpack_hits(text: str) -> np.ndarray:
    """`pack_hits`' inverse: the bool array."""
    size, _, payload = text.partition(":")
    return np.unpackbits(np.frombuffer(base64.b64decode(payload), dtype=np.uint8), count=int(size)).astype(bool)


VERDICTS = ("better", "worse", "indistinguishable")
INTERVAL_METHODS = {"wilson": "wilson", "exact": "exact", "clopper-pearson": "exact"}


def check_alpha(alpha: float, key: str = "alpha") -> float:
    """`alpha` as a float in (0, 0.5], or a one-line ValueError naming `key`."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(
            f"{key}: {alpha!r} is not a number; give a significance level in (0, 0.5], e.g. 0.05"
        ) from None
    if not (0.0 < value <= 0.5) or math.isnan(value):
        raise ValueError(f"{key}: {alpha!r} is outside (0, 0.5]; give a significance level such as 0.05")
    return value


def accuracy_interval(correct: int, n: int, level: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """The `level` confidence interval of the accuracy correct / n (Wilson score, or Clopper-Pearson "exact")."""
    from scipy.stats import binomtest

    if method not in INTERVAL_METHODS:
        raise ValueError(f"interval method {method!r} is unknown; valid: {', '.join(INTERVAL_METHODS)}")
    correct, n = int(correct), int(n)
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"accuracy interval: need 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    ci = binomtest(correct, n).proportion_ci(confidence_level=level, method=INTERVAL_METHODS[method])
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class McNemar:
    """The paired comparison of A and B on the same images: b = only A right, c = only B right, p two-sided."""

    b: int
    c: int
    p: float


def mcnemar(a_correct: npt.ArrayLike, b_correct: npt.ArrayLike) -> McNemar:
    """Exact McNemar test of two classifiers' per-image correctness (bool arrays in the same image order)."""
    from scipy.stats import binomtest

    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"McNemar: need two 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    if only_a + only_b == 0:
        return McNemar(0, 0, 1.0)
    return McNemar(only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue))


def compare_accuracy(a_correct: npt.ArrayLike, b_correct: npt.ArrayLike, alpha: float = 0.05) -> str:
    """A against B in accuracy: `better`, `worse` or `indistinguishable` (exact McNemar at `alpha`)."""
    test = mcnemar(a_correct, b_correct)
    if test.p >= alpha or test.b == test.c:
        return "indistinguishable"
    return "better" if test.b > test.c else "worse"


def paired_difference(
    a_correct: npt.ArrayLike, b_correct: npt.ArrayLike, alpha: float = 0.05
) -> tuple[float, float, float]:
    """A's accuracy minus B's on the same images, with its 1 - alpha interval, conditional on the discordant images.

    With D = b + c discordant images, the difference is (b - c) / n = D / n * (2 * pi - 1), pi = b / D; its interval
    maps the Clopper-Pearson interval of pi. It excludes 0 exactly when `mcnemar`'s p < alpha (a symmetric binomial's
    two-sided p is twice its tail), so `hi` < 0 is `compare_accuracy`'s "worse" and `hi` >= -margin is "not worse by
    more than margin".
    """
    from scipy.stats import binomtest

    test = mcnemar(a_correct, b_correct)
    n = np.asarray(a_correct).size
    discordant = test.b + test.c
    if discordant == 0:
        return 0.0, 0.0, 0.0
    ci = binomtest(test.b, discordant, 0.5).proportion_ci(confidence_level=1 - alpha, method="exact")
    scale = discordant / n
    return (test.b - test.c) / n, scale * (2 * ci.low - 1), scale * (2 * ci.high - 1)


def compare_interval(a: tuple[float, float, float], b: tuple[float, float, float], mode: str = "max") -> str:
    """A against B on one objective, each (value, lo, hi): `better` / `worse` only when the intervals are disjoint.

    `mode` "min": smaller is better. Missing intervals (NaN ends) fall back to the point values: a plain
    comparison, as without noise.
    """
    a_val, a_lo, a_hi = (float(x) for x in a)
    b_val, b_lo, b_hi = (float(x) for x in b)
    sign = 1.0 if mode in ("max", "maximize") else -1.0
    if any(math.isnan(x) for x in (a_lo, a_hi, b_lo, b_hi)):
        if math.isnan(a_val) or math.isnan(b_val) or a_val == b_val:
            return "indistinguishable"
        return "better" if sign * (a_val - b_val) > 0 else "worse"
    if a_lo > b_hi:
        return "better" if sign > 0 else "worse"
    if a_hi < b_lo:
        return "worse" if sign > 0 else "better"
    return "indistinguishable"


def compare_speedup(a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    """A against B in speed-up (larger is better), each (value, lo, hi): `compare_interval`."""
    return compare_interval(a, b, "max")


def dominated_rows(rows: int, verdicts: Callable[[int, int], Sequence[str]]) -> list[bool]:
    """For each of `rows` rows: is it dominated with confidence? `verdicts(y, x)`: Y against X per objective.

    Row X is dominated when another row Y is `better` than X in one objective and not `worse` in any (the
    module docstring). Rows may be dominated by rows that are themselves dominated, as in a plain front.
    """
    out = [False] * rows
    for x in range(rows):
        for y in range(rows):
            if x != y:
                v = verdicts(y, x)
                if "worse" not in v and "better" in v:
                    out[x] = True
                    break
    return out


def dominated(
    correct: Sequence[npt.ArrayLike],
    speedups: Sequence[tuple[float, float, float]],
    alpha: float = 0.05,
) -> list[bool]:
    """`dominated_rows` on accuracy (paired: each row's per-image correctness) and speed-up ((value, lo, hi))."""
    if len(correct) != len(speedups):
        raise ValueError(f"dominance: {len(correct)} accuracy rows but {len(speedups)} speed-up rows")
    return dominated_rows(
        len(correct),
        lambda y, x: (compare_accuracy(correct[y], correct[x], alpha), compare_speedup(speedups[y], speedups[x])),
    )


REPEATS_KEY = "repeats"


def check_repeats(value: object, key: str = REPEATS_KEY) -> int:
    """`repeats` as an integer >= 1, or a one-line ValueError naming `key` (a bool, a float or a string is refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"{key}: {value!r} is not an integer; give how many data-order seeds each forked segment trains, "
            "an integer >= 1 (1: no repeats)"
        )
    if value < 1:
        raise ValueError(f"{key}: {value!r} is below 1; give an integer >= 1 (1: no repeats)")
    return value


REPEAT_SEED_STRIDE = 1_000_003
"""Seeds of successive repeats this far apart: the DistributedSampler seeds epoch e's permutation with seed + e, so with
seeds one apart repeat 1's epoch e would be repeat 0's epoch e + 1; this far apart no two repeats share an epoch's
order in any run shorter than a million epochs."""


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of repeat `repeat` (0: the run's own seed) of a run whose config has `seed`: seed + repeat * 1000003."""
    return int(seed) + int(repeat) * REPEAT_SEED_STRIDE


def _combined_t(between: float, n_between: int, within: float, n_within: int) -> tuple[float, float]:
    """se and the Welch-Satterthwaite degrees of freedom of a variance between + within (each with n - 1 df)."""
    total = between + within
    if total <= 0:
        return 0.0, math.inf
    parts = (between**2 / (n_between - 1) if n_between > 1 and between > 0 else 0.0) + (
        within**2 / (n_within - 1) if n_within > 1 and within > 0 else 0.0
    )
    return math.sqrt(total), (total**2 / parts if parts > 0 else math.inf)


@dataclass(frozen=True)
class Repeated:
    """A run repeated with N seeds on the same n images: mean accuracy, its spread and its 1 - alpha interval."""

    mean: float
    sd: float
    lo: float
    hi: float
    repeats: int
    n: int


def repeated_accuracy(hits: Sequence[npt.ArrayLike], alpha: float = 0.05) -> Repeated:
    """The N repeats' per-image correctness (each a bool array, the same images): see the module docstring."""
    from scipy.stats import t as student

    table = np.asarray([np.asarray(h, dtype=bool) for h in hits], dtype=float)
    if table.ndim != 2 or table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"repeated accuracy: need N >= 1 arrays of the same length > 0, got shape {table.shape}")
    repeats, n = table.shape
    acc = table.mean(axis=1)
    mean = float(acc.mean())
    sd = float(acc.std(ddof=1)) if repeats > 1 else 0.0
    se, df = _combined_t(sd**2 / repeats, repeats, float(table.mean(axis=0).var(ddof=1)) / n if n > 1 else 0.0, n)
    if se == 0:  # every repeat right (or wrong) on every image: the Wilson interval of that one count
        lo, hi = accuracy_interval(round(mean * n), n, level=1 - alpha)
        return Repeated(mean, sd, lo, hi, repeats, n)
    half = float(student.ppf(1 - alpha / 2, df)) * se
    return Repeated(mean, sd, max(0.0, mean - half), min(1.0, mean + half), repeats, n)


@dataclass(frozen=True)
class RepeatedComparison:
    """A against B over seeds: the mean accuracy difference, its 1 - alpha interval, p and the verdict."""

    diff: float
    lo: float
    hi: float
    p: float
    verdict: str
    paired: int  # seeds paired (0: B ran once and each of A's repeats was compared with it)


def compare_repeated(
    a: dict[int, npt.ArrayLike], b: dict[int, npt.ArrayLike], alpha: float = 0.05
) -> RepeatedComparison:
    """A against B, each {seed: per-image correctness}: paired per seed (module docstring).

    Seeds both have are paired; where B has one run only (not repeated), each of A's repeats is paired with it (and
    the reverse). Anything else (no seed in common) is a ValueError."""
    from scipy.stats import t as student

    common = sorted(set(a) & set(b))
    if len(b) == 1 and len(a) > 1:
        only = np.asarray(next(iter(b.values())), dtype=float)
        rows, paired = [np.asarray(a[s], dtype=float) - only for s in sorted(a)], 0
    elif len(a) == 1 and len(b) > 1:
        only = np.asarray(next(iter(a.values())), dtype=float)
        rows, paired = [only - np.asarray(b[s], dtype=float) for s in sorted(b)], 0
    elif common:
        rows = [np.asarray(a[s], dtype=float) - np.asarray(b[s], dtype=float) for s in common]
        paired = len(common)
    else:
        raise ValueError(f"compare repeats: no seed in common ({sorted(a)} against {sorted(b)})")
    table = np.asarray(rows)
    if table.ndim != 2:
        raise ValueError("compare repeats: the runs' correctness arrays differ in length")
    repeats, n = table.shape
    per_seed = table.mean(axis=1)
    diff = float(per_seed.mean())
    between = float(per_seed.var(ddof=1)) / repeats if repeats > 1 else 0.0
    within = float(table.mean(axis=0).var(ddof=1)) / n if n > 1 else 0.0
    se, df = _combined_t(between, repeats, within, n)
    if se == 0:
        p = 1.0 if diff == 0 else 0.0
        half = 0.0
    else:
        p = float(2 * student.sf(abs(diff) / se, df))
        half = float(student.ppf(1 - alpha / 2, df)) * se
    verdict = "indistinguishable" if p >= alpha or diff == 0 else ("better" if diff > 0 else "worse")
    return RepeatedComparison(diff, diff - half, diff + half, p, verdict, paired)
