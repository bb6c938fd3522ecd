"""`strategy: relora_prelora` (PreLoRA v2, section 4.2.4): FULL -> RELORA -> (Algorithm 1) -> WARMUP -> LORA.

FULL until `relora.start_epoch`; then RELORA: LoRA of a uniform rank on the target families
(`prelora.modules`) while embeddings, norms, biases and the head keep training in full, as in ReLoRA.
Every `relora.merge_every` optimizer steps the adapters are folded into the base and
re-initialised (B = 0, A redrawn), their AdamW moments pruned by magnitude, and the learning rate
restarts (jagged cosine). Algorithm 1 reads the effective weights W + s·B·A, which a merge leaves
unchanged, at window boundaries during RELORA; when it passes, the uniform adapters are merged
away and PreLoRA's per-layer ranks go in: WARMUP for w epochs, then LORA, as in `prelora`.
`prelora.switch_at_epoch` works as in `prelora` (the config requires it to be in RELORA: >= start_epoch).
See docs/algorithms.md, "ReLoRA hybrid".

Declared here: the section `relora`, the phase RELORA (3) and what trains in it, the metric
`relora_merges`; the rest is PreLoRA's. The torch side is imported inside the hooks (config.py imports
this file before torch).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prelora_ray.adapters.names import is_adapted_base_weight, is_adapter_param
from prelora_ray.fields import check, setting
from prelora_ray.optim import jagged_cosine_factor, prune_moments
from prelora_ray.strategies.base import TrunkFork
from prelora_ray.strategies.phases import FULL, Phase
from prelora_ray.strategies.prelora import LORA, WARMUP, PreLoRA, PreLoRAState

if TYPE_CHECKING:
    from torch import nn

    from prelora_ray.config import TrainSettings
    from prelora_ray.trainer import TrainingLoop

log = logging.getLogger("prelora_ray")

RELORA_MERGES = "relora_merges"
"""Metric: merges (fold + re-init + prune + LR restart) so far, cumulative per epoch."""


@dataclass(kw_only=True)
class ReLoRASettings:
    """`strategy: relora_prelora` (PreLoRA v2, section 4.2.4): the ReLoRA phase between FULL and the per-layer
    switch."""

    start_epoch: int = setting(
        5, 'First epoch (0-based) of the RELORA phase; FULL before it (the paper: "several" full epochs).'
    )
    rank: int = setting(16, "Uniform LoRA rank of every target layer in RELORA (the paper: 256 on ViT-L).")
    merge_every: int = setting(
        100,
        "Optimizer steps between merges: fold s·B·A into the base, re-initialise, prune the LoRA moments, restart the "
        "LR.",
    )
    prune: float = setting(
        0.9,
        "Fraction of each LoRA tensor's AdamW moments (m and v each) zeroed at a merge, smallest magnitudes first "
        "(ReLoRA: 0.9).",
    )
    rewarm_steps: int = setting(
        50, "Steps over which the LR rises linearly from 0 back to the global cosine after each merge (ReLoRA: 50-100)."
    )
    alpha_scale: float = setting(
        2.0, "LoRA scale s = lora_alpha / rank of the uniform adapters (prelora.alpha_scale is the per-layer phase's)."
    )

    def __post_init__(self) -> None:
        check(
            isinstance(self.start_epoch, int) and self.start_epoch >= 0,
            "relora.start_epoch",
            self.start_epoch,
            "an integer >= 0",
        )
        check(isinstance(self.rank, int) and self.rank >= 1, "relora.rank", self.rank, "an integer >= 1")
        check(
            isinstance(self.merge_every, int) and self.merge_every >= 1,
            "relora.merge_every",
            self.merge_every,
            "an integer >= 1 (optimizer steps)",
        )
        check(0 <= self.prune < 1, "relora.prune", self.prune, "a fraction in [0, 1)")
        check(
            isinstance(self.rewarm_steps, int) and 0 <= self.rewarm_steps < self.merge_every,
            "relora.rewarm_steps",
            self.rewarm_steps,
            f"an integer in [0, relora.merge_every) = [0, {self.merge_every})",
        )
        check(self.alpha_scale > 0, "relora.alpha_scale", self.alpha_scale, "a number > 0")


def _relora_trains(name: str, settings: Any) -> bool:
    """RELORA: all but the adapted layers' base weights (ReLoRA trains embeddings, norms, biases, head in full)."""
    return is_adapter_param(name) or not is_adapted_base_weight(name)


