"""The Ray Train worker: a `Runtime` over ray.train and torch.distributed, and the per-worker entry point."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from prelora_ray.checkpoint import CheckpointError, load_state_file
from prelora_ray.config import TrainSettings
from prelora_ray.orchestration.ray_hooks import apply_console
from prelora_ray.orchestration.worker_spec import ForkFrom, TrunkRecords, WorkerSpec
from prelora_ray.storage import Location, location
from prelora_ray.summary import RunSummary
from prelora_ray.trainer import TrainingLoop

CHECKPOINT_FILE = "state.pt"
WORKER_KEY = "worker"  # a state's per-worker part (TrainingLoop.state_dict), kept in WORKER_FILE by each worker
WORKER_FILE = "worker_rank{rank}.pt"
log = logging.getLogger("prelora_ray")


def load_checkpoint_dir(path: str | Path, *, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint folder written by RayRuntime.report: plain data only, a CheckpointError naming a bad file.

    The shared state is rank 0's `state.pt`; worker `rank`'s own part, when the run wrote per-worker
    files (LTE heads), comes from `worker_rank<rank>.pt` as the state's "worker" entry.
    """
    state = load_state_file(Path(path) / CHECKPOINT_FILE)
    own = Path(path) / WORKER_FILE.format(rank=rank)
    if own.exists():
        state[WORKER_KEY] = load_state_file(own)
    return state


@contextmanager
def saved_files(files: dict[str, dict[str, Any]]) -> Iterator[str]:
    """A temporary checkpoint folder holding each state under its file name.

    Ray copies it into the run's storage on report.
    """
    with tempfile.TemporaryDirectory() as tmp:
        for name, state in files.items():
            torch.save(state, Path(tmp) / name)
        yield tmp


class RayRuntime:
    """One Ray Train worker: rank and device from Ray, collectives from torch.distributed."""

    def __init__(self, fault: dict[str, str] | None = None) -> None:
        self.fault = fault or {}
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module, *, sync: bool = True) -> nn.Module:
        """Device placement, and DDP when there is more than one worker and `sync`."""
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if sync else None)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over workers (on the device for NCCL, back on the CPU after)."""
        if self.world_size == 1:
            return values
        t = values.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor's mean over workers: flattened into one buffer on the device, one all-reduce."""
        if self.world_size == 1:
            return list(tensors)
        flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(self.world_size)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's object everywhere."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every worker's object in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Every worker reports; rank 0 attaches the shared state, and each worker its own part if it has one.

        Ray Train merges the folders every worker reports into one checkpoint folder, so the files must
        not clash: rank 0 writes `state.pt`, worker r `worker_rank<r>.pt` (LTE heads differ between workers).
        """
        files: dict[str, dict[str, Any]] = {}
        if state is not None:
            state = dict(state)
            own = state.pop(WORKER_KEY, None)
            if self.rank == 0:
                files[CHECKPOINT_FILE] = state
            if own is not None:
                files[WORKER_FILE.format(rank=self.rank)] = own
        if files:
            with saved_files(files) as tmp:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        maybe_inject_fault(int(metrics.get("epoch", -1)), self.rank, self.fault)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The last reported checkpoint (after a worker restart, or a re-run with the same name).

        A corrupt or truncated one is reported by file name and the previous checkpoint of the run
        (a sibling `checkpoint_*` folder) is used instead; only when none is readable does it fail.
        """
        return _load_checkpoint(ray.train.get_checkpoint(), rank=self.rank)


def _load_checkpoint(ckpt: Any, *, rank: int = 0) -> dict[str, Any] | None:
    if ckpt is None:
        return None
    with ckpt.as_directory() as folder:
        try:
            return load_checkpoint_dir(folder, rank=rank)
        except CheckpointError as exc:
            log.warning("%s; trying the run's previous checkpoints", exc)
            error = exc
    return _previous_ray_checkpoint(ckpt, error, rank=rank)


def _previous_ray_checkpoint(bad: Any, error: CheckpointError, *, rank: int = 0) -> dict[str, Any]:
    """The newest readable Ray checkpoint beside `bad`.

    Read through the checkpoint's own filesystem (local or a bucket).
    """
    import posixpath

    import pyarrow.fs as pafs

    fs, parent, name = bad.filesystem, posixpath.dirname(bad.path.rstrip("/")), posixpath.basename(bad.path.rstrip("/"))
    infos = fs.get_file_info(pafs.FileSelector(parent, recursive=False, allow_not_found=True))
    siblings = sorted(
        (
            i.path
            for i in infos
            if i.type == pafs.FileType.Directory
            and posixpath.basename(i.path).startswith("checkpoint_")
            and posixpath.basename(i.path) < name
        ),
        reverse=True,
    )
    return _first_readable(
        [(p, ray.train.Checkpoint(path=p, filesystem=fs).as_directory) for p in siblings], error, rank=rank
    )


