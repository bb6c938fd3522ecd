"""`strategy: prelora`: FULL -> (Algorithm 1 passes) -> WARMUP for w epochs -> LORA (section 3.3).

Algorithm 1 runs at window boundaries of the FULL phase (epochs, or optimizer steps with
`prelora.window_unit: step`); when it passes, Algorithm 2's per-layer ranks are injected and base and
adapters train together for `prelora.warmup` epochs, then the base freezes. With
`prelora.switch_at_epoch` the switch is at the end of that epoch and Algorithm 1 is not asked (ranks
still from Algorithm 2 over the windows ending there). See docs/algorithms.md, "Algorithm 1" and
"Algorithm 2".

Everything about the strategy is here: its section `prelora` (read by relora_prelora and lte too: the
target families), its phases WARMUP (1) and LORA (2) and what trains in each, its summary line, where
its trials fork, and the hooks. The torch side (`prelora_ray.adapters`) is imported inside the hooks:
config.py imports this file before torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prelora_ray import fork
from prelora_ray import metrics as M
from prelora_ray.adapters.names import is_adapter_param
from prelora_ray.algorithms import is_power_of_two
from prelora_ray.fields import check, setting
from prelora_ray.models import MODULE_FAMILIES, PARAM_GROUPS, in_param_group
from prelora_ray.monitor import ConvergenceMonitor
from prelora_ray.strategies.base import POST_SWITCH_OPTIM_KEYS, Strategy, TrunkFork
from prelora_ray.strategies.phases import FULL, Phase, train_all

if TYPE_CHECKING:
    from prelora_ray.config import TrainSettings
    from prelora_ray.trainer import TrainingLoop

log = logging.getLogger("prelora_ray")


@dataclass(kw_only=True)
class PreLoRASettings:
    """The switch: Algorithm 1's thresholds and windows, Algorithm 2's rank bounds, the warmup w."""

    tau: float = setting(1.0, "τ: max |% change| of each family's mean weight norm between consecutive windows.")
    zeta: float = setting(5.0, "ζ: max |% change| of the training loss between consecutive windows.")
    k: int = setting(3, "Number of windows the convergence test compares (k >= 2).")
    m: int = setting(2, "Window size, in window units (the paper: 3 epochs; 2 suits the 40-epoch digits default).")
    window_unit: str = setting("epoch", "Unit of m: epoch (the paper) or step (optimizer steps, for long epochs).")
    window_stat: str = setting("mean", "A window's value: mean of its m snapshots, or last (the window's end).")
    warmup: int = setting(3, "w: epochs base and LoRA train together after the test passes (the paper: 10 of 300).")
    r_min: int = setting(2, "Smallest LoRA rank (power of two; the paper: 8 on ViT-L).")
    r_max: int = setting(16, "Largest LoRA rank (power of two, >= r_min; the paper: 64 on ViT-L).")
    modules: tuple[str, ...] = setting(
        MODULE_FAMILIES, "Module families that get adapters: query, key, value, attn_out, mlp_in, mlp_out."
    )
    alpha_scale: float = setting(2.0, "lora_alpha = alpha_scale * rank for each layer (the paper: 2).")
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input (0: no copy of the activations is made).")
    tie_rank: str = setting(
        "min", "Rank of a family whose layers all changed equally: min (r_min, the paper's v=0), middle or max."
    )
    zero_rank_below: float | None = setting(
        None,
        "Beyond the paper: layers whose abs(ΔW) (percent) is below this get rank 0, no adapter, frozen (a family "
        "keeps at least its most-changed layer). None: off.",
    )
    trainable_after_freeze: tuple[str, ...] = setting(
        (), "Non-LoRA groups still trained after the freeze: head, norms, embeddings, biases (the paper: none)."
    )
    min_switch_epoch: int = setting(0, "Earliest epoch (0-based) at whose end the switch may happen.")
    switch_at_epoch: int | None = setting(
        None,
        "Switch at the end of this epoch (0-based) whatever Algorithm 1 says; ranks still from Algorithm 2 over the k "
        "windows ending there. None: off (Algorithm 1 decides).",
    )

    def __post_init__(self) -> None:
        self.modules = tuple(self.modules)
        self.trainable_after_freeze = tuple(self.trainable_after_freeze)
        check(self.tau > 0, "prelora.tau", self.tau, "a percentage > 0")
        check(self.zeta > 0, "prelora.zeta", self.zeta, "a percentage > 0")
        check(isinstance(self.k, int) and self.k >= 2, "prelora.k", self.k, "an integer >= 2")
        check(isinstance(self.m, int) and self.m >= 1, "prelora.m", self.m, "an integer >= 1")
        check(self.window_unit in ("epoch", "step"), "prelora.window_unit", self.window_unit, "epoch or step")
        check(self.window_stat in ("mean", "last"), "prelora.window_stat", self.window_stat, "mean or last")
        check(isinstance(self.warmup, int) and self.warmup >= 0, "prelora.warmup", self.warmup, "an integer >= 0")
        check(is_power_of_two(self.r_min), "prelora.r_min", self.r_min, "a power of two (1, 2, 4, 8, ...)")
        check(is_power_of_two(self.r_max), "prelora.r_max", self.r_max, "a power of two (1, 2, 4, 8, ...)")
        check(self.r_min <= self.r_max, "prelora.r_min", self.r_min, f"<= prelora.r_max ({self.r_max})")
        check(
            len(self.modules) > 0,
            "prelora.modules",
            list(self.modules),
            f"a non-empty list of {', '.join(MODULE_FAMILIES)}",
        )
        bad = [m for m in self.modules if m not in MODULE_FAMILIES]
        check(not bad, "prelora.modules", bad, f"module families from {', '.join(MODULE_FAMILIES)}")
        check(len(set(self.modules)) == len(self.modules), "prelora.modules", list(self.modules), "no family twice")
        check(self.alpha_scale > 0, "prelora.alpha_scale", self.alpha_scale, "a number > 0")
        check(0 <= self.lora_dropout < 1, "prelora.lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        check(self.tie_rank in ("min", "middle", "max"), "prelora.tie_rank", self.tie_rank, "min, middle or max")
        check(
            self.zero_rank_below is None or self.zero_rank_below >= 0,
            "prelora.zero_rank_below",
            self.zero_rank_below,
            "a percentage >= 0 or null",
        )
        bad = [g for g in self.trainable_after_freeze if g not in PARAM_GROUPS]
        check(not bad, "prelora.trainable_after_freeze", bad, f"groups from {', '.join(PARAM_GROUPS)}")
        check(self.min_switch_epoch >= 0, "prelora.min_switch_epoch", self.min_switch_epoch, "an integer >= 0")

    def check_with(self, cfg: TrainSettings) -> None:
        """`switch_at_epoch` against the run's length (whatever the strategy: a config never holds one out of range)."""
        at = self.switch_at_epoch
        if at is None:
            return
        lo, hi = switch_epoch_range(cfg)
        check(self.window_unit == "epoch", "prelora.switch_at_epoch", at, "only with prelora.window_unit=epoch")
        check(
            lo <= at <= hi,
            "prelora.switch_at_epoch",
            at,
            f"an epoch in [{lo}, {hi}]: Algorithm 2 needs k*m = {lo + 1} recorded epochs, and the warmup "
            f"(prelora.warmup={self.warmup}) and one LoRA epoch must fit in epochs={cfg.epochs}",
        )