RELORA = Phase.declare("relora", 3, trains=_relora_trains)
"""Uniform LoRA on the target families, merged and re-initialised every `relora.merge_every` steps."""


@dataclass(kw_only=True)
class ReLoRAState(PreLoRAState):
    """PreLoRA's progress plus the merges so far (the schedule's position is a function of the step)."""

    relora_merges: int = 0  # merges (fold + re-init + prune + LR restart) done in RELORA (metric RELORA_MERGES)
    merge_checksums: list[str] = field(default_factory=list)  # weights_checksum after each merge (one worker's)


class ReLoRAPreLoRA(PreLoRA):
    """PreLoRA with a ReLoRA phase between full training and the per-layer switch."""

    name = "relora_prelora"
    description = "full -> ReLoRA -> warmup -> LoRA"
    section = "relora"
    section_class = ReLoRASettings
    section_doc = "The ReLoRA phase of strategy relora_prelora."
    uses = ("prelora", "relora")
    phases = (FULL, RELORA, WARMUP, LORA)
    metrics = {RELORA_MERGES: 0}
    fork_mode = "fork"  # from the trunk's checkpoint at relora.start_epoch: FULL before it is the trunk's training
    fork_keys_text = "prelora.* (not window_unit), relora.*, optim.lora_lr or optim.carry_optimizer_state"
    state_class = ReLoRAState

    @classmethod
    def check_config(cls, cfg: TrainSettings) -> None:
        """RELORA must start within the run, and a forced switch must leave it (so be at or after its start)."""
        start, at = cfg.relora.start_epoch, cfg.prelora.switch_at_epoch
        check(start < cfg.epochs, "relora.start_epoch", start, f"< epochs ({cfg.epochs})")
        check(
            at is None or at >= start,
            "prelora.switch_at_epoch",
            at,
            f">= relora.start_epoch ({start}) with strategy relora_prelora (its switch leaves the RELORA phase)",
        )

    @classmethod
    def _acts_after_fork(cls, key: str) -> bool:
        """PreLoRA's keys (its switch is in RELORA) and relora.* (RELORA starts at the fork point)."""
        return key.startswith("relora.") or super()._acts_after_fork(key)

    @classmethod
    def trunk_fork(cls, cfg: TrainSettings, history: Sequence[dict[str, Any]]) -> TrunkFork | None:
        """The epochs before `relora.start_epoch` are full training with the trunk's schedule and RNG stream: fork at
        the trunk's checkpoint at (or before) the start of RELORA. With start_epoch 0 nothing is shared."""
        if cfg.relora.start_epoch == 0:
            return TrunkFork(
                mode="scratch", why="relora.start_epoch is 0: no full-training epochs to share with the trunk"
            )
        return TrunkFork(mode="fork", until=cfg.relora.start_epoch)

    def __init__(self, cfg: TrainSettings) -> None:
        super().__init__(cfg)
        self.relora = cfg.relora

    # -- which parameters train ------------------------------------------------------------------
    def prepare(self, loop: TrainingLoop, phase: Phase) -> None:
        """RELORA: re-inject the uniform adapters (A is loaded next); other phases as PreLoRA (a fresh start at
        `start_epoch` 0 goes into RELORA at once)."""
        from prelora_ray.adapters.model import set_trainable

        if phase is FULL and loop.state.epoch == 0 and self.relora.start_epoch == 0:
            super().prepare(loop, phase)
            self._enter_relora(loop, rebuild=False)
        elif phase is RELORA:
            loop.model = self._inject_uniform(loop, seed=0)
            set_trainable(loop.model, RELORA, self.settings)
        else:
            super().prepare(loop, phase)

    def _enter_relora(self, loop: TrainingLoop, *, rebuild: bool = True) -> None:
        """Uniform adapters on the target families (B = 0: the function is unchanged); their base weights freeze."""
        from prelora_ray.adapters.model import set_trainable

        seed = self._adapter_seed(loop.state.epoch) ^ 0x5EED
        loop.model = self._inject_uniform(loop, seed=seed)
        set_trainable(loop.model, RELORA, self.settings)
        loop.state.phase = RELORA
        if rebuild:
            loop.rebuild()
        if loop.runtime.rank == 0:
            log.info(
                "epoch %d: ReLoRA phase, uniform rank %d; %s", loop.state.epoch, self.relora.rank, loop.trainable_text()
            )

    def _inject_uniform(self, loop: TrainingLoop, *, seed: int) -> nn.Module:
        """`relora.rank` on every layer of the target families, at scale `relora.alpha_scale`."""
        from prelora_ray.adapters.lora import inject_lora
        from prelora_ray.adapters.model import unwrap

        ranks = {
            family: [self.relora.rank] * len(names)
            for family, names in loop.family_names.items()
            if family in self.settings.modules
        }
        return inject_lora(
            unwrap(loop.wrapped),
            ranks,
            dataclasses.replace(self.settings, alpha_scale=self.relora.alpha_scale),
            seed=seed,
        )

    # -- hooks -------------------------------------------------------------------------------------
    def after_step(self, loop: TrainingLoop, loss: float | None) -> None:
        """Merge every `merge_every` steps of RELORA; then the windows, as PreLoRA (step windows)."""
        if loop.state.phase is RELORA and (loop.state.step - self._start_step(loop)) % self.relora.merge_every == 0:
            self._merge(loop)
        super().after_step(loop, loss)

    def after_epoch(self, loop: TrainingLoop) -> None:
        """Enter RELORA at the end of the epoch before `start_epoch`; the freeze, as PreLoRA."""
        if loop.state.phase is FULL and loop.state.epoch + 1 == self.relora.start_epoch:
            self._enter_relora(loop)
        super().after_epoch(loop)

    def lr_factor(self, loop: TrainingLoop, step: int) -> float:
        """In RELORA the jagged cosine (0 at each merge, back on the cosine `rewarm_steps` later); else the loop's
        schedule."""
        if loop.state.phase is not RELORA:
            return super().lr_factor(loop, step)
        o = self.cfg.optim
        return jagged_cosine_factor(
            step,
            total_steps=loop.total_steps,
            warmup_steps=int(o.lr_warmup_epochs * loop.steps_per_epoch),
            min_ratio=o.min_lr_ratio,
            first_restart=self._start_step(loop) + self.relora.merge_every,
            restart_every=self.relora.merge_every,
            rewarm_steps=self.relora.rewarm_steps,
        )

    def _start_step(self, loop: TrainingLoop) -> int:
        """The optimizer step at which RELORA starts (its merges count from there)."""
        return self.relora.start_epoch * loop.steps_per_epoch

    def _merge(self, loop: TrainingLoop) -> None:
        """Fold s·B·A into the base, redraw A with B = 0, prune the adapters' AdamW moments (ReLoRA's reset)."""
        from prelora_ray.adapters.lora import fold_adapters, reinit_adapters
        from prelora_ray.adapters.model import weights_checksum

        fold_adapters(loop.model)
        self.state.relora_merges += 1
        reinit_adapters(loop.model, seed=(self.cfg.seed * 1_000_003 + self.state.relora_merges * 104_729) % 2**63)
        adapters = [p for n, p in loop.model.named_parameters() if is_adapter_param(n)]
        prune_moments(loop.optimizer, adapters, keep=1.0 - self.relora.prune)
        self.state.merge_checksums.append(weights_checksum(loop.model))

    def sync_checks(self) -> list[str]:
        """The weights' checksum after each merge (workers must agree: DDP keeps them in sync, the merge is
        deterministic)."""
        return list(self.state.merge_checksums)

    # -- Algorithm 1 runs during RELORA; the switch first merges the uniform adapters away ------------
    def _measuring(self, phase: Phase) -> bool:
        """Algorithm 1's windows record FULL and RELORA units (W + s·B·A: continuous across merges)."""
        return phase in (FULL, RELORA)

    def _switching_phase(self, phase: Phase) -> bool:
        """The per-layer switch leaves RELORA."""
        return phase is RELORA

    def _switch(self, loop: TrainingLoop, ranks: dict[str, list[int]]) -> None:
        """Fold the uniform adapters into the base and remove them, then PreLoRA's per-layer switch."""
        from prelora_ray.adapters.model import merge_adapters, unwrap

        loop.model = merge_adapters(unwrap(loop.wrapped))
        loop.wrapped = loop.model
        super()._switch(loop, ranks)

    def event_metrics(self) -> dict[str, Any]:
        """PreLoRA's events plus the cumulative merges."""
        return {**super().event_metrics(), RELORA_MERGES: self.state.relora_merges}
