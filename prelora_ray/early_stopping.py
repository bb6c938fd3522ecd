"""Multi-objective early stopping of forked segments (`early_stopping:` in a sweep file): the rules, pure.

A rung is a point in a trial's training where it is judged against the trials that reached the same rung before it
(asynchronously, as ASHA: a trial is judged once, when it arrives) and against the trunk at the same epoch. The Ray
side (orchestration/early_stop.py) feeds these functions; everything here runs without Ray and is unit-tested so.

What a rung compares (docs/sweeps.md, "Early stopping", states it for users):

* Each trial at the rung is a `RungRow`: the epoch it reached the rung at, its validation accuracy there, which
  validation images it got right (`hits`), and its measured speed-up so far with its interval (calibration).
* Accuracy: exact McNemar on the two rows' hits (`significance.compare_accuracy`): two classifiers scored on the
  same images, whatever their epochs. Rows at different epochs (rungs counted after the fork: trials that forked at
  different epochs) must also be ordered the same way by their gaps to the trunk at their own epochs (a trial that
  forked later had more full training); with no trunk record at either epoch they are `indistinguishable`: nothing
  is decided on evidence that is not there. (Comparing the gaps' intervals alone, as an earlier version did, is
  not a test: an interval conditional on a few discordant images is narrow, and two of them 6 images apart were
  disjoint; the quickstart space's sweep stopped four trials that ended as accurate as the best.)
* The trunk at the trial's epoch is a reference row with speed-up exactly 1 (full training against itself).
* Speed-up: `better` only when one interval lies above the other by more than `speed_margin` (relative, default
  5%). The calibration interval is the spread of one trial's rounds; two trials of the same compute measured at
  different moments differ by more than that (a sweep of identical models showed disjoint intervals 1% apart), and
  `benchmarks/speedup_robustness.py` moves the measure by up to 2.5% under contention.
* A row is *certainly dominated* when another row (a trial at the rung, or the trunk) is `better` in accuracy and
  not `worse` in speed-up, each accuracy test at alpha / (the number of rows it is compared with) (Bonferroni: a
  trial is never stopped because one of many comparisons came out unlucky). Speed alone never stops a trial: one
  as accurate as the best may be the one a user wants, and a sweep of the quickstart space stopped two such trials
  for being surely slower before this rule (benchmarks/sweep_cost.py).
* The rows at a rung are the trials that reached it and the trunk at the judged trial's epoch (where recorded): the
  trunk is there from the first trial on, so the first trials to reach a rung are judged against full training.
* Its *rank* is its non-dominated front on the point values (accuracy gap to the trunk, or accuracy where every row
  is at one epoch; speed-up): 0 for rows no other row dominates, 1 for those only rank-0 rows dominate, and so on.
  It is in the *worst fraction* when at least ceil(n / reduction_factor) of the n rows have a better rank.

A trial is stopped at a rung when at least `min_trials` trials have reached it (itself included; default 1), it is
in the worst fraction, and it is certainly dominated. So a stop needs both ASHA's ranking and a significant difference:
a trial within noise of every row that could dominate it goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy only where rows are compared: search_space imports this module and loads no numpy
    import numpy as np
    import numpy.typing as npt

TYPES = ("mo-asha",)
RUNGS_FROM = ("fork", "start")
FIELDS = ("type", "rungs", "rungs_from", "reduction_factor", "grace_epochs", "min_trials", "speed_margin")
TRUNK = "trunk"  # the name of the trunk's reference row in a decision
NOT_LORA_PHASES = ("full", "warmup")  # phases in which a trial is never judged (full training, PreLoRA's warmup)


@dataclass(frozen=True)
class EarlyStopping:
    """A sweep file's `early_stopping:` section, validated."""

    type: str = "mo-asha"
    rungs: tuple[int, ...] = (1, 2, 4, 8)
    rungs_from: str = "fork"  # fork: epochs trained after the trial's fork from the trunk; start: absolute epochs
    reduction_factor: float = 3.0
    grace_epochs: int = 0  # 0: judged from its first epoch with the adapters alone (after PreLoRA's warmup)
    min_trials: int = 1  # trials at a rung (itself included) before it stops anything; the trunk is always there
    speed_margin: float = 0.05  # speed-ups differ only when their intervals are apart by more than this (relative)

    def rung_epochs(self, forked_from: int) -> list[int]:
        """The 0-based epoch index of each rung for a trial that started training at `forked_from` (-1 or 0: not a
        fork). Rung r is the report after r epochs: after the fork, or from the start."""
        offset = max(forked_from, 0) if self.rungs_from == "fork" else 0
        return [offset + r - 1 for r in self.rungs]

    def as_dict(self) -> dict[str, Any]:
        """The section as written in a file (for the parent run's params)."""
        return {
            "type": self.type,
            "rungs": list(self.rungs),
            "rungs_from": self.rungs_from,
            "reduction_factor": self.reduction_factor,
            "grace_epochs": self.grace_epochs,
            "min_trials": self.min_trials,
            "speed_margin": self.speed_margin,
        }


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_early_stopping(raw: Any, key: str = "early_stopping") -> EarlyStopping | None:
    """The validated section (None: absent or null, no early stopping). A ValueError of one line naming the key."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError(f"{key}: must be a mapping with type: {' | '.join(TYPES)} and its knobs, got {raw!r}")
    extra = [k for k in raw if k not in FIELDS]
    if extra:
        raise ValueError(f"{key}.{extra[0]}: unknown field (fields: {', '.join(FIELDS)})")
    kind = raw.get("type")
    if kind not in TYPES:
        raise ValueError(f"{key}.type: must be one of {', '.join(TYPES)}, got {kind!r}")
    defaults = EarlyStopping()
    rungs = raw.get("rungs", list(defaults.rungs))
    if (
        not isinstance(rungs, list)
        or not rungs
        or not all(_int(r) and r >= 1 for r in rungs)
        or any(b <= a for a, b in zip(rungs, rungs[1:], strict=False))
    ):
        raise ValueError(f"{key}.rungs: must be a non-empty list of increasing integers >= 1 (epochs), got {rungs!r}")
    rungs_from = raw.get("rungs_from", defaults.rungs_from)
    if rungs_from not in RUNGS_FROM:
        raise ValueError(
            f"{key}.rungs_from: must be fork (epochs after the trial's fork) or start (absolute epochs), "
            f"got {rungs_from!r}"
        )
    eta = raw.get("reduction_factor", defaults.reduction_factor)
    if not isinstance(eta, int | float) or isinstance(eta, bool) or not math.isfinite(eta) or eta <= 1:
        raise ValueError(f"{key}.reduction_factor: must be a number > 1, got {eta!r}")
    grace = raw.get("grace_epochs", defaults.grace_epochs)
    if not _int(grace) or grace < 0:
        raise ValueError(f"{key}.grace_epochs: must be an integer >= 0, got {grace!r}")
    min_trials = raw.get("min_trials", defaults.min_trials)
    if not _int(min_trials) or min_trials < 1:
        raise ValueError(f"{key}.min_trials: must be an integer >= 1, got {min_trials!r}")
    margin = raw.get("speed_margin", defaults.speed_margin)
    if not isinstance(margin, int | float) or isinstance(margin, bool) or not 0 <= margin < 1:
        raise ValueError(f"{key}.speed_margin: must be a number in [0, 1) (a relative difference), got {margin!r}")
    return EarlyStopping(
        type=kind,
        rungs=tuple(rungs),
        rungs_from=rungs_from,
        reduction_factor=float(eta),
        grace_epochs=grace,
        min_trials=min_trials,
        speed_margin=float(margin),
    )


def lora_start(report: dict[str, Any]) -> int:
    """The first epoch of a trial's adapted phase, from its report: after the freeze (PreLoRA's warmup over) when
    the strategy froze its base, else the first epoch it trained itself (after the fork)."""
    freeze = int(report.get("freeze_epoch", -1))
    if freeze >= 0:
        return freeze + 1
    return max(int(report.get("forked_from", -1)), 0)


def judgeable(report: dict[str, Any], grace_epochs: int) -> bool:
    """May a trial be judged at this report? Only in its adapted phase (never in full training or PreLoRA's warmup),
    `grace_epochs` epochs after its first epoch there."""
    if str(report.get("phase", "")) in NOT_LORA_PHASES:
        return False
    return int(report["epoch"]) - lora_start(report) >= grace_epochs


@dataclass
class RungRow:
    """A trial at a rung: what it had reached there."""

    trial: str
    epoch: int
    acc: float
    hits: npt.NDArray[np.bool_] | None
    speedup: tuple[float, float, float]  # value, lo, hi

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for the sweep's record of rung decisions (hits packed)."""
        from prelora_ray.significance import pack_hits

        return {
            "trial": self.trial,
            "epoch": self.epoch,
            "acc": self.acc,
            "hits": pack_hits(self.hits) if self.hits is not None else None,
            "speedup": list(self.speedup),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RungRow:
        """Inverse of as_dict."""
        from prelora_ray.significance import unpack_hits

        return cls(
            trial=str(data["trial"]),
            epoch=int(data["epoch"]),
            acc=float(data["acc"]),
            hits=unpack_hits(data["hits"]) if data.get("hits") else None,
            speedup=tuple(float(x) for x in data["speedup"]),  # type: ignore[arg-type]
        )


@dataclass
class Decision:
    """A rung's verdict on one trial."""

    stop: bool
    rank: int
    rows: int  # trials at the rung, the judged one included
    dominated_by: str | None = None  # the row that dominates it with confidence (a trial, or TRUNK)
    why: str = ""
    ranks: dict[str, int] = field(default_factory=dict)


def nondominated_ranks(points: npt.ArrayLike) -> list[int]:
    """Non-dominated sorting of points to maximise in every column: each point's front index (0 = not dominated).

    A row with NaN is in no front below any other: rank 0 and dominating nothing (it is never "worst" on evidence
    that is missing).
    """
    import numpy as np

    arr = np.asarray(points, dtype=float)
    n = len(arr)
    ranks = [-1] * n
    finite = [bool(np.isfinite(arr[i]).all()) for i in range(n)]
    for i in range(n):
        if not finite[i]:
            ranks[i] = 0
    remaining = [i for i in range(n) if finite[i]]
    front = 0
    while remaining:
        current = [
            i
            for i in remaining
            if not any((arr[j] >= arr[i]).all() and (arr[j] > arr[i]).any() for j in remaining if j != i)
        ]
        for i in current:
            ranks[i] = front
        remaining = [i for i in remaining if i not in current]
        front += 1
    return ranks


TrunkHits = Callable[[int], "npt.NDArray[np.bool_] | None"]


def _gap(row: RungRow, trunk_hits: TrunkHits, alpha: float) -> tuple[float, float, float]:
    """The row's accuracy minus the trunk's at the same epoch, with its interval (NaN without a trunk record)."""
    from prelora_ray.significance import paired_difference

    trunk = trunk_hits(row.epoch)
    if trunk is None or row.hits is None or len(trunk) != len(row.hits):
        return math.nan, math.nan, math.nan
    return paired_difference(row.hits, trunk, alpha)


def _accuracy_verdict(y: RungRow, x: RungRow, trunk_hits: TrunkHits, alpha: float) -> str:
    """Y against X in accuracy, at `alpha`: paired when at one epoch, else through their gaps to the trunk."""
    from prelora_ray.significance import compare_accuracy

    if y.hits is None or x.hits is None or len(y.hits) != len(x.hits):
        return "indistinguishable"
    verdict = compare_accuracy(y.hits, x.hits, alpha)  # two classifiers on the same images, whatever their epochs
    if y.epoch == x.epoch or verdict == "indistinguishable":
        return verdict
    # at different epochs the difference must also hold against the trunk at each one's epoch (a trial that forked
    # later had more full training): Y's gap to the trunk above X's for `better`, below for `worse`
    gy, gx = _gap(y, trunk_hits, alpha)[0], _gap(x, trunk_hits, alpha)[0]
    if math.isnan(gy) or math.isnan(gx):
        return "indistinguishable"
    return verdict if (gy > gx if verdict == "better" else gy < gx) else "indistinguishable"


def _speed_verdict(y: RungRow, x: RungRow, margin: float) -> str:
    """Y against X in speed-up: `better` / `worse` only when one's interval lies above the other's by more than
    `margin` (relative); without an interval on either side, nothing is decided."""
    if any(math.isnan(v) for v in (*y.speedup, *x.speedup)):
        return "indistinguishable"
    if y.speedup[1] > x.speedup[2] * (1 + margin):
        return "better"
    if x.speedup[1] > y.speedup[2] * (1 + margin):
        return "worse"
    return "indistinguishable"


def decide(
    candidate: RungRow,
    others: Sequence[RungRow],
    trunk_hits: TrunkHits,
    rules: EarlyStopping,
    alpha: float = 0.05,
) -> Decision:
    """Stop `candidate` at this rung? `others`: the trials that reached the rung before it; `trunk_hits(epoch)`: the
    trunk's per-image correctness at an epoch (None: no record). The module docstring states the rule."""
    import numpy as np

    trials = [candidate, *others]
    if len(trials) < rules.min_trials:
        return Decision(False, 0, len(trials), why=f"{len(trials)} of min_trials {rules.min_trials} trials at the rung")
    trunk_row = None
    trunk = trunk_hits(candidate.epoch)
    if trunk is not None:
        trunk_row = RungRow(TRUNK, candidate.epoch, float(np.mean(trunk)), trunk, (1.0, 1.0, 1.0))
    rows = [*trials, *([trunk_row] if trunk_row is not None else [])]
    n = len(rows)
    one_epoch = len({r.epoch for r in rows}) == 1
    accuracy = [r.acc if one_epoch else _gap(r, trunk_hits, alpha)[0] for r in rows]
    ranks = nondominated_ranks([[a, r.speedup[0]] for a, r in zip(accuracy, rows, strict=True)])
    names = {r.trial: k for r, k in zip(rows, ranks, strict=True)}
    rank = ranks[0]
    ahead = sum(k < rank for k in ranks)
    keep = math.ceil(n / rules.reduction_factor)
    if ahead < keep:
        return Decision(False, rank, n, why=f"rank {rank}: in the best {keep} of {n}", ranks=names)
    rivals = rows[1:]
    level = alpha / max(len(rivals), 1)
    for rival in rivals:
        verdicts = (
            _accuracy_verdict(rival, candidate, trunk_hits, level),
            _speed_verdict(rival, candidate, rules.speed_margin),
        )
        if verdicts[0] == "better" and verdicts[1] != "worse":
            return Decision(True, rank, n, dominated_by=rival.trial, why=f"dominated by {rival.trial}", ranks=names)
    return Decision(False, rank, n, why=f"rank {rank} of {n} but within noise of every rival", ranks=names)
