"""The training loop: FULL -> (test passes) -> WARMUP for w epochs -> LORA, or FULL throughout.

Reads top to bottom: for each epoch, train, evaluate, record norms, maybe switch or freeze,
report with a checkpoint. Ray-free: the surroundings come in as a `Runtime` and a `MetricsSink`.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from prelora_ray import metrics as M
from prelora_ray.config import TrainSettings
from prelora_ray.data import DatasetBundle, build_datasets
from prelora_ray.fork import TrunkWriter, summarize
from prelora_ray.models import build_model, family_module_names
from prelora_ray.monitor import ConvergenceMonitor, layer_norms
from prelora_ray.runtime import LocalRuntime, MetricsSink, NullSink, Runtime
from prelora_ray.switch import Phase, inject_lora, merge_lora, set_trainable, unwrap

log = logging.getLogger("prelora_ray")


@dataclass(kw_only=True)
class LoopState:
    """Everything about the run's progress that a checkpoint must restore."""

    epoch: int = 0  # next epoch to run
    step: int = 0  # optimizer steps taken
    phase: Phase = Phase.FULL
    switch_epoch: int = -1  # epoch at whose end (or during which, step windows) LoRA went in
    freeze_epoch: int = -1  # epoch at whose end the base froze
    ranks: dict[str, list[int]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per epoch
    decisions: list[dict[str, Any]] = field(default_factory=list)  # per-worker switch decisions
    resumed_at: list[int] = field(default_factory=list)  # epochs at which the run resumed from a checkpoint
    forked_from: int = -1  # the trunk epoch this run started from (fork-from-trunk sweeps), -1: none


@dataclass(kw_only=True)
class ForkStart:
    """Where a forked run starts: a trunk checkpoint and the trunk's per-epoch snapshots before it."""

    state: dict[str, Any]
    snapshots: list[tuple[dict[str, list[float]], float]]


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at an optimizer step: linear warmup, then the schedule."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


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
    numpy_state = {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of rng_state."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated since the last reset on GPU; the process's peak RSS on CPU (Linux KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainingLoop:
    """One PreLoRA (or full) training run on one worker."""

    def __init__(
        self, cfg: TrainSettings, runtime: Runtime, sink: MetricsSink | None = None, *, data: DatasetBundle | None = None,
        trunk: TrunkWriter | None = None, fork: ForkStart | None = None,
    ) -> None:
        self.cfg = cfg
        self.trunk = trunk if runtime.rank == 0 else None
        self.fork = fork
        self.runtime = runtime
        self.sink = sink if sink is not None and runtime.rank == 0 else NullSink()
        self.device = runtime.device
        seed_everything(cfg.seed, cfg.deterministic)
        self.data = data or build_datasets(cfg.data)
        self.model: nn.Module = build_model(
            cfg.model, num_classes=self.data.num_classes, image_size=self.data.image_size, num_channels=self.data.num_channels
        )
        self.plain_params = sum(p.numel() for p in self.model.parameters())
        self.family_names = family_module_names(self.model, cfg.prelora.modules)
        self.state = LoopState()
        p = cfg.prelora
        self.monitor = ConvergenceMonitor(k=p.k, m=p.m, window_stat=p.window_stat)
        self.train_loader, self.sampler = self._train_loader()
        self.val_loader = self._val_loader()
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer: torch.optim.Optimizer | None = None
        self.wrapped: nn.Module = self.model
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.autocast = self.device.type == "cuda" and cfg.amp

    # -- data ------------------------------------------------------------------------------------
    def _train_loader(self) -> tuple[DataLoader, DistributedSampler]:
        sampler = DistributedSampler(
            self.data.train, num_replicas=self.runtime.world_size, rank=self.runtime.rank, shuffle=True, seed=self.cfg.seed
        )
        loader = DataLoader(
            self.data.train,
            batch_size=self.cfg.data.batch_size,
            sampler=sampler,
            num_workers=self.cfg.data.loader_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )
        return loader, sampler

    def _val_loader(self) -> DataLoader:
        # every validation image exactly once over all workers (no sampler padding)
        shard = Subset(self.data.val, list(range(self.runtime.rank, len(self.data.val), self.runtime.world_size)))
        return DataLoader(shard, batch_size=max(self.cfg.data.batch_size, 256), num_workers=self.cfg.data.loader_workers)

    # -- model, optimizer --------------------------------------------------------------------------
    def _param_groups(self) -> list[dict[str, Any]]:
        o = self.cfg.optim
        decay, no_decay, lora = [], [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if "lora_" in name:
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

    def _rebuild(self) -> None:
        """New DDP wrapper and optimizer after requires_grad changed (DDP would fail otherwise).

        With carry_optimizer_state, AdamW moments of parameters that keep training survive; those of
        frozen parameters are dropped (freed) with the old optimizer.
        """
        old = self.optimizer
        self.wrapped = self.runtime.prepare_model(self.model)
        self.model = unwrap(self.wrapped)
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=o.lr, betas=o.betas, fused=self.device.type == "cuda" or None)
        if old is not None and o.carry_optimizer_state:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p in old.state:
                        self.optimizer.state[p] = old.state[p]
        del old

    def _set_lr(self) -> float:
        o = self.cfg.optim
        factor = lr_factor(
            self.state.step,
            total_steps=self.total_steps,
            warmup_steps=int(o.lr_warmup_epochs * self.steps_per_epoch),
            schedule=o.schedule,
            min_ratio=o.min_lr_ratio,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        return o.lr * factor

    # -- the switch --------------------------------------------------------------------------------
    def _norms(self) -> dict[str, list[float]]:
        return layer_norms(self.model, self.family_names)

    def _decide(self, *, forced: bool = False) -> tuple[bool, dict[str, list[int]]]:
        """Algorithm 1 (and 2 if it passes) at a window boundary; every worker gets rank 0's answer.

        `forced` (prelora.switch_at_epoch): passed without Algorithm 1, ranks from Algorithm 2 as usual.

        Weights are synchronized and losses all-reduced, so each worker's own decision should agree;
        the local decisions are gathered and kept as a check, and rank 0's is used.
        """
        p = self.cfg.prelora
        passed = forced or self.monitor.passed(p.tau, p.zeta)
        ranks = self.monitor.ranks(p.r_min, p.r_max, tie_rank=p.tie_rank, zero_rank_below=p.zero_rank_below) if passed else {}
        local = {"passed": passed, "ranks": ranks}
        if self.runtime.world_size > 1:
            gathered = self.runtime.all_gather_object(local)
            if passed or any(d["passed"] for d in gathered):
                self.state.decisions.append({"epoch": self.state.epoch, "workers": gathered})
                if any(d != gathered[0] for d in gathered):
                    log.warning("workers disagreed on the switch decision; using rank 0's: %s", gathered)
            local = gathered[0]
        elif passed:
            self.state.decisions.append({"epoch": self.state.epoch, "workers": [local]})
        return local["passed"], local["ranks"]

    def _switch(self, ranks: dict[str, list[int]]) -> None:
        """Inject LoRA with the assigned ranks; base and LoRA train together (WARMUP)."""
        self.model = inject_lora(unwrap(self.wrapped), ranks, self.cfg.prelora, seed=self._adapter_seed())
        set_trainable(self.model, Phase.WARMUP, self.cfg.prelora)
        self.state.phase, self.state.ranks, self.state.switch_epoch = Phase.WARMUP, ranks, self.state.epoch
        self._rebuild()
        if self.runtime.rank == 0:
            why = "prelora.switch_at_epoch" if self.cfg.prelora.switch_at_epoch is not None else "partial convergence test passed"
            log.info("epoch %d: %s; LoRA injected with ranks %s", self.state.epoch, why, ranks)
        self.sink.log_dict({"switch_epoch": self.state.switch_epoch, "ranks": ranks, "decisions": self.state.decisions}, "ranks.json")

    def _adapter_seed(self) -> int:
        """Seed of the adapters' initial A: from the run's seed and the switch epoch, not the training's RNG stream."""
        return (self.cfg.seed * 1_000_003 + self.state.epoch * 7919 + 17) % 2**63

    def _freeze(self) -> None:
        """Freeze the base: only LoRA (and the configured groups) train from here (LORA)."""
        set_trainable(self.model, Phase.LORA, self.cfg.prelora)
        self.state.phase, self.state.freeze_epoch = Phase.LORA, self.state.epoch
        self._rebuild()
        if self.runtime.rank == 0:
            log.info("epoch %d: base frozen; %s", self.state.epoch, self._trainable_text())

    def _after_unit(self, loss: float | None) -> None:
        """Record one window unit (None: it is recorded already); at a boundary in the FULL phase, maybe switch."""
        if self.state.phase is not Phase.FULL or self.cfg.strategy != "prelora":
            return
        if loss is not None:
            self.monitor.record(self._norms(), loss)
        at = self.cfg.prelora.switch_at_epoch
        if at is not None:  # the switch epoch is given: Algorithm 1 is not asked
            if self.state.epoch == at:
                self._switch(self._decide(forced=True)[1])
            return
        if self.monitor.at_boundary() and self.state.epoch >= self.cfg.prelora.min_switch_epoch:
            passed, ranks = self._decide()
            if passed:
                self._switch(ranks)

    # -- epochs ------------------------------------------------------------------------------------
    def train_one_epoch(self) -> dict[str, float]:
        """One pass over this worker's shard; returns the all-worker mean loss and the timing."""
        self.wrapped.train()
        self.sampler.set_epoch(self.state.epoch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        per_step = self.cfg.prelora.window_unit == "step"
        loss_sum, count = torch.zeros((), dtype=torch.float64), 0
        start = time.perf_counter()
        for images, labels in self.train_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            lr = self._set_lr()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.loss_fn(self.wrapped(pixel_values=images).logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.optim.grad_clip)
            self.optimizer.step()
            self.state.step += 1
            batch_loss = loss.detach().double() * labels.numel()
            loss_sum += batch_loss.cpu()
            count += labels.numel()
            if per_step:
                step_sum = self.runtime.all_reduce_sum(torch.stack([batch_loss.cpu(), torch.tensor(float(labels.numel()), dtype=torch.float64)]))
                self._after_unit(float(step_sum[0] / step_sum[1]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        epoch_time = time.perf_counter() - start
        total = self.runtime.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64)]))
        train_loss = float(total[0] / total[1])
        if not math.isfinite(train_loss):  # every worker sees the same all-reduced value: all stop together
            raise FloatingPointError(f"epoch {self.state.epoch}: training loss is {train_loss} (diverged: lower optim.lr?)")
        if not per_step:
            self._after_unit(train_loss)
        return {M.TRAIN_LOSS: train_loss, M.EPOCH_TIME_S: epoch_time, M.THROUGHPUT: float(total[1]) / epoch_time, M.LR: lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 accuracy and loss over the whole validation set (all workers' shards)."""
        self.wrapped.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        for images, labels in self.val_loader:
            images, labels = images.to(self.device), labels.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.wrapped(pixel_values=images).logits.float()
            sums += torch.tensor(
                [float(nn.functional.cross_entropy(logits, labels, reduction="sum")), float((logits.argmax(-1) == labels).sum()), labels.numel()],
                dtype=torch.float64,
            )
        sums = self.runtime.all_reduce_sum(sums)
        return {M.VAL_LOSS: float(sums[0] / sums[2]), M.VAL_ACC: float(sums[1] / sums[2])}

    def _trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _trainable_text(self) -> str:
        n = self._trainable()
        return f"{n:,} trainable parameters ({100 * n / self.plain_params:.2f}% of {self.plain_params:,})"

    def _epoch_metrics(self, epoch: int, phase: Phase, trainable: int, train: dict[str, float], val: dict[str, float]) -> dict[str, Any]:
        norms = self._norms()
        out: dict[str, Any] = {M.EPOCH: epoch, M.PHASE: phase.value, M.PHASE_INDEX: phase.index, **train, **val}
        out[M.TRAINABLE_PARAMS] = trainable
        out[M.TRAINABLE_FRACTION] = trainable / self.plain_params
        out[M.PEAK_MEM_MB] = peak_memory_mb(self.device)
        out[M.SWITCH_EPOCH] = self.state.switch_epoch
        out[M.FREEZE_EPOCH] = self.state.freeze_epoch
        for family, values in norms.items():
            out[f"{M.NORM_PREFIX}{family}"] = sum(values) / len(values)
            for layer, value in enumerate(values):
                out[f"{M.LAYER_NORM_PREFIX}{family}/{layer}"] = value
        return out

    def summary(self) -> dict[str, Any]:
        """Run summary over the history (a fork's includes the trunk's epochs before the fork)."""
        s = self.state
        out = summarize(s.history, switch_epoch=s.switch_epoch, freeze_epoch=s.freeze_epoch, ranks=s.ranks)
        out["resumed_at"] = list(s.resumed_at)
        out["forked_from"] = s.forked_from
        out["epochs_trained"] = sum(1 for e in s.history if e[M.EPOCH] >= max(s.forked_from, 0))
        return out

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: weights (PEFT keys after the switch), optimizer, progress, norms, RNG."""
        s = self.state
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "loop": {**s.__dict__, "phase": s.phase.value},
            "monitor": self.monitor.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, ckpt: dict[str, Any], *, monitor: dict[str, Any] | None = None) -> None:
        """Restore a checkpoint: re-inject LoRA with its ranks first when it was taken after the switch.

        `monitor` replaces the checkpoint's own window state (a fork rebuilds it from the trunk's history).
        """
        loop = dict(ckpt["loop"])
        loop["phase"] = Phase(loop["phase"])
        self.state = LoopState(**loop)
        if self.state.phase is not Phase.FULL:
            self.model = inject_lora(unwrap(self.wrapped), self.state.ranks, self.cfg.prelora, seed=0)  # A is loaded next
        set_trainable(self.model, self.state.phase, self.cfg.prelora)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer = None
        self._rebuild()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.monitor.load_state_dict(ckpt["monitor"] if monitor is None else monitor)
        set_rng_state(ckpt["rng"])

    def start_from_fork(self, fork: ForkStart) -> None:
        """Go on from a trunk checkpoint (the full-training baseline's state at the start of an epoch).

        Weights, optimizer, RNG, step and the trunk's per-epoch history are the trunk's; the windows
        of Algorithm 1 are rebuilt from the trunk's recorded norms and losses, so the test runs at the
        same epochs with the same input as in a run of this config from scratch.
        """
        loop = fork.state["loop"]
        if Phase(loop["phase"]) is not Phase.FULL:
            raise ValueError(f"a fork must start from a full-training checkpoint; this one is in phase {loop['phase']!r}")
        start = int(loop["epoch"])
        if len(fork.snapshots) < start:
            raise ValueError(f"the trunk's history has {len(fork.snapshots)} epochs, the fork needs the {start} before its checkpoint")
        p = self.cfg.prelora
        window = [({f: norms[f] for f in p.modules}, loss) for norms, loss in fork.snapshots[max(0, start - p.k * p.m) : start]]
        self.load_state_dict(fork.state, monitor={"snapshots": window, "units": start, "k": p.k, "m": p.m})
        self.state.resumed_at, self.state.decisions, self.state.forked_from = [], [], start
        if start > 0:
            self._decide_at_end_of(start - 1)

    def _decide_at_end_of(self, epoch: int) -> None:
        """The decision a live run takes at the end of `epoch`, taken after loading a checkpoint from then.

        A fork from the trunk's checkpoint at the end of the switch epoch switches here, and the
        freeze follows at once when w = 0, as in `run()`; that epoch's record then says so.
        """
        self.state.epoch = epoch
        self._after_unit(None)
        if self.state.switch_epoch == epoch:
            if self.state.phase is Phase.WARMUP and self.cfg.prelora.warmup == 0:
                self._freeze()
            self.state.history[-1].update({M.SWITCH_EPOCH: self.state.switch_epoch, M.FREEZE_EPOCH: self.state.freeze_epoch})
        self.state.epoch = epoch + 1

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
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
            set_trainable(self.model, Phase.FULL, self.cfg.prelora)
            self._rebuild()
        if self.trunk is not None:
            self.trunk.start(self.state.epoch, self.state_dict)
        for epoch in range(self.state.epoch, self.cfg.epochs):
            phase, trainable = self.state.phase, self._trainable()
            train = self.train_one_epoch()  # may switch mid-epoch with step windows
            val = self.evaluate()
            if self.state.phase is Phase.WARMUP and epoch >= self.state.switch_epoch + self.cfg.prelora.warmup:
                self._freeze()
            metrics = self._epoch_metrics(epoch, phase, trainable, train, val)
            self.state.history.append({**{k: v for k, v in metrics.items() if not k.startswith(M.LAYER_NORM_PREFIX)}, "wall_time": time.time()})
            self.state.epoch = epoch + 1
            snapshot = functools.cache(self.state_dict)  # built at most once per epoch (trunk file and report)
            if self.trunk is not None:  # before the report: the trunk's files are never behind its checkpoints
                self.trunk.after_epoch(epoch, metrics, snapshot)
            self.sink.log_metrics({k: float(v) for k, v in metrics.items() if k not in (M.PHASE, M.EPOCH)}, step=epoch)
            if self.runtime.rank == 0:
                log.info(
                    "epoch %3d | %-6s | loss %.4f | val_loss %.4f | val_acc %.4f | %.2fs | trainable %.2f%%",
                    epoch, phase.value, train[M.TRAIN_LOSS], val[M.VAL_LOSS], val[M.VAL_ACC], train[M.EPOCH_TIME_S], 100 * metrics[M.TRAINABLE_FRACTION],
                )
            report = {k: v for k, v in metrics.items() if not k.startswith(M.LAYER_NORM_PREFIX)}
            report.update({k: v for k, v in self.summary().items() if isinstance(v, (int, float))})
            changed = self.state.switch_epoch == epoch or self.state.freeze_epoch == epoch
            due = (epoch + 1) % self.cfg.cluster.checkpoint_every == 0 or epoch + 1 == self.cfg.epochs or changed
            self.runtime.report(report, snapshot() if due else None)
        return self.summary()

    def export_merged(self, path: str | Path) -> Path:
        """Save the model with LoRA folded in as a plain ViT (`save_pretrained`, loadable by transformers)."""
        path = Path(path)
        merged = merge_lora(unwrap(self.wrapped))
        merged.save_pretrained(path)
        self.model = self.wrapped = merged
        return path


def train(cfg: TrainSettings, runtime: Runtime | None = None, sink: MetricsSink | None = None, *, export_to: str | Path | None = None) -> dict[str, Any]:
    """Run one training job in this process (no Ray): the function a user can call from a notebook."""
    runtime = runtime or LocalRuntime()
    loop = TrainingLoop(cfg, runtime, sink)
    summary = loop.run()
    if export_to is not None and runtime.rank == 0:
        summary["merged_model_path"] = str(loop.export_merged(export_to))
    return summary