def switch_epoch_range(cfg: TrainSettings) -> tuple[int, int]:
    """First and last epoch a switch can happen at: once k*m epochs are recorded (Algorithm 1 and 2 need
    k windows), and early enough for the warmup and at least one LoRA-only epoch (hi < lo: none)."""
    p = cfg.prelora
    return p.k * p.m - 1, cfg.epochs - 2 - p.warmup


def _lora_trains(name: str, settings: PreLoRASettings) -> bool:
    """LORA: the adapters, and the base parameters of the groups `trainable_after_freeze` keeps (the paper: none)."""
    return is_adapter_param(name) or any(in_param_group(name, g) for g in settings.trainable_after_freeze)


WARMUP = Phase.declare("warmup", 1, trains=train_all)
"""Base and LoRA train together for `prelora.warmup` epochs after the switch."""
LORA = Phase.declare("lora", 2, trains=_lora_trains)
"""The base frozen: only LoRA (and the groups `prelora.trainable_after_freeze` keeps) trains."""


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
    description = "full -> warmup -> LoRA"
    section = "prelora"
    section_class = PreLoRASettings
    section_doc = "The PreLoRA switch."
    uses = ("prelora",)
    phases = (FULL, WARMUP, LORA)
    fork_mode = "fork"  # from the trunk's checkpoint at its switch epoch, replayed on the trunk's history
    fork_keys_text = "prelora.* (not window_unit), optim.lora_lr or optim.carry_optimizer_state"
    switch_decision_keys = tuple(
        f"prelora.{k}"
        for k in ("tau", "zeta", "k", "m", "window_stat", "min_switch_epoch", "switch_at_epoch")
        + ("r_min", "r_max", "tie_rank", "zero_rank_below")
    )
    state_class: type[PreLoRAState] = PreLoRAState

    @classmethod
    def summary_line(cls, summary: dict[str, Any]) -> str:
        """The switch and freeze epochs and the ranks, or that the test never passed."""
        if summary.get(M.SWITCH_EPOCH, -1) >= 0:
            return (
                f"switch at epoch {summary[M.SWITCH_EPOCH]}, base frozen at epoch {summary[M.FREEZE_EPOCH]}; "
                f"ranks {json.dumps(summary.get(M.RANKS))}"
            )
        return "no switch (full training throughout)"

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
        """Algorithm 1 and 2 replayed on the trunk's history: fork at the switch epoch s (a checkpoint c <= s + 1),
        or the trunk's result when the test never passes on the whole trunk."""
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
        from prelora_ray.adapters.lora import inject_lora
        from prelora_ray.adapters.model import set_trainable, unwrap

        if phase is not FULL:
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
        if loop.state.phase is WARMUP and loop.state.epoch >= self.state.switch_epoch + self.settings.warmup:
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
        return phase is FULL

    def _switching_phase(self, phase: Phase) -> bool:
        """Whether the per-layer switch may happen in `phase` (PreLoRA: FULL)."""
        return phase is FULL

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
        from prelora_ray.adapters.lora import inject_lora
        from prelora_ray.adapters.model import set_trainable, unwrap

        loop.model = inject_lora(unwrap(loop.wrapped), ranks, self.settings, seed=self._adapter_seed(loop.state.epoch))
        set_trainable(loop.model, WARMUP, self.settings)
        loop.state.phase = WARMUP
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
        from prelora_ray.adapters.model import set_trainable

        set_trainable(loop.model, LORA, self.settings)
        loop.state.phase, self.state.freeze_epoch = LORA, loop.state.epoch
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