def load_previous_checkpoint(bad: Location, error: CheckpointError, *, rank: int = 0) -> dict[str, Any]:
    """The newest complete, readable checkpoint folder beside `bad` (names sort by time), or raise `error`."""
    siblings = sorted(
        (c for c in bad.parent.children() if c.name.startswith("checkpoint_") and c.name < bad.name),
        key=lambda c: c.name,
        reverse=True,
    )
    return _first_readable([(c.uri, c.fetched_folder) for c in siblings if c.folder_complete()], error, rank=rank)


def _first_readable(candidates: list[tuple[str, Any]], error: CheckpointError, *, rank: int) -> dict[str, Any]:
    """The state of the first candidate that reads, or raise `error`.

    A candidate is (name, a context manager giving its local folder).
    """
    for name, fetch in candidates:
        try:
            with fetch() as folder:
                state = load_checkpoint_dir(folder, rank=rank)
        except CheckpointError as exc:
            log.warning("%s", exc)
            continue
        log.warning("resuming from the previous checkpoint %s", name)
        return state
    raise error


FAULT_EPOCH_ENV = "PRELORA_FAULT_EPOCH"
FAULT_MARKER_ENV = "PRELORA_FAULT_MARKER"
FAULT_MODE_ENV = "PRELORA_FAULT_MODE"
FAULT_BATCH_ENV = "PRELORA_FAULT_BATCH"
# only runs whose name contains this (e.g. _baseline: the trunk); "!text": only those without it
FAULT_RUN_ENV = "PRELORA_FAULT_RUN"


def fault_from_env() -> dict[str, str]:
    """The driver's PRELORA_FAULT_* variables (forwarded to the workers in the loop config)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k in (FAULT_EPOCH_ENV, FAULT_MARKER_ENV, FAULT_MODE_ENV, FAULT_BATCH_ENV, FAULT_RUN_ENV)
    }


def maybe_inject_fault(epoch: int, rank: int, fault: dict[str, str], *, batch: int | None = None) -> None:
    """Fault injection for the reliability tests, off unless PRELORA_FAULT_EPOCH was set on the driver.

    Rank 0 dies once (`exit`: os._exit(1), as a killed process; `raise`: an exception) after
    reporting epoch PRELORA_FAULT_EPOCH, or, with PRELORA_FAULT_BATCH=B, in the middle of that epoch
    before its batch B. The marker file PRELORA_FAULT_MARKER makes it fire only once, so the
    restarted or re-run worker goes on.
    """
    target, marker = fault.get(FAULT_EPOCH_ENV), fault.get(FAULT_MARKER_ENV)
    if target is None or rank != 0 or epoch != int(target) or not marker or Path(marker).exists():
        return
    wanted = fault.get(FAULT_BATCH_ENV)
    if (wanted is None) != (batch is None) or (wanted is not None and int(wanted) != batch):
        return
    Path(marker).write_text(f"fault injected in epoch {epoch}, batch {batch}\n")
    if fault.get(FAULT_MODE_ENV, "exit") == "raise":
        raise RuntimeError(f"injected fault in epoch {epoch}")
    os._exit(1)


class FaultyLoader:
    """A train loader that calls maybe_inject_fault before each batch (mid-epoch faults in tests)."""

    def __init__(self, loop: TrainingLoop, fault: dict[str, str], rank: int) -> None:
        self.loop, self.loader, self.fault, self.rank = loop, loop.train_loader, fault, rank

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            maybe_inject_fault(self.loop.state.epoch, self.rank, self.fault, batch=i)
            yield batch


def return_freed_memory_to_os(threshold_bytes: int = 128 * 1024) -> bool:
    """Have glibc serve large blocks with mmap, so what a phase frees goes back to the OS.

    Without it, the CPU process keeps the heap high-water mark of the WARMUP phase and the LoRA
    phase shows a higher peak RSS than full training (benchmarks/memory.py: 1.29x -> 0.9x on ViT-S).
    The price is an mmap and page faults for every large tensor: steps were ~40% slower on the
    digits ViT (benchmarks/ray_overhead.py), so it is the opt-in `cluster.release_memory`.
    Same effect as MALLOC_MMAP_THRESHOLD_=131072; a no-op where glibc is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, threshold_bytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def start_arguments(start: TrunkRecords | ForkFrom | None) -> dict[str, Any]:
    """The loop's arguments for where the run starts: the trunk's writer (a sweep's trunk) or a fork's start."""
    from prelora_ray import fork

    if isinstance(start, TrunkRecords):
        return {"trunk": fork.TrunkWriter(start.folder, start.every)}
    if isinstance(start, ForkFrom):
        from prelora_ray.trainer import ForkStart

        history = fork.read_history(location(start.folder))
        state = load_state_file(location(start.checkpoint))
        return {"fork": ForkStart(state=state, snapshots=fork.snapshots(history[: start.epoch]), reseed=start.reseed)}
    return {}


