"""Fork-from-trunk sweeps, the Ray-free part: the trunk's records on disk and a trial's fork plan.

Every PreLoRA trial of a sweep trains the same weights as the `full` baseline until its own switch
epoch. The baseline runs as the *trunk*: each epoch it appends its metrics (per-layer norms of every
module family and the all-worker loss, which is all Algorithm 1 and 2 need for any k, m and
window_stat) to `history.json`, and every `fork.every` epochs it writes a full training checkpoint
`checkpoints/epoch_<c>.pt` (c = epochs completed, so the state at the start of epoch c). A trial
replays Algorithm 1 on that history to find its switch epoch s, then starts from the latest
checkpoint with c <= s + 1, trains the full epochs c..s again if any (deterministic: they equal the
trunk's) and switches with its own ranks at the end of epoch s (at once when c = s + 1). Every file goes
through `prelora_ray.storage` (a local folder, a shared mount, S3 or GCS), so a reader never takes half a
file for a whole one.

Other strategies say where their trials start (`strategies.base.Strategy.trunk_fork`, a `TrunkFork`):
relora_prelora at the trunk's checkpoint at relora.start_epoch, full trials take the trunk's result, and a
strategy that shares no epochs with the trunk trains whole. This module imports no strategy (they import
it): `plan_fork` asks the trial's config for its strategy class. Ray-free, and torch loads only to write a
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prelora_ray import metrics as M
from prelora_ray.algorithms import Snapshot, SwitchPoint, replay_switch
from prelora_ray.models import MODULE_FAMILIES
from prelora_ray.speedup import run_speedup
from prelora_ray.storage import MANIFEST_SUFFIX, Location, location, replace_local
from prelora_ray.summary import RunSummary

if TYPE_CHECKING:
    from prelora_ray.config import TrainSettings

HISTORY_FILE = "history.json"
STATUS_FILE = "status.json"
CHECKPOINT_DIR = "checkpoints"
_CKPT = re.compile(r"epoch_(\d+)\.pt$")

# keys that name or place a run without changing what it computes
RUN_IDENTITY_KEYS = (
    "name",
    "output_dir",
    "tracking.run_name",
    "tracking.uri",
    "tracking.experiment",
    "tracking.enabled",
    "cluster.storage_path",
)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write a local file through a temp file in the same folder, then rename: readers see the old or the new file."""
    replace_local(Path(path), write)


def write_json(path: Path | str | Location, data: Any) -> None:
    """A JSON file replaced whole (a local rename, or one object on a store)."""
    location(path).write_json(data)


class TrunkWriter:
    """The trunk's side: per-epoch history and fork checkpoints, written by rank 0 of the trunk run."""

    def __init__(self, folder: str | Path | Location, every: int) -> None:
        if every < 1:
            raise ValueError(f"fork.every={every!r} is invalid: an integer >= 1")
        self.folder, self.every = location(folder), every
        self.history: list[dict[str, Any]] = []

    def start(self, epoch: int, state: Callable[[], dict[str, Any]]) -> None:
        """Begin (epoch 0) or go on after a resume at `epoch`: later records of a killed attempt are dropped."""
        old = read_history(self.folder)
        self.history = [h for h in old if int(h[M.EPOCH]) < epoch]
        if len(self.history) != len(old) or not old:
            (self.folder / HISTORY_FILE).write_json(self.history)
        if epoch % self.every == 0 and not checkpoint_path(self.folder, epoch).committed():
            self.checkpoint(epoch, state())

    def after_epoch(self, epoch: int, metrics: dict[str, Any], state: Callable[[], dict[str, Any]]) -> None:
        """Record epoch `epoch`; then, every `every` epochs, the checkpoint a trial forks from."""
        self.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        (self.folder / HISTORY_FILE).write_json(self.history)
        if (epoch + 1) % self.every == 0:
            self.checkpoint(epoch + 1, state())

    def checkpoint(self, completed: int, state: dict[str, Any]) -> None:
        """The state at the start of epoch `completed` (a manifest follows it on object stores)."""
        save_state(checkpoint_path(self.folder, completed), state)


def save_state(target: Location, state: dict[str, Any]) -> None:
    """torch.save a state to a storage location so that no reader takes a half-written file for it."""
    import torch

    if target.is_local:
        write_atomic(target.local, lambda tmp: torch.save(state, tmp))
        return
    with tempfile.TemporaryDirectory(prefix="prelora-") as tmp:
        torch.save(state, Path(tmp) / target.name)
        target.put_file(Path(tmp) / target.name)


def checkpoint_path(folder: str | Path | Location, completed: int) -> Location:
    """Where the trunk keeps its state at the start of epoch `completed`."""
    return location(folder) / CHECKPOINT_DIR / f"epoch_{completed:05d}.pt"


def read_history(folder: str | Path | Location) -> list[dict[str, Any]]:
    """The trunk's per-epoch records so far ([] before its first epoch)."""
    try:
        return (location(folder) / HISTORY_FILE).read_json()
    except FileNotFoundError:
        return []


