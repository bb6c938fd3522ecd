"""The training loop; what changes phase (switch, freeze) is the strategy's (`prelora_ray.strategies`).

Reads top to bottom: for each epoch, train (strategy.after_step after each step, after_train_pass
at the end), evaluate, strategy.after_epoch, report with a checkpoint. Ray-free: the surroundings
come in as a `Runtime` and a `MetricsSink`. It names no strategy and no phase but FULL (every run's
first): the rest is the strategy's, through its hooks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from prelora_ray import metrics as M
from prelora_ray.adapters.model import unwrap
from prelora_ray.adapters.names import is_adapter_param
from prelora_ray.calibration import Calibration
from prelora_ray.config import TrainSettings
from prelora_ray.data import DatasetBundle, build_datasets, make_train_loader, resolve_loader_workers
from prelora_ray.fork import TrunkWriter, summarize
from prelora_ray.models import build_model, family_module_names
from prelora_ray.monitor import layer_norms
from prelora_ray.runtime import LocalRuntime, MetricsSink, NullSink, Runtime
from prelora_ray.significance import pack_hits
from prelora_ray.strategies import build as build_strategy
from prelora_ray.strategies.phases import FULL, Phase
from prelora_ray.summary import RunSummary

log = logging.getLogger("prelora_ray")


@dataclass(kw_only=True)
class LoopState:
    """The run's progress that every strategy shares (the strategy checkpoints its own beside it)."""

    epoch: int = 0  # next epoch to run
    step: int = 0  # optimizer steps taken
    phase: Phase = FULL  # set by the strategy
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per epoch
    resumed_at: list[int] = field(default_factory=list)  # epochs at which the run resumed from a checkpoint
    forked_from: int = -1  # the trunk epoch this run started from (fork-from-trunk sweeps), -1: none


