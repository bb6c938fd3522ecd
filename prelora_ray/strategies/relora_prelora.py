"""`strategy: relora_prelora` (PreLoRA v2, section 4.2.4): FULL -> RELORA -> (Algorithm 1) -> WARMUP -> LORA.

FULL until `relora.start_epoch`; then RELORA: LoRA of a uniform rank on the target families
(`prelora.modules`) while embeddings, norms, biases and the head keep training in full, as in ReLoRA.
RELORA restarts the LR schedule as ReLoRA's warm start does (its own warmup from 0, a cosine over the
rest of the run). Every `relora.merge_every` optimizer steps, right after a step at LR 0, the adapters
are folded into the base and re-initialised (B = 0, A redrawn), their AdamW moments pruned
(`relora.reset`), and the LR rises again (ReLoRA's jagged cosine). Algorithm 1 reads the effective
weights W + s·B·A, which a merge leaves unchanged, at window boundaries during RELORA; when it passes,
the uniform adapters are merged away and PreLoRA's per-layer ranks go in: WARMUP for w epochs, then
LORA, as in `prelora`.
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
from prelora_ray.optim import RESET_MODES, prune_moments, relora_lr_factor
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


RESET_CHOICES = (*RESET_MODES, "none")
"""`relora.reset`: the optimizer reset at a merge (`optim.prune_moments`'s modes), or none."""


@dataclass(kw_only=True)
class ReLoRASettings:
    """`strategy: relora_prelora` (PreLoRA v2, section 4.2.4): the ReLoRA phase between FULL and the per-layer
    switch. Defaults are ReLoRA's (Guitaricet/relora, `torchrun_main.py`) where it has one."""

    start_epoch: int = setting(
        5,
        'First epoch (0-based) of the RELORA phase; FULL before it (the paper: "several" full epochs). At or after '
        "optim.lr_warmup_epochs (RELORA restarts the LR: not inside the first warmup).",
    )
    rank: int = setting(16, "Uniform LoRA rank of every target layer in RELORA (the paper: 256 on ViT-L).")
    merge_every: int = setting(
        100,
        "Optimizer steps between merges (ReLoRA's --relora = --cycle_length): fold s·B·A into the base, re-initialise, "
        "reset the LoRA moments; the LR is 0 on the step before each merge and restarts after it.",
    )
    warmup_steps: int = setting(
        50,
        "RELORA's own LR warmup from 0 (ReLoRA's --warmup_steps of its warm start): the LR schedule restarts with "
        "RELORA; at most relora.merge_every (ReLoRA refuses a restart inside the first warmup).",
    )
    rewarm_steps: int = setting(
        50,
        "Steps over which the LR rises linearly from 0 back to the cosine after each merge (ReLoRA's "
        "--restart_warmup_steps: 50-100).",
    )
    min_lr_ratio: float = setting(
        0.1,
        "Floor of RELORA's cosine (and of the phases after it) as a fraction of the peak LR, in (0, 1] (ReLoRA's "
        "--min_lr_ratio; optim.min_lr_ratio is the FULL phase's).",
    )
    lora_alpha: float = setting(
        32.0, "LoRA alpha of the uniform adapters: scale s = lora_alpha / relora.rank (ReLoRA's --lora_alpha)."
    )
    alpha_scale: float | None = setting(
        None,
        "A fixed scale s at every rank instead of lora_alpha / rank (2.0: this project's before issue 25, and "
        "prelora.alpha_scale's); None: lora_alpha / rank.",
    )
    lora_dropout: float = setting(0.1, "Dropout on the uniform adapters' input (ReLoRA's 0.1).")
    reset: str = setting(
        "magnitude",
        "Optimizer reset of the LoRA moments at each merge: magnitude (keep |x| > the relora.prune quantile of |x|, "
        "ReLoRA's --optimizer_magnitude_pruning), random (ReLoRA's --optimizer_random_pruning; its default reset is "
        "random at prune 0.999), topk (exactly 1 - prune kept, by |x|) or none (moments kept).",
    )
    prune: float = setting(
        0.9,
        "Fraction of each LoRA tensor's AdamW moments (m and v each) that relora.reset zeroes at a merge, in (0, 1) "
        "(ReLoRA: 0.9 magnitude; 0.999 random).",
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
            isinstance(self.merge_every, int) and self.merge_every >= 2,
            "relora.merge_every",
            self.merge_every,
            "an integer >= 2 (optimizer steps; ReLoRA merges when the step count is 1 past a multiple of it)",
        )
        check(
            isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.merge_every,
            "relora.warmup_steps",
            self.warmup_steps,
            f"an integer in [0, relora.merge_every] = [0, {self.merge_every}]: ReLoRA refuses a restart inside the "
            "first LR warmup (assert adjust_step + first_warmup_steps <= restart_every)",
        )
        check(
            isinstance(self.rewarm_steps, int) and 0 <= self.rewarm_steps < self.merge_every,
            "relora.rewarm_steps",
            self.rewarm_steps,
            f"an integer in [0, relora.merge_every) = [0, {self.merge_every})",
        )
        check(
            0 < self.min_lr_ratio <= 1, "relora.min_lr_ratio", self.min_lr_ratio, "a number in (0, 1] (ReLoRA's rule)"
        )
        check(self.lora_alpha > 0, "relora.lora_alpha", self.lora_alpha, "a number > 0")
        check(
            self.alpha_scale is None or self.alpha_scale > 0,
            "relora.alpha_scale",
            self.alpha_scale,
            "a number > 0 or null (null: relora.lora_alpha / relora.rank)",
        )
        check(0 <= self.lora_dropout < 1, "relora.lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        check(self.reset in RESET_CHOICES, "relora.reset", self.reset, f"one of {', '.join(RESET_CHOICES)}")
        check(
            self.reset == "none" or 0 < self.prune < 1,
            "relora.prune",
            self.prune,
            f"a fraction in (0, 1) with relora.reset={self.reset} (to keep the moments, say relora.reset=none)",
        )

    @property
    def scale(self) -> float:
        """The uniform adapters' LoRA scale s: `alpha_scale`, or lora_alpha / rank."""
        return self.alpha_scale if self.alpha_scale is not None else self.lora_alpha / self.rank


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
        """RELORA must start within the run and not inside the FULL phase's LR warmup (its start restarts the LR),
        and a forced switch must leave it (so be at or after its start)."""
        start, at = cfg.relora.start_epoch, cfg.prelora.switch_at_epoch
        check(start < cfg.epochs, "relora.start_epoch", start, f"< epochs ({cfg.epochs})")
        warmup = cfg.optim.lr_warmup_epochs
        check(
            start == 0 or start >= warmup,
            "relora.start_epoch",
            start,
            f"0 or >= optim.lr_warmup_epochs ({warmup:g}): RELORA restarts the LR with its own warmup "
            "(relora.warmup_steps), and ReLoRA refuses a restart inside the first LR warmup (assert adjust_step + "
            "first_warmup_steps <= restart_every)",
        )
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
        """`relora.rank` on every layer of the target families: scale `relora.scale`, dropout `relora.lora_dropout`."""
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
            dataclasses.replace(self.settings, alpha_scale=self.relora.scale, lora_dropout=self.relora.lora_dropout),
            seed=seed,
        )

    # -- hooks -------------------------------------------------------------------------------------
    def after_step(self, loop: TrainingLoop, loss: float | None) -> None:
        """Merge right after each zero-LR step of RELORA (ReLoRA's order: steps j·merge_every, j >= 1, of the phase,
        0-based); then the windows, as PreLoRA (step windows)."""
        done = loop.state.step - self._start_step(loop)  # RELORA's steps so far, the one just taken included
        if loop.state.phase is RELORA and done > self.relora.merge_every and (done - 1) % self.relora.merge_every == 0:
            self._merge(loop)
        super().after_step(loop, loss)

    def after_epoch(self, loop: TrainingLoop) -> None:
        """Enter RELORA at the end of the epoch before `start_epoch`; the freeze, as PreLoRA."""
        if loop.state.phase is FULL and loop.state.epoch + 1 == self.relora.start_epoch:
            self._enter_relora(loop)
        super().after_epoch(loop)

    def lr_factor(self, loop: TrainingLoop, step: int) -> float:
        """FULL: the loop's schedule. From RELORA's first step on, a schedule of its own, as ReLoRA's warm start
        (a fresh scheduler over the remaining steps): warmup from 0 over `warmup_steps`, a cosine down to
        `min_lr_ratio` at the run's end; in RELORA 0 on each step before a merge and back on the cosine
        `rewarm_steps` later (`optim.relora_lr_factor`). The phases after RELORA follow the same cosine."""
        if loop.state.phase is FULL:
            return super().lr_factor(loop, step)
        start, r = self._start_step(loop), self.relora
        return relora_lr_factor(
            step - start,
            total_steps=loop.total_steps - start,
            warmup_steps=r.warmup_steps,
            restart_every=r.merge_every,
            rewarm_steps=r.rewarm_steps if loop.state.phase is RELORA else 0,
            min_ratio=r.min_lr_ratio,
        )

    def _start_step(self, loop: TrainingLoop) -> int:
        """The optimizer step at which RELORA starts (its schedule and merges count from there)."""
        return self.relora.start_epoch * loop.steps_per_epoch

    def _merge(self, loop: TrainingLoop) -> None:
        """Fold s·B·A into the base, redraw A with B = 0, reset the adapters' AdamW moments (`relora.reset`)."""
        from prelora_ray.adapters.lora import fold_adapters, reinit_adapters
        from prelora_ray.adapters.model import weights_checksum

        fold_adapters(loop.model)
        self.state.relora_merges += 1
        seed = (self.cfg.seed * 1_000_003 + self.state.relora_merges * 104_729) % 2**63
        reinit_adapters(loop.model, seed=seed)
        if self.relora.reset != "none":
            adapters = [p for n, p in loop.model.named_parameters() if is_adapter_param(n)]
            prune_moments(loop.optimizer, adapters, mode=self.relora.reset, ratio=self.relora.prune, seed=seed ^ 0x9E37)
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
