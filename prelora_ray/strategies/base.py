"""`Strategy`: what a training strategy declares about itself, and the hooks the loop calls.

A strategy is one class in one file (prelora_ray/strategies/<name>.py, or a user's module; see
docs/adding_a_strategy.md). Its class-level declaration is read without building anything (config,
sweeps, the console): name, help line, config section and its cross-checks, phases with their stored
numbers, event metrics, summary line, and where its trials start in a fork-mode sweep. Its instance
hooks run inside the loop (`trainer.TrainingLoop`), in this order each epoch: `after_step` after every
optimizer step, `after_train_pass` at the end of the training pass (before validation), `after_epoch`
after validation. No Ray, no MLflow.

This module and the strategies' files import nothing heavy at module level (config.py imports them
before torch): the torch-side helpers (`prelora_ray.adapters`) are imported inside the hooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from prelora_ray import metrics as M
from prelora_ray.fork import TrunkFork
from prelora_ray.optim import lr_factor
from prelora_ray.strategies.phases import FULL, Phase
from prelora_ray.strategies.registry import strategy_sections

if TYPE_CHECKING:
    from torch import nn

    from prelora_ray.config import TrainSettings
    from prelora_ray.trainer import TrainingLoop

# keys that act only once LoRA is in (or on a rebuilt optimizer): a run without LoRA never reads them
POST_SWITCH_OPTIM_KEYS = ("optim.lora_lr", "optim.carry_optimizer_state")
FORK_MODES = ("scratch", "trunk", "fork")

__all__ = ["FORK_MODES", "POST_SWITCH_OPTIM_KEYS", "Strategy", "TrunkFork"]


class Strategy:
    """Full training with no phase change: the defaults every declaration and hook falls back to."""

    # -- the declaration (class-level: read before any run is built) ---------------------------------
    name: ClassVar[str]
    """The value of the `strategy` key."""
    description: ClassVar[str] = ""
    """One line for the `strategy` key's help: its phases, e.g. "full -> warmup -> LoRA"."""
    section: ClassVar[str | None] = None
    """Its own config section (`prelora`, `relora`, ...), or None: no settings."""
    section_class: ClassVar[type | None] = None
    """The section's dataclass: keyword-only, every field made with `prelora_ray.fields.setting` (a doc each),
    values checked in `__post_init__`; a `check_with(cfg)` method, if any, checks it against the rest of the
    config whatever the strategy (e.g. prelora.switch_at_epoch against epochs)."""
    section_doc: ClassVar[str] = ""
    """One line on the section (the config reference)."""
    uses: ClassVar[tuple[str, ...]] = ()
    """Every section of `TrainSettings` it reads (its own and others', e.g. relora_prelora reads prelora.*)."""
    phases: ClassVar[tuple[Phase, ...]] = (FULL,)
    """The phases its runs go through, FULL first (`Phase.declare` in its own file: stored numbers never change)."""
    metrics: ClassVar[Mapping[str, float]] = {}
    """Its own per-epoch event metrics and their values before any event (e.g. relora_merges: 0); every strategy
    also reports switch_epoch and freeze_epoch (-1: never)."""
    switch_decision_keys: ClassVar[tuple[str, ...]] = ()
    """Keys that only decide where its switch lands, when `trunk_fork` replays the switch on the trunk's history:
    two trials differing only in these, with the same replayed switch, compute the same after it (`fork.reuse_key`)."""
    fork_keys_text: ClassVar[str] = "any key (its trials train whole)"
    """The keys `fork_safe` allows, in words (for the error naming a key it refuses)."""
    fork_mode: ClassVar[str] = "scratch"
    """In a fork-from-trunk sweep (a `full` trunk): `fork` (its trials start from a trunk checkpoint), `trunk` (its
    trials' result is the trunk's) or `scratch` (its trials train whole, beside the forked ones). A new strategy that
    does not say otherwise trains whole, which is always correct."""

    @classmethod
    def check_config(cls, cfg: TrainSettings) -> None:
        """Cross-checks of a config that selects this strategy against the rest of it (ValueError naming the key)."""

    @classmethod
    def summary_line(cls, summary: dict[str, Any]) -> str:
        """What `prelora-ray train` prints about the run's strategy, from its summary (with its `history`)."""
        return f"strategy {cls.name}"

    # -- fork-from-trunk sweeps ---------------------------------------------------------------------
    @classmethod
    def fork_safe(cls, key: str) -> bool:
        """Whether a fork-mode sweep may sample `key` for this strategy's trials: it leaves their part before the
        fork point equal to the trunk's. A key of a section the strategy never reads is inert; `scratch` trials
        share nothing with the trunk."""
        if cls.fork_mode == "scratch":
            return True
        section = key.split(".", 1)[0]
        if section == "calibration":  # it measures, and changes nothing a run computes
            return True
        if section not in cls.uses and section in strategy_sections():
            return True
        return cls._acts_after_fork(key)

    @classmethod
    def _acts_after_fork(cls, key: str) -> bool:
        """A key of a section the strategy reads (or a general key): whether it acts only after the fork point."""
        return False

    @classmethod
    def fork_problem(cls, cfg: TrainSettings) -> str | None:
        """Why trials of `cfg` cannot start from the trunk (a `key: reason` line), None if they can."""
        return None

    @classmethod
    def trunk_fork(cls, cfg: TrainSettings, history: Sequence[dict[str, Any]]) -> TrunkFork | None:
        """Where a trial of `cfg` starts, given the trunk's per-epoch records so far; None: wait for more of them."""
        return TrunkFork(mode="scratch", why=f"strategy {cls.name} does not start from a full-training trunk")

    # -- the hooks ----------------------------------------------------------------------------------
    def __init__(self, cfg: TrainSettings) -> None:
        self.cfg = cfg

    @property
    def step_losses(self) -> bool:
        """Whether `after_step` needs each step's all-worker mean loss (one all-reduce per step)."""
        return False

    def sync_gradients(self, phase: Phase) -> bool:
        """Whether gradients are all-reduced at every step in `phase` (DDP); LTE's heads: no."""
        return True

    def loss_scale(self, phase: Phase) -> float:
        """Factor on the worker's mean loss before backward (LTE: each of H heads gets its own chunk's gradient)."""
        return 1.0

    def batch_chunks(self, world_size: int) -> int:
        """Equal chunks each worker's batch is cut into (LTE: one per head of the worker); 1: none.

        With more than one, the train loader drops a last short batch and orders each batch chunk by chunk
        (`data.ChunkedBatches`)."""
        return 1

    def clip_gradients(self, loop: TrainingLoop, max_norm: float) -> None:
        """Clip the gradients after backward (`optim.grad_clip` set): by default the norm of all of them together."""
        import torch

        torch.nn.utils.clip_grad_norm_([p for g in loop.optimizer.param_groups for p in g["params"]], max_norm)

    def prepare(self, loop: TrainingLoop, phase: Phase) -> None:
        """Shape the model and set requires_grad for `phase`: at a fresh start, or before a checkpoint's weights load.

        The default: every parameter trains."""
        for param in loop.model.parameters():
            param.requires_grad_(True)

    def lr_factor(self, loop: TrainingLoop, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer `step`: `optim.*`'s warmup and schedule."""
        o = self.cfg.optim
        warmup = int(o.lr_warmup_epochs * loop.steps_per_epoch)
        return lr_factor(
            step, total_steps=loop.total_steps, warmup_steps=warmup, schedule=o.schedule, min_ratio=o.min_lr_ratio
        )

    def after_step(self, loop: TrainingLoop, loss: float | None) -> None:
        """After each optimizer step (`loss`: the step's all-worker mean when `step_losses`, else None)."""

    def after_train_pass(self, loop: TrainingLoop, loss: float | None) -> None:
        """After the epoch's last step, before validation (`loss`: the epoch's all-worker mean; None: recorded)."""

    def after_epoch(self, loop: TrainingLoop) -> None:
        """After validation, before the epoch's report and checkpoint."""

    def export(self, model: nn.Module) -> nn.Module:
        """The trained model as a plain ViT (every adapter folded into its base weight), for `save_pretrained`."""
        from prelora_ray.adapters.model import merge_adapters

        return merge_adapters(model)

    # -- reports and checkpoints ----------------------------------------------------------------------
    def event_metrics(self) -> dict[str, Any]:
        """Per-epoch event metrics: switch and freeze epochs (every strategy: -1, never), then `metrics`' values now."""
        return {M.SWITCH_EPOCH: -1, M.FREEZE_EPOCH: -1, **self.metrics}

    def summary(self) -> dict[str, Any]:
        """Keyword arguments of `fork.summarize` beyond the history (switch and freeze epochs, ranks)."""
        return {}

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """Per-worker switch decisions taken so far (for the driver's agreement check)."""
        return []

    def sync_checks(self) -> list[str]:
        """Checksums of the weights at the strategy's own sync points (ReLoRA: after each merge), in order.

        Every worker computes its own; the driver compares them across workers (they must be equal).
        """
        return []

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own progress, for an exact resume (plain data only: see checkpoint.py)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict; called before `prepare` when a checkpoint loads."""

    def worker_state(self, loop: TrainingLoop) -> dict[str, Any] | None:
        """This worker's own part of a checkpoint, where workers differ (None: rank 0's state is everyone's).

        A dict with "rank", "model" (state-dict entries that replace the shared ones) and "optimizer"."""
        return None

    def check_worker_state(self, loop: TrainingLoop, worker: dict[str, Any] | None) -> None:
        """Raise ValueError when a checkpoint lacks this worker's own part where the strategy needs it."""

    def fork_state(self, snapshots: list[tuple[dict[str, list[float]], float]], start: int) -> dict[str, Any]:
        """The state a run forked from a full-training trunk checkpoint at `start` begins with."""
        return {}