def checkpoint_epochs(folder: str | Path | Location) -> list[int]:
    """Epochs at whose start the trunk has a complete checkpoint, ascending.

    On an object store a checkpoint counts once its manifest is there (written after the data)."""
    base = location(folder) / CHECKPOINT_DIR
    if base.is_local:
        found = (_CKPT.search(c.name) for c in base.children())
        return sorted(int(m.group(1)) for m in found if m)
    import pyarrow.fs as pafs

    infos = base.fs.get_file_info(pafs.FileSelector(base.path, recursive=False, allow_not_found=True))
    names = {posixpath.basename(i.path) for i in infos}
    found = (_CKPT.search(n) for n in names if f"{n}{MANIFEST_SUFFIX}" in names)
    return sorted(int(m.group(1)) for m in found if m)


def read_status(folder: str | Path | Location) -> dict[str, Any]:
    """The trunk's status as its driver left it: {'state': running|finished|failed, 'error': ...}."""
    try:
        return (location(folder) / STATUS_FILE).read_json()
    except FileNotFoundError:
        return {"state": "missing"}


def write_status(folder: str | Path | Location, state: str, **extra: Any) -> None:
    """Set the trunk's status (the sweep driver does, around the trunk's run)."""
    (location(folder) / STATUS_FILE).write_json({"state": state, **extra})


def snapshots(history: Sequence[dict[str, Any]], families: Sequence[str] = MODULE_FAMILIES) -> list[Snapshot]:
    """Algorithm 1's per-epoch input from history records: per-layer norms of `families`, and the loss."""
    out = []
    for record in history:
        norms = {}
        for fam in families:
            prefix = f"{M.LAYER_NORM_PREFIX}{fam}/"
            layers = sorted((int(k[len(prefix) :]), v) for k, v in record.items() if k.startswith(prefix))
            if not layers:
                raise ValueError(f"the trunk's epoch {record.get(M.EPOCH)} has no per-layer norms of family {fam!r}")
            norms[fam] = [float(v) for _, v in layers]
        out.append((norms, float(record[M.TRAIN_LOSS])))
    return out


@dataclass(frozen=True, kw_only=True)
class TrunkFork:
    """Where a trial starts in a fork-from-trunk sweep, given the trunk's records so far (`Strategy.trunk_fork`).

    `mode` fork: from the trunk's checkpoint at or before `until` (the trial's epochs before it are the trunk's),
    switching at `switch` where that is known before training (replayed on the trunk's history); trunk: its
    result is the trunk's; scratch: it trains whole. `why`: the reason of trunk and scratch, for the log line.
    """

    mode: str
    until: int = -1
    switch: SwitchPoint | None = None
    why: str = ""


@dataclass(frozen=True, kw_only=True)
class ForkPlan:
    """What a trial does: fork at `fork_epoch` (switching at `switch.epoch` when known), take the trunk's result, or
    train whole (`mode`: fork, trunk, scratch; see `TrunkFork`)."""

    switch: SwitchPoint | None
    fork_epoch: int = -1  # the trunk checkpoint it starts from (epochs already trained; at most switch + 1)
    checkpoint: str = ""
    mode: str = ""  # "" (from the fields): trunk when switch is None, else fork
    why: str = ""

    def __post_init__(self) -> None:
        if not self.mode:
            object.__setattr__(self, "mode", "trunk" if self.switch is None else "fork")

    @property
    def never(self) -> bool:
        """The trial's result is the trunk's (the test never passes on the whole trunk, or a `full` trial)."""
        return self.mode == "trunk"


def replay_for(cfg: TrainSettings, history: Sequence[dict[str, Any]]) -> SwitchPoint | None:
    """Algorithm 1 and 2 with the trial's settings on the trunk's history."""
    p = cfg.prelora
    return replay_switch(
        snapshots(history, p.modules),
        tau=p.tau,
        zeta=p.zeta,
        k=p.k,
        m=p.m,
        r_min=p.r_min,
        r_max=p.r_max,
        window_stat=p.window_stat,
        min_switch_epoch=p.min_switch_epoch,
        tie_rank=p.tie_rank,
        zero_rank_below=p.zero_rank_below,
        switch_at_epoch=p.switch_at_epoch,
    )


def plan_fork(cfg: TrainSettings, folder: str | Path) -> ForkPlan | None:
    """The trial's plan from what the trunk has written so far; None: wait for more trunk epochs.

    The trial's strategy says where it may start (`Strategy.trunk_fork`): prelora at its switch epoch
    replayed on the history ("never" once the trunk has recorded every epoch without a pass),
    relora_prelora at relora.start_epoch, full at the trunk's end. The checkpoint is the latest at or
    before that point; one whose point is known in advance (no switch to replay) waits until the trunk
    is past it, so it takes the checkpoint written there.
    """
    history = read_history(folder)
    point = cfg.strategy_class().trunk_fork(cfg, history)
    if point is None:
        return None
    if point.mode != "fork":
        return ForkPlan(switch=None, mode=point.mode, why=point.why)
    ready = point.switch is not None or len(history) > point.until or len(history) >= cfg.epochs
    usable = [
        c for c in checkpoint_epochs(folder) if c <= point.until
    ]  # prelora: c = s + 1, switch right after loading
    if not ready or not usable:
        return None
    return ForkPlan(
        switch=point.switch, mode="fork", fork_epoch=usable[-1], checkpoint=checkpoint_path(folder, usable[-1]).uri
    )