def train_worker(config: dict[str, Any]) -> RunSummary:
    """`train_loop_per_worker` of the TorchTrainer (its config: {"spec": WorkerSpec}): build the loop, run it,
    export."""
    spec: WorkerSpec = config["spec"]
    cfg = TrainSettings.from_dict(spec.settings)
    return run_loop(spec, cfg, RayRuntime(run_fault(spec, cfg)))


def run_fault(spec: WorkerSpec, cfg: TrainSettings) -> dict[str, str]:
    """The driver's fault, if it selects this run (PRELORA_FAULT_RUN)."""
    fault = dict(spec.fault)
    wanted = fault.get(FAULT_RUN_ENV)
    if wanted and (wanted[1:] in (cfg.name or "") if wanted.startswith("!") else wanted not in (cfg.name or "")):
        fault = {}
    return fault


def run_loop(spec: WorkerSpec, cfg: TrainSettings, runtime: Any) -> RunSummary:
    """One worker's whole run (a Ray Train worker, or a trial's own process: TuneRuntime): loop, export, summary."""
    apply_console(
        verbose=spec.verbose, progress=spec.progress
    )  # our epoch lines, Ray Train's dumps: the driver decides
    threads = cfg.cluster.torch_threads or max(1, math.ceil(cfg.cluster.cpus_per_worker))
    torch.set_num_threads(threads)
    if runtime.device.type == "cpu" and cfg.cluster.release_memory:
        return_freed_memory_to_os()
    sink = None
    if spec.mlflow_run_id and runtime.rank == 0:
        from prelora_ray import metrics as M
        from prelora_ray.tracking import MlflowSink, last_step

        # a restarted or re-run worker re-trains the epochs after its last checkpoint; what an earlier
        # attempt already logged stays, once (deterministic runs log the same values again anyway)
        logged = last_step(spec.mlflow_uri, spec.mlflow_run_id, M.VAL_ACC)
        sink = MlflowSink(spec.mlflow_uri, spec.mlflow_run_id, logged_through=logged)
    loop = TrainingLoop(cfg, runtime, sink, **start_arguments(spec.start))
    if runtime.fault.get(FAULT_BATCH_ENV) is not None:
        loop.train_loader = FaultyLoader(loop, runtime.fault, runtime.rank)
    summary = loop.run()
    summary["history"] = loop.state.history
    summary["decisions"] = loop.strategy.decisions
    summary["worker_rank"] = runtime.rank
    if sink is not None:
        summary["unsent_metrics"] = len(sink.flush())
    if runtime.rank == 0 and spec.export_dir:
        summary["merged_model_path"] = export_merged(loop, location(spec.export_dir))
    if runtime.world_size > 1:
        # every worker's view of the switch, so the driver can check they agree
        summary["all_workers"] = runtime.all_gather_object(
            {
                "rank": runtime.rank,
                **{k: summary[k] for k in ("switch_epoch", "freeze_epoch", "ranks")},
                "sync_checks": loop.strategy.sync_checks(),
            }
        )
        if runtime.rank == 0 and any(
            w["sync_checks"] != summary["all_workers"][0]["sync_checks"] for w in summary["all_workers"]
        ):
            log.warning(
                "workers' weights differed at a sync point (%s): %s",
                loop.strategy.name,
                [w["sync_checks"] for w in summary["all_workers"]],
            )
    return summary


