"""`strategy: prelora`: FULL -> (Algorithm 1 passes) -> WARMUP for w epochs -> LORA (section 3.3).

Algorithm 1 runs at window boundaries of the FULL phase (epochs, or optimizer steps with
`prelora.window_unit: step`); when it passes, Algorithm 2's per-layer ranks are injected and base and
adapters train together for `prelora.warmup` epochs, then the base freezes. With
`prelora.switch_at_epoch` the switch is at the end of that epoch and Algorithm 1 is not asked (ranks
still from Algorithm 2 over the windows ending there). Settings: `prelora.*`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prelora_ray import fork
from prelora_ray import metrics as M
from prelora_ray.config import TrainSettings
from prelora_ray.monitor import ConvergenceMonitor
from prelora_ray.strategies.base import POST_SWITCH_OPTIM_KEYS, Strategy, TrunkFork
from prelora_ray.switch import Phase, inject_lora, set_trainable, unwrap

if TYPE_CHECKING:
    from prelora_ray.trainer import TrainingLoop

log = logging.getLogger("prelora_ray")


@dataclass(kw_only=True)
class PreLoRAState:
    """The switch's progress (checkpointed with the strategy; the monitor's windows go beside it)."""

    switch_epoch: int = -1  # epoch at whose end (or during which, step windows) LoRA went in
    freeze_epoch: int = -1  # epoch at whose end the base froze
    ranks: dict[str, list[int]] = field(default_factory=dict)
    decisions: list[dict[str, Any]] = field(default_factory=list)  # per-worker switch decisions


class PreLoRA(Strategy):
    """Full training until the partial-convergence test passes, then per-layer LoRA, warmup, freeze."""

    name = "prelora"
    section = "prelora"
    uses = ("prelora",)
    fork_mode = "fork"  # from the trunk's checkpoint at its switch epoch, replayed on the trunk's history
    fork_keys_text = "prelora.* (not window_unit), optim.lora_lr or optim.carry_optimizer_state"
    state_class: type[PreLoRAState] = PreLoRAState

    @classmethod
    def _acts_after_fork(cls, key: str) -> bool:
        """prelora.* (window_unit excepted) decides or shapes the switch; the LoRA optimizer keys act after it."""
        return (key.startswith("prelora.") and key != "prelora.window_unit") or key in POST_SWITCH_OPTIM_KEYS

    @classmethod
    def fork_problem(cls, cfg: TrainSettings) -> str | None:
        """Step windows need each step's loss, and the trunk records one snapshot per epoch."""
        if cfg.prelora.window_unit != "epoch":
            return "prelora.window_unit: is 'step': the trunk records one snapshot per epoch; use epoch or fork: false"
        return None

    @classmethod
    def trunk_fork(cls, cfg: TrainSettings, history: Sequence[dict[str, Any]]) -> TrunkFork | None:
        """Algorithm 1 and 2 replayed on the trunk's history: fork at the switch epoch s (a checkpoint c <= s + 1), or the
        trunk's result when the test never passes on the whole trunk."""
        switch = fork.replay_for(cfg, history)
        if switch is None:
            if len(history) >= cfg.epochs:
                return TrunkFork(mode="trunk", why="never switches: the convergence test never passes on the trunk")
            return None
        return TrunkFork(mode="fork", until=switch.epoch + 1, switch=switch)

    def __init__(self, cfg: TrainSettings) -> None:
        super().__init__(cfg)
        self.settings = cfg.prelora
        self.state = self.state_class()
        self.monitor = ConvergenceMonitor(k=self.settings.k, m=self.settings.m, window_stat=self.settings.window_stat)

    @property
    def step_losses(self) -> bool:
        """Step windows record each step's loss."""
        return self.settings.window_unit == "step"

    def prepare(self, loop: TrainingLoop, phase: Phase) -> None:
        """After the switch, re-inject LoRA with the recorded ranks (A is loaded next), then set requires_grad."""
        if phase is not Phase.FULL:
            loop.model = inject_lora(unwrap(loop.wrapped), self.state.ranks, self.settings, seed=0)
        set_trainable(loop.model, phase, self.settings)

    # -- the hooks: record a window unit, maybe switch; freeze w epochs after the switch --------------
    def after_step(self, loop: TrainingLoop, loss: float | None) -> None:
        """Step windows: one window unit per optimizer step."""
        if self.step_losses:
            self._after_unit(loop, loss)

    def after_train_pass(self, loop: TrainingLoop, loss: float | None) -> None:
        """Epoch windows: one window unit per epoch."""
        if not self.step_losses:
            self._after_unit(loop, loss)

    def after_epoch(self, loop: TrainingLoop) -> None:
        """Freeze the base once the warmup's w epochs after the switch epoch are over."""
        if loop.state.phase is Phase.WARMUP and loop.state.epoch >= self.state.switch_epoch + self.settings.warmup:
            self._freeze(loop)

    def _after_unit(self, loop: TrainingLoop, loss: float | None) -> None:
        """Record one window unit (None: it is recorded already); at a boundary in the FULL phase, maybe switch."""
        if not self._measuring(loop.state.phase):
            return
        if loss is not None:
            self.monitor.record(loop.norms(), loss)
        at = self.settings.switch_at_epoch
        if at is not None:  # the switch epoch is given: Algorithm 1 is not asked
            if loop.state.epoch == at and self._switching_phase(loop.state.phase):
                self._switch(loop, self._decide(loop, forced=True)[1])
            return
        if self.monitor.at_boundary() and self._may_switch(loop):
            passed, ranks = self._decide(loop)
            if passed:
                self._switch(loop, ranks)

    def _measuring(self, phase: Phase) -> bool:
        """Whether Algorithm 1's windows record the units of `phase` (PreLoRA: FULL only)."""
        return phase is Phase.FULL

    def _switching_phase(self, phase: Phase) -> bool:
        """Whether the per-layer switch may happen in `phase` (PreLoRA: FULL)."""
        return phase is Phase.FULL

    def _may_switch(self, loop: TrainingLoop) -> bool:
        """Whether the test may run at this boundary (besides having k windows)."""
        return self._switching_phase(loop.state.phase) and loop.state.epoch >= self.settings.min_switch_epoch

    # -- measure -> decide -> apply ------------------------------------------------------------------
    def _decide(self, loop: TrainingLoop, *, forced: bool = False) -> tuple[bool, dict[str, list[int]]]:
        """Algorithm 1 (and 2 if it passes) at a window boundary; every worker gets rank 0's answer.

        `forced` (prelora.switch_at_epoch): passed without Algorithm 1, ranks from Algorithm 2 as usual.

        Weights are synchronized and losses all-reduced, so each worker's own decision should agree;
        the local decisions are gathered and kept as a check, and rank 0's is used.
        """
        p = self.settings
        passed = forced or self.monitor.passed(p.tau, p.zeta)
        ranks = (
            self.monitor.ranks(p.r_min, p.r_max, tie_rank=p.tie_rank, zero_rank_below=p.zero_rank_below)
            if passed
            else {}
        )
        local = {"passed": passed, "ranks": ranks}
        if loop.runtime.world_size > 1:
            gathered = loop.runtime.all_gather_object(local)
            if passed or any(d["passed"] for d in gathered):
                self.state.decisions.append({"epoch": loop.state.epoch, "workers": gathered})
                if any(d != gathered[0] for d in gathered):
                    log.warning("workers disagreed on the switch decision; using rank 0's: %s", gathered)
            local = gathered[0]
        elif passed:
            self.state.decisions.append({"epoch": loop.state.epoch, "workers": [local]})
        return local["passed"], local["ranks"]

    def _switch(self, loop: TrainingLoop, ranks: dict[str, list[int]]) -> None:
        """Inject LoRA with the assigned ranks; base and LoRA train together (WARMUP)."""
        loop.model = inject_lora(unwrap(loop.wrapped), ranks, self.settings, seed=self._adapter_seed(loop.state.epoch))
        set_trainable(loop.model, Phase.WARMUP, self.settings)
        loop.state.phase = Phase.WARMUP
        self.state.ranks, self.state.switch_epoch = ranks, loop.state.epoch
        loop.rebuild()
        if loop.runtime.rank == 0:
            why = (
                "prelora.switch_at_epoch"
                if self.settings.switch_at_epoch is not None
                else "partial convergence test passed"
            )
            log.info("epoch %d: %s; LoRA injected with ranks %s", loop.state.epoch, why, ranks)
        loop.sink.log_dict(
            {"switch_epoch": self.state.switch_epoch, "ranks": ranks, "decisions": self.state.decisions}, "ranks.json"
        )

    def _adapter_seed(self, epoch: int) -> int:
        """Seed of the adapters' initial A: from the run's seed and the switch epoch, not the training's RNG stream."""
        return (self.cfg.seed * 1_000_003 + epoch * 7919 + 17) % 2**63

    def _freeze(self, loop: TrainingLoop) -> None:
        """Freeze the base: only LoRA (and the configured groups) train from here (LORA)."""
        set_trainable(loop.model, Phase.LORA, self.settings)
        loop.state.phase, self.state.freeze_epoch = Phase.LORA, loop.state.epoch
        loop.rebuild()
        if loop.runtime.rank == 0:
            log.info("epoch %d: base frozen; %s", loop.state.epoch, loop.trainable_text())

    # -- reports and checkpoints -----------------------------------------------------------------
    def event_metrics(self) -> dict[str, Any]:
        """The switch and freeze epochs (-1 before they happen)."""
        return {M.SWITCH_EPOCH: self.state.switch_epoch, M.FREEZE_EPOCH: self.state.freeze_epoch}

    def summary(self) -> dict[str, Any]:
        """Switch and freeze epochs and the ranks."""
        return {
            "switch_epoch": self.state.switch_epoch,
            "freeze_epoch": self.state.freeze_epoch,
            "ranks": self.state.ranks,
        }

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """Per-worker switch decisions (at boundaries where some worker passed)."""
        return self.state.decisions

    def state_dict(self) -> dict[str, Any]:
        """The switch's progress and the monitor's windows."""
        return {**dataclasses.asdict(self.state), "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict."""
        state = dict(state)
        self.monitor.load_state_dict(state.pop("monitor"))
        self.state = self.state_class(**state)

    def fork_state(self, snapshots: list[tuple[dict[str, list[float]], float]], start: int) -> dict[str, Any]:
        """No switch yet, and Algorithm 1's windows rebuilt from the trunk's per-epoch snapshots before `start`.

        So the test runs at the same epochs with the same input as in a run of this config from scratch.
        """
        p = self.settings
        window = [
            ({f: norms[f] for f in p.modules}, loss) for norms, loss in snapshots[max(0, start - p.k * p.m) : start]
        ]
        return {
            **dataclasses.asdict(self.state_class()),
            "monitor": {"snapshots": window, "units": start, "k": p.k, "m": p.m},
        }