def summarize(
    history: Sequence[dict[str, Any]], *, switch_epoch: int = -1, freeze_epoch: int = -1, ranks: dict | None = None
) -> RunSummary:
    """A run's summary from its per-epoch history: mean epoch time, final and best accuracy, total time, and the
    speed-up against full training (`speedup.run_speedup`)."""
    times = [float(e[M.EPOCH_TIME_S]) for e in history]
    out: RunSummary = {
        M.MEAN_EPOCH_TIME_S: sum(times) / len(times) if times else float("nan"),
        **run_speedup(history),
        M.FINAL_VAL_ACC: float(history[-1][M.VAL_ACC]) if history else float("nan"),
        M.BEST_VAL_ACC: max(float(e[M.VAL_ACC]) for e in history) if history else float("nan"),
        M.TOTAL_TRAIN_TIME_S: sum(times),
        M.SWITCH_EPOCH: switch_epoch,
        M.FREEZE_EPOCH: freeze_epoch,
        M.RANKS: ranks or {},
    }
    if history and M.VAL_HITS in history[-1]:  # records written before per-image correctness have none
        out.update({k: history[-1][k] for k in (M.VAL_N, M.VAL_CORRECT, M.VAL_HITS)})
    return out


def repeat_fork_epoch(cfg: TrainSettings, every: int) -> int:
    """The trunk checkpoint the baseline's repeats fork from (`repeats:`): the last one at or before epoch k*m of
    `cfg`'s windows, the first epoch a PreLoRA trial can fork at (its earliest switch is k*m - 1), and at most
    epochs - 1. Every trial with these windows forks there or later, so the baseline's repeats train at least as many
    epochs after their fork, with their own seeds, as any trial's."""
    first = max(0, min(cfg.prelora.k * cfg.prelora.m, cfg.epochs - 1))
    return first - first % every


def reuse_key(cfg: TrainSettings, switch: SwitchPoint | None) -> str:
    """Identifies what a forked trial computes after its switch: two trials with the same key give the same result.

    With the switch replayed in advance, the keys that only decide where it lands (its strategy's
    `switch_decision_keys`, e.g. prelora's thresholds and windows) do not count, the switch itself does. With
    no switch known in advance (relora_prelora decides it while training) every key that changes the run counts.
    """
    if switch is None:
        blob: dict[str, Any] = {"config": {k: v for k, v in cfg.flat().items() if k not in RUN_IDENTITY_KEYS}}
    else:
        deciding = set(cfg.strategy_class().switch_decision_keys)
        flat = {k: v for k, v in cfg.flat().items() if k not in deciding and k not in RUN_IDENTITY_KEYS}
        blob = {"switch_epoch": switch.epoch, "ranks": switch.ranks, "config": flat}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ResultRegistry:
    """Forked trials' results by reuse key: the first trial with a key trains, later ones reuse its result.

    `<folder>/<key>.json` holds {"owner", "state": claimed|finished|failed, ...}; the claim is an exclusive
    create (on an object store a write and a read-back, see `prelora_ray.storage`), so two trials started at
    once do not both train the same thing.
    """

    def __init__(self, folder: str | Path | Location) -> None:
        self.folder = location(folder)

    def _path(self, key: str) -> Location:
        return self.folder / f"{key}.json"

    def claim(self, key: str, owner: str) -> dict[str, Any] | None:
        """None: `owner` holds the key now (new, or its own claim from before a restart). Else the record of who
        does."""
        mine = json.dumps({"owner": owner, "state": "claimed"})
        if self._path(key).create_exclusive(mine.encode()):
            return None
        record = self.read(key)
        if record is None or record.get("owner") == owner or record.get("state") == "failed":
            self._path(key).write_text(mine)
            return None
        return record

    def beat(self, key: str, owner: str, beat: int) -> None:
        """The owner is alive and still training: its claim with a new beat count (a waiter that sees the count stop
        changing for long takes the key over: `orchestration.forking.CLAIM_STALE_S`)."""
        self._path(key).write_json({"owner": owner, "state": "claimed", "beat": beat})

    def take_over(self, key: str, owner: str) -> None:
        """Claim a key whose owner stopped beating (its process died without a word, e.g. a trial lost to a killed
        sweep)."""
        self._path(key).write_json(
            {"owner": owner, "state": "claimed", "taken_from": (self.read(key) or {}).get("owner")}
        )

    def read(self, key: str) -> dict[str, Any] | None:
        """The key's record, or None (none yet, or being replaced at this instant)."""
        try:
            return self._path(key).read_json()
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def finish(self, key: str, owner: str, **result: Any) -> None:
        """The owner's result: what a later trial with the same key reuses."""
        self._path(key).write_json({"owner": owner, "state": "finished", **result})

    def fail(self, key: str, owner: str, error: str) -> None:
        """The owner failed: a trial waiting on the key trains it itself."""
        self._path(key).write_json({"owner": owner, "state": "failed", "error": error})