def export_merged(loop: TrainingLoop, target: Location) -> str:
    """The merged model (a plain ViT, save_pretrained) at `target`: written in place on a local path, else saved
    to a temporary folder and uploaded as one folder (MANIFEST.json last). Returns where it is."""
    if target.is_local:
        return str(loop.export_merged(target.local))
    with tempfile.TemporaryDirectory(prefix="prelora-export-") as tmp:
        loop.export_merged(tmp)
        target.put_folder(tmp)
    return target.uri


class TuneRuntime(RayRuntime):
    """A single-worker run inside its Ray Tune trial's own process (`trial_executor: tune`): no Train workers.

    Reports and checkpoints go to Ray Tune (`tune.report`, `tune.get_checkpoint`), which retries a
    failed trial from its last checkpoint; the device is the trial's GPU if it was given one.
    """

    def __init__(self, fault: dict[str, str] | None = None) -> None:  # not RayRuntime's: no Ray Train context here
        self.fault = fault or {}
        self.rank, self.world_size = 0, 1
        gpus = ray.get_gpu_ids()
        self.device = torch.device("cuda", 0) if gpus and torch.cuda.is_available() else torch.device("cpu")

    def prepare_model(self, model: nn.Module, *, sync: bool = True) -> nn.Module:
        """On the trial's device (one worker: no DDP)."""
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """The epoch's metrics (and checkpoint) to Ray Tune."""
        from ray import tune

        if state is not None:
            with saved_files({CHECKPOINT_FILE: state}) as tmp:
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(metrics)
        maybe_inject_fault(int(metrics.get("epoch", -1)), self.rank, self.fault)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The trial's last checkpoint, after Ray Tune retried it (or --resume restored it)."""
        from ray import tune

        return _load_checkpoint(tune.get_checkpoint())


class FolderRuntime(TuneRuntime):
    """A single-worker run in a plain Ray task (`trial_executor: tune`'s trunk and baseline): no Train workers, no Tune.

    Checkpoints are folders `checkpoint_<epoch>` under `folder` (a storage location: a local path or a bucket),
    the newest `keep` kept, each written as one unit (`Location.put_folder`: renamed when complete on a disk,
    MANIFEST.json last on an object store); a re-run of the task (a retry after its process died, or the
    sweep's --resume) resumes from the newest complete, readable one.
    """

    def __init__(self, folder: str | Path | Location, keep: int, fault: dict[str, str] | None = None) -> None:
        super().__init__(fault)
        self.folder, self.keep = location(folder), keep

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Write the checkpoint folder, drop the oldest."""
        if state is not None:
            final = self.folder / f"checkpoint_{int(metrics.get('epoch', -1)):06d}"
            with saved_files({CHECKPOINT_FILE: state}) as tmp:
                final.put_folder(tmp)
            for old in self._checkpoints()[: -self.keep]:
                old.delete_tree()
        maybe_inject_fault(int(metrics.get("epoch", -1)), self.rank, self.fault)

    def _checkpoints(self) -> list[Location]:
        return [c for c in self.folder.children() if c.name.startswith("checkpoint_") and c.folder_complete()]

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The newest checkpoint folder's state (an unreadable one is reported and the one before it used)."""
        found = self._checkpoints()
        if not found:
            return None
        try:
            with found[-1].fetched_folder() as local:
                return load_checkpoint_dir(local)
        except CheckpointError as exc:
            log.warning("%s; trying the run's previous checkpoints", exc)
            return load_previous_checkpoint(found[-1], exc)


def run_in_trial(spec: WorkerSpec, *, checkpoint_dir: str | Path | Location | None = None) -> RunSummary:
    """`trial_executor: tune`: the same loop as a Ray Train worker, in the calling process: a Tune trial's (reports
    and checkpoints to Ray Tune) or, with `checkpoint_dir`, a plain Ray task's (checkpoints in that folder)."""
    cfg = TrainSettings.from_dict(spec.settings)
    if cfg.cluster.num_workers != 1:
        raise ValueError(
            f"trial_executor tune runs one worker per trial, got cluster.num_workers={cfg.cluster.num_workers}: "
            "use trial_executor ray_train"
        )
    fault = run_fault(spec, cfg)
    if checkpoint_dir is not None:
        return run_loop(spec, cfg, FolderRuntime(checkpoint_dir, cfg.cluster.checkpoints_to_keep, fault))
    return run_loop(spec, cfg, TuneRuntime(fault))