@dataclass(kw_only=True)
class ForkStart:
    """Where a forked run starts: a trunk checkpoint and the trunk's per-epoch snapshots before it.

    `reseed` (a repeat of a forked segment, `repeats:`): after the trunk's state loads, python's, numpy's and
    torch's RNGs are seeded from the run's own `seed` instead of continuing the trunk's streams, so augmentation,
    dropout and the loaders' worker seeds after the fork are the repeat's own, as its data order (the sampler's seed)
    and its adapters' initial A (from the seed) are."""

    state: dict[str, Any]
    snapshots: list[tuple[dict[str, list[float]], float]]
    reseed: bool = False


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; optionally make torch deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    """All RNG states (for an exact resume), as tensors and plain types only.

    Plain data so that a checkpoint loads with torch.load(weights_only=True): numpy's key array
    becomes an int64 tensor (a pickled ndarray would need the full unpickler).
    """
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {
        "bit_generator": str(name),
        "key": torch.from_numpy(key.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated since the last reset on GPU; the process's peak RSS on CPU (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainingLoop:
    """One training run on one worker, of the strategy `cfg.strategy` names."""

    def __init__(
        self,
        cfg: TrainSettings,
        runtime: Runtime,
        sink: MetricsSink | None = None,
        *,
        data: DatasetBundle | None = None,
        trunk: TrunkWriter | None = None,
        fork: ForkStart | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock`: the training pass's wall clock (default `time.perf_counter`), which then times calibration's
        steps too (`calibration.step_timer` otherwise): a test gives its own."""
        self.cfg = cfg
        self.trunk = trunk if runtime.rank == 0 else None
        self.fork = fork
        self.runtime = runtime
        self.sink = sink if sink is not None and runtime.rank == 0 else NullSink()
        self.device = runtime.device
        seed_everything(cfg.seed, cfg.deterministic)
        self.data = data or build_datasets(cfg.data)
        self.model: nn.Module = build_model(
            cfg.model,
            num_classes=self.data.num_classes,
            image_size=self.data.image_size,
            num_channels=self.data.num_channels,
        )
        self.plain_params = sum(p.numel() for p in self.model.parameters())
        self.family_names = family_module_names(self.model, cfg.prelora.modules)
        self.state = LoopState()
        self.strategy = build_strategy(cfg)
        self.train_loader, self.sampler = self._train_loader()
        self.val_loader = self._val_loader()
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer: torch.optim.Optimizer | None = None
        self.wrapped: nn.Module = self.model
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.autocast = self.device.type == "cuda" and cfg.amp
        self.comm_bytes = 0  # bytes all-reduced by this worker in the current epoch (M.COMM_BYTES_PER_STEP)
        self._epoch_steps = 0
        self.val_hits: np.ndarray = np.zeros(0, dtype=bool)  # the last evaluation's, per image
        self._ddp_bytes_per_step = 0  # DDP's gradient all-reduce: the trainable parameters' bytes
        self.clock = clock or time.perf_counter
        self.calibration = Calibration(cfg.calibration, self.device, self.clock, timer=clock)

    # -- data ------------------------------------------------------------------------------------
    def _train_loader(self) -> tuple[DataLoader, DistributedSampler]:
        return make_train_loader(
            self.data.train,
            self.cfg.data,
            self.device,
            world_size=self.runtime.world_size,
            rank=self.runtime.rank,
            seed=self.cfg.seed,
            chunks=self.strategy.batch_chunks(self.runtime.world_size),
        )

    def _val_loader(self) -> DataLoader:
        # every validation image exactly once over all workers (no sampler padding)
        shard = Subset(self.data.val, list(range(self.runtime.rank, len(self.data.val), self.runtime.world_size)))
        workers = resolve_loader_workers(self.cfg.data, self.device)
        return DataLoader(shard, batch_size=max(self.cfg.data.batch_size, 256), num_workers=workers)

    # -- model, optimizer --------------------------------------------------------------------------
    def _param_groups(self, *, every: bool = False) -> list[dict[str, Any]]:
        """The optimizer's groups of the trainable parameters (`every`: of all of them, trainable or not)."""
        o = self.cfg.optim
        decay, no_decay, lora = [], [], []
        for name, param in self.model.named_parameters():
            if not (param.requires_grad or every):
                continue
            if is_adapter_param(name):
                lora.append(param)
            elif param.ndim >= 2:
                decay.append(param)
            else:
                no_decay.append(param)
        groups = [
            {"params": decay, "weight_decay": o.weight_decay, "peak_lr": o.lr},
            {"params": no_decay, "weight_decay": 0.0, "peak_lr": o.lr},
            {"params": lora, "weight_decay": o.weight_decay, "peak_lr": o.lora_lr or o.lr},
        ]
        return [g for g in groups if g["params"]]

    def rebuild(self) -> None:
        """New DDP wrapper and optimizer after requires_grad changed (DDP would fail otherwise).

        With carry_optimizer_state, AdamW moments of parameters that keep training survive; those of
        frozen parameters are dropped (freed) with the old optimizer.
        """
        old = self.optimizer
        if self.strategy.sync_gradients(self.state.phase):
            self.wrapped = self.runtime.prepare_model(self.model)
        else:
            self.wrapped = self.runtime.prepare_model(self.model, sync=False)
        self.model = unwrap(self.wrapped)
        ddp = isinstance(self.wrapped, DistributedDataParallel) and self.runtime.world_size > 1
        self._ddp_bytes_per_step = (
            sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad) if ddp else 0
        )
        o = self.cfg.optim
        self.optimizer = self.new_optimizer(self._param_groups())
        if old is not None and o.carry_optimizer_state:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p in old.state:
                        self.optimizer.state[p] = old.state[p]
        del old

    def new_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The loop's optimizer over `groups` (AdamW, fused on CUDA)."""
        o = self.cfg.optim
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, fused=self.device.type == "cuda" or None)

    def _set_lr(self) -> float:
        """Set each group's LR for the next step from the strategy's schedule; returns the base LR."""
        factor = self.strategy.lr_factor(self, self.state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        return self.cfg.optim.lr * factor

    # -- collectives, counted for M.COMM_BYTES_PER_STEP ------------------------------------------------
    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The runtime's all-reduce sum, its bytes counted (when there is more than one worker)."""
        if self.runtime.world_size > 1:
            self.comm_bytes += values.numel() * values.element_size()
        return self.runtime.all_reduce_sum(values)

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The runtime's one-collective mean of `tensors` over workers, its bytes counted (more than one worker)."""
        if self.runtime.world_size > 1:
            self.comm_bytes += sum(t.numel() * t.element_size() for t in tensors)
        return self.runtime.all_reduce_mean(tensors)

    def norms(self) -> dict[str, list[float]]:
        """Family -> per-layer norms of the effective weights (W, or W + s·B·A with adapters)."""
        return layer_norms(self.model, self.family_names)

    # -- epochs ------------------------------------------------------------------------------------
    def train_one_epoch(self) -> dict[str, float]:
        """One pass over this worker's shard; returns the all-worker mean loss, the timing and the speed-up.

        In an epoch whose phase is not FULL, calibration rounds run before some of its steps, on their batches
        (`prelora_ray.calibration`): their time is not in the epoch's.
        """
        self.wrapped.train()
        self.sampler.set_epoch(self.state.epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        per_step = self.strategy.step_losses
        self.comm_bytes, self._epoch_steps = 0, 0
        loss_sum, count = torch.zeros((), dtype=torch.float64), 0
        phase = self.state.phase
        rounds = self.calibration.plan(phase, self.state.history, self.steps_per_epoch)
        self.calibration.start_epoch()
        ratios, calibrating = [], 0.0
        start = self.clock()
        for index, (images, labels) in enumerate(self.train_loader):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if index in rounds and self.state.phase is phase:
                measured, spent = self.calibration.measure(self, images, labels, rounds[index])
                ratios += measured
                calibrating += spent
            lr = self._set_lr()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss_fn(self.wrapped(pixel_values=images).logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            scale = self.strategy.loss_scale(self.state.phase)
            (loss if scale == 1.0 else loss * scale).backward()
            self.comm_bytes += self._ddp_bytes_per_step
            if self.cfg.optim.grad_clip is not None:
                self.strategy.clip_gradients(self, self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.state.step += 1
            self._epoch_steps += 1
            batch_loss = loss.detach().double() * labels.numel()
            loss_sum += batch_loss.cpu()
            count += labels.numel()
            step_loss = None
            if per_step:
                step_sum = self.all_reduce_sum(
                    torch.stack([batch_loss.cpu(), torch.tensor(float(labels.numel()), dtype=torch.float64)])
                )
                step_loss = float(step_sum[0] / step_sum[1])
            self.strategy.after_step(self, step_loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        epoch_time = self.clock() - start - calibrating
        total = self.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64)]))
        train_loss = float(total[0] / total[1])
        if not math.isfinite(train_loss):  # every worker sees the same all-reduced value: all stop together
            raise FloatingPointError(
                f"epoch {self.state.epoch}: training loss is {train_loss} (diverged: lower optim.lr?)"
            )
        self.strategy.after_train_pass(self, train_loss)  # may switch phase (epoch windows)
        return {
            M.TRAIN_LOSS: train_loss,
            M.EPOCH_TIME_S: epoch_time,
            M.THROUGHPUT: float(total[1]) / epoch_time,
            M.LR: lr,
            **self.calibration.epoch_metrics(phase, self.state.history, ratios, calibrating),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Top-1 accuracy and loss over the whole validation set (all workers' shards).

        Also keeps which images were right (`val_hits`: the whole set's, in its order, on every worker), so a
        front can compare two runs image by image (prelora_ray/significance.py).
        """
        self.wrapped.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        hits = []
        for images, labels in self.val_loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.wrapped(pixel_values=images).logits.float()
            right = logits.argmax(-1) == labels
            hits.append(right.cpu())
            sums += torch.tensor(
                [
                    float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
                    float(right.sum()),
                    labels.numel(),
                ],
                dtype=torch.float64,
            )
        sums = self.all_reduce_sum(sums)
        self.val_hits = self._whole_set(torch.cat(hits).numpy() if hits else np.zeros(0, dtype=bool))
        return {
            M.VAL_LOSS: float(sums[0] / sums[2]),
            M.VAL_ACC: float(sums[1] / sums[2]),
            M.VAL_N: int(sums[2]),
            M.VAL_CORRECT: int(sums[1]),
        }

    def _whole_set(self, shard_hits: np.ndarray) -> np.ndarray:
        """Every worker's hits put back in the validation set's order (worker r scored images r, r + W, ...)."""
        world = self.runtime.world_size
        if world == 1:
            return shard_hits
        out = np.zeros(len(self.data.val), dtype=bool)
        for rank, part in enumerate(self.runtime.all_gather_object(shard_hits)):
            out[rank::world] = part
        return out

    def _trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def trainable_text(self) -> str:
        """Trainable parameters, as a count and a percentage of the plain ViT's."""
        n = self._trainable()
        return f"{n:,} trainable parameters ({100 * n / self.plain_params:.2f}% of {self.plain_params:,})"

    def _epoch_metrics(
        self, epoch: int, phase: Phase, trainable: int, train: dict[str, float], val: dict[str, float]
    ) -> dict[str, Any]:
        norms = self.norms()
        out: dict[str, Any] = {M.EPOCH: epoch, M.PHASE: phase.value, M.PHASE_INDEX: phase.index, **train, **val}
        out[M.TRAINABLE_PARAMS] = trainable
        out[M.TRAINABLE_FRACTION] = trainable / self.plain_params
        out[M.PEAK_MEM_MB] = self.calibration.peak_mb(peak_memory_mb(self.device))
        out[M.COMM_BYTES_PER_STEP] = self.comm_bytes / max(1, self._epoch_steps)
        out.update(self.strategy.event_metrics())
        for family, values in norms.items():
            out[f"{M.NORM_PREFIX}{family}"] = sum(values) / len(values)
            for layer, value in enumerate(values):
                out[f"{M.LAYER_NORM_PREFIX}{family}/{layer}"] = value
        return out

    def summary(self) -> RunSummary:
        """Run summary over the history (a fork's includes the trunk's epochs before the fork)."""
        s = self.state
        out = summarize(s.history, **self.strategy.summary())
        out["resumed_at"] = list(s.resumed_at)
        out["forked_from"] = s.forked_from
        out["epochs_trained"] = sum(1 for e in s.history if e[M.EPOCH] >= max(s.forked_from, 0))
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: weights (PEFT keys after the switch), optimizer, progress, the strategy's state, RNG."""
        s = self.state
        state = {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "loop": {**s.__dict__, "phase": s.phase.value},
            "strategy": self.strategy.state_dict(),
            "rng": rng_state(),
        }
        worker = self.strategy.worker_state(self)
        if worker is not None:  # the runtime keeps every worker's (RayRuntime: one file per worker)
            state["worker"] = worker
        return state

    def load_state_dict(self, ckpt: dict[str, Any], *, strategy_state: dict[str, Any] | None = None) -> None:
        """Restore a checkpoint: the strategy reshapes the model for its phase (e.g. re-injects LoRA) before the
        weights load.

        `strategy_state` replaces the checkpoint's own (a fork starts the strategy afresh from the trunk's history).
        """
        loop, saved = _split_legacy(ckpt)
        loop["phase"] = Phase(loop["phase"])
        self.state = LoopState(**loop)
        self.strategy.load_state_dict(saved if strategy_state is None else strategy_state)
        self.strategy.prepare(self, self.state.phase)
        worker = ckpt.get("worker")
        self.strategy.check_worker_state(self, worker)
        model, optimizer = ckpt["model"], ckpt["optimizer"]
        if worker is not None:  # this worker's own heads and optimizer state (they differ between workers)
            model, optimizer = {**model, **worker["model"]}, worker["optimizer"]
        self.model.load_state_dict(model)
        self.optimizer = None
        self.rebuild()
        self.optimizer.load_state_dict(optimizer)
        set_rng_state(ckpt["rng"])

    def start_from_fork(self, fork: ForkStart) -> None:
        """Go on from a trunk checkpoint (the full-training baseline's state at the start of an epoch).

        Weights, optimizer, RNG, step and the trunk's per-epoch history are the trunk's; the windows
        of Algorithm 1 are rebuilt from the trunk's recorded norms and losses, so the test runs at the
        same epochs with the same input as in a run of this config from scratch.
        """
        loop = fork.state["loop"]
        if Phase(loop["phase"]) is not FULL:
            raise ValueError(
                f"a fork must start from a full-training checkpoint; this one is in phase {loop['phase']!r}"
            )
        start = int(loop["epoch"])
        if len(fork.snapshots) < start:
            raise ValueError(
                f"the trunk's history has {len(fork.snapshots)} epochs, "
                f"the fork needs the {start} before its checkpoint"
            )
        self.load_state_dict(fork.state, strategy_state=self.strategy.fork_state(fork.snapshots, start))
        if fork.reseed:
            seed_everything(self.cfg.seed, self.cfg.deterministic)
        self.state.resumed_at, self.state.forked_from = [], start
        # the trunk's records lack this strategy's own event metrics: their values before any event, as it logs them
        before = self.strategy.event_metrics()
        self.state.history = [{**before, **record} for record in self.state.history]
        if start > 0:
            self._decide_at_end_of(start - 1)

    def _decide_at_end_of(self, epoch: int) -> None:
        """The decisions a live run takes at the end of `epoch`, taken after loading a checkpoint from then.

        Its training loss is in the windows already (None below). A fork from the trunk's checkpoint
        at the end of the switch epoch switches here, and the freeze follows at once when w = 0, as
        in `run()`; that epoch's record then says so.
        """
        self.state.epoch, phase = epoch, self.state.phase
        self.strategy.after_train_pass(self, None)
        self.strategy.after_epoch(self)
        if self.state.phase is not phase:
            self.state.history[-1].update(self.strategy.event_metrics())
        self.state.epoch = epoch + 1

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        """Train from the last checkpoint (or from scratch) to cfg.epochs; returns the summary."""
        ckpt = self.runtime.latest_checkpoint()
        if ckpt is not None:
            self.load_state_dict(ckpt)
            self.state.resumed_at.append(self.state.epoch)
            if self.runtime.rank == 0:
                log.info("resumed at epoch %d (phase %s)", self.state.epoch, self.state.phase.value)
        elif self.fork is not None:
            self.start_from_fork(self.fork)
            if self.runtime.rank == 0:
                log.info("forked from the trunk at epoch %d", self.state.epoch)
        else:
            self.strategy.prepare(self, self.state.phase)
            self.rebuild()
        if self.trunk is not None:
            self.trunk.start(self.state.epoch, self.state_dict)
        for epoch in range(self.state.epoch, self.cfg.epochs):
            phase, trainable = self.state.phase, self._trainable()
            train = self.train_one_epoch()  # the strategy may change phase during it (switch)
            val = self.evaluate()
            self.strategy.after_epoch(self)  # ... and after it (freeze)
            metrics = self._epoch_metrics(epoch, phase, trainable, train, val)
            metrics[M.VAL_HITS] = pack_hits(self.val_hits)  # text: in the history and the report, not in MLflow's
            self.state.history.append(
                {
                    **{k: v for k, v in metrics.items() if not k.startswith(M.LAYER_NORM_PREFIX)},
                    "wall_time": time.time(),
                }
            )
            self.state.epoch = epoch + 1
            snapshot = functools.cache(self.state_dict)  # built at most once per epoch (trunk file and report)
            if self.trunk is not None:  # before the report: the trunk's files are never behind its checkpoints
                self.trunk.after_epoch(epoch, metrics, snapshot)
            self.sink.log_metrics(
                {k: float(v) for k, v in metrics.items() if k not in (M.PHASE, M.EPOCH, M.VAL_HITS)}, step=epoch
            )
            if self.runtime.rank == 0:
                log.info(
                    "epoch %3d | %-6s | loss %.4f | val_loss %.4f | val_acc %.4f | %.2fs | trainable %.2f%%",
                    epoch,
                    phase.value,
                    train[M.TRAIN_LOSS],
                    val[M.VAL_LOSS],
                    val[M.VAL_ACC],
                    train[M.EPOCH_TIME_S],
                    100 * metrics[M.TRAINABLE_FRACTION],
                )
            report = {k: v for k, v in metrics.items() if not k.startswith(M.LAYER_NORM_PREFIX)}
            report.update({k: v for k, v in self.summary().items() if isinstance(v, (int, float))})
            changed = self.state.phase is not phase
            due = (epoch + 1) % self.cfg.cluster.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs or changed
            self.runtime.report(report, snapshot() if due else None)
        return self.summary()

    def export_merged(self, path: str | Path) -> Path:
        """Save the model with its adapters folded in as a plain ViT (`save_pretrained`, loadable by transformers)."""
        path = Path(path)
        merged = self.strategy.export(unwrap(self.wrapped))
        merged.save_pretrained(path)
        self.model = self.wrapped = merged
        return path


def _split_legacy(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The loop's fields and the strategy's state of a checkpoint.

    Checkpoints written before strategies/ (main at 2a433b9 and earlier) kept the switch's fields in
    "loop" and the windows in "monitor": those move to the strategy's state, so they still resume.
    """
    loop = dict(ckpt["loop"])
    if "strategy" in ckpt:
        return loop, ckpt["strategy"]
    own = {f.name for f in dataclasses.fields(LoopState)}
    saved = {k: loop.pop(k) for k in list(loop) if k not in own}
    return loop, {**saved, "monitor": ckpt["monitor"]} if "monitor" in ckpt else saved


def train(
    cfg: TrainSettings,
    runtime: Runtime | None = None,
    sink: MetricsSink | None = None,
    *,
    export_to: str | Path | None = None,
) -> RunSummary:
    """Run one training job in this process (no Ray): the function a user can call from a notebook."""
    runtime = runtime or LocalRuntime()
    loop = TrainingLoop(cfg, runtime, sink)
    summary = loop.run()
    if export_to is not None and runtime.rank == 0:
        summary["merged_model_path"] = str(loop.export_merged(export_to))
    return summary
