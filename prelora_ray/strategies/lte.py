"""`strategy: lte` (LoRA-the-Explorer, Huh et al. 2024): FULL for `lte.start_epoch` epochs, then LTE.

In LTE the base weights of the target families (`prelora.modules`) are frozen; each worker trains
`lte.heads_per_worker` LoRA heads per target linear, head h on chunk h of the worker's batch, with no
per-step gradient all-reduce (no DDP). Every `lte.merge_every` optimizer steps, and at the end of
every epoch before validation (the eval forward is the base alone, which is stale between merges),
the heads merge: W += the mean over all heads of all workers of δ_h = s·(B_h·A_h − B_h^prev·A_h^prev),
and prev ← current, in ONE all-reduce (with `lte.train_others: averaged`, the other trainable
parameters' values ride in the same buffer and are averaged). A, B and the AdamW moments are kept.

The loss each head's gradient comes from is the mean over its own chunk (the worker's mean loss times
H), so one worker emulating H heads trains each head as H workers with one head each would (except
for `optim.grad_clip`, which clips the norm over all of a worker's heads together, and `averaged`
others, which one worker shares between its heads). The epoch's `epoch_time_s` excludes the
end-of-epoch merge (it runs in `after_train_pass`, after the timer stops); the step merges are in it.
Checkpoints hold every worker's heads and optimizer state (`worker_state`): between merges they
differ, and even right after one their A, B and moments do. See docs/algorithms.md, "LTE".

Declared here: the section `lte`, the phase LTE (4) and what trains in it, the metric `lte_merges` and
the summary line. The heads themselves are `prelora_ray.adapters.lte`, imported inside the hooks
(config.py imports this file before torch).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prelora_ray.adapters.names import is_adapted_base_weight, is_head_param, is_head_state
from prelora_ray.fields import check, setting
from prelora_ray.strategies.base import Strategy
from prelora_ray.strategies.phases import FULL, Phase

if TYPE_CHECKING:
    import torch

    from prelora_ray.config import TrainSettings
    from prelora_ray.trainer import TrainingLoop

log = logging.getLogger("prelora_ray")

LTE_MERGES = "lte_merges"
"""Metric: merges of the heads into the base so far, cumulative per epoch."""


@dataclass(kw_only=True)
class LTESettings:
    """`strategy: lte` (LoRA-the-Explorer): parallel LoRA heads, merged into the frozen base every T steps."""

    heads_per_worker: int = setting(
        1,
        "LoRA heads each worker trains, each on its own equal chunk of the worker's batch (heads in all: this x "
        "cluster.num_workers).",
    )
    rank: int = setting(8, "Rank r of every head on the target families (prelora.modules).")
    alpha: float = setting(32.0, "Head scale s = alpha / rank (the reference: r = 32, alpha = 4096 on ViT-S).")
    merge_every: int = setting(
        6,
        "T: optimizer steps between merges (W += the mean head delta over all heads, one all-reduce); every epoch "
        "also ends with one, before validation (6 divides the 12 steps of a 2-worker digits epoch: one merge per 6 "
        "steps).",
    )
    start_epoch: int = setting(0, "Full-training epochs before LTE starts (0: LTE from scratch, as the paper).")
    train_others: str = setting(
        "averaged",
        "Parameters without heads (norms, embeddings, biases, classifier): averaged (train locally, averaged at each "
        "merge) or frozen (the reference's ViT example).",
    )

    def __post_init__(self) -> None:
        check(
            isinstance(self.heads_per_worker, int) and self.heads_per_worker >= 1,
            "lte.heads_per_worker",
            self.heads_per_worker,
            "an integer >= 1",
        )
        check(isinstance(self.rank, int) and self.rank >= 1, "lte.rank", self.rank, "an integer >= 1")
        check(self.alpha > 0, "lte.alpha", self.alpha, "a number > 0")
        check(
            isinstance(self.merge_every, int) and self.merge_every >= 1,
            "lte.merge_every",
            self.merge_every,
            "an integer >= 1 (optimizer steps)",
        )
        check(
            isinstance(self.start_epoch, int) and self.start_epoch >= 0,
            "lte.start_epoch",
            self.start_epoch,
            "an integer >= 0",
        )
        check(self.train_others in ("averaged", "frozen"), "lte.train_others", self.train_others, "averaged or frozen")


def _lte_trains(name: str, settings: LTESettings) -> bool:
    """LTE: the heads; the headed linears' weights never (they move only at merges); the rest iff `averaged`."""
    return is_head_param(name) or (settings.train_others == "averaged" and not is_adapted_base_weight(name))


LTE_PHASE = Phase.declare("lte", 4, trains=_lte_trains)
"""Parallel heads on the frozen target linears, merged every `lte.merge_every` steps."""


@dataclass(kw_only=True)
class LTEState:
    """The merges so far and the steps since the last one (checkpointed with the strategy)."""

    lte_merges: int = 0  # metric LTE_MERGES
    since_merge: int = 0  # optimizer steps of LTE since the last merge


class LTE(Strategy):
    """Parallel LoRA heads on every worker, merged into the frozen base every T steps (reset-less)."""

    name = "lte"
    description = "LoRA-the-Explorer: parallel heads merged every lte.merge_every steps"
    section = "lte"
    section_class = LTESettings
    section_doc = "The heads and merges of strategy lte."
    uses = ("prelora", "lte")  # prelora.modules: the families that get heads
    phases = (FULL, LTE_PHASE)
    metrics = {LTE_MERGES: 0}

    @classmethod
    def check_config(cls, cfg: TrainSettings) -> None:
        """LTE must start within the run, and each head needs an equal chunk of the batch."""
        check(cfg.lte.start_epoch < cfg.epochs, "lte.start_epoch", cfg.lte.start_epoch, f"< epochs ({cfg.epochs})")
        check(
            cfg.data.batch_size % cfg.lte.heads_per_worker == 0,
            "data.batch_size",
            cfg.data.batch_size,
            f"a multiple of lte.heads_per_worker ({cfg.lte.heads_per_worker}): each head trains on an equal chunk of "
            "the batch",
        )

    @classmethod
    def summary_line(cls, summary: dict[str, Any]) -> str:
        """How many merges the heads made (as the last epoch reported them)."""
        merges = (summary.get("history") or [{}])[-1].get(LTE_MERGES)
        if merges is None:
            return "no switch (full training throughout)"
        return f"strategy lte: {merges} merges of the heads into the base"

    def __init__(self, cfg: TrainSettings) -> None:
        super().__init__(cfg)
        self.settings = cfg.lte
        self.state = LTEState()

    # -- how the loop runs the LTE phase -------------------------------------------------------------
    def sync_gradients(self, phase: Phase) -> bool:
        """No DDP in LTE: the workers meet only at merges."""
        return phase is not LTE_PHASE

    def loss_scale(self, phase: Phase) -> float:
        """H: each head's gradient is that of its own chunk's mean loss, as one head per worker would get."""
        return float(self.settings.heads_per_worker) if phase is LTE_PHASE else 1.0

    @property
    def drop_last(self) -> bool:
        """A last short batch cannot be cut into H equal chunks."""
        return self.settings.heads_per_worker > 1

    # -- which parameters train ----------------------------------------------------------------------
    def prepare(self, loop: TrainingLoop, phase: Phase) -> None:
        """LTE: inject the heads (their A and B are loaded next on a resume); a fresh start at `start_epoch` 0 is
        LTE at once."""
        if phase is LTE_PHASE:
            self._inject(loop)
        elif loop.state.epoch == 0 and self.settings.start_epoch == 0:
            self._enter(loop, rebuild=False)
        else:
            super().prepare(loop, phase)

    def _inject(self, loop: TrainingLoop) -> None:
        """The heads on every target linear (this worker's share of the global head indices), heads trainable."""
        from prelora_ray.adapters.lte import inject_lte_heads
        from prelora_ray.adapters.model import set_trainable, unwrap

        s = self.settings
        model = unwrap(loop.wrapped)
        names = [n for family, layer_names in loop.family_names.items() for n in layer_names]
        inject_lte_heads(
            model,
            names,
            heads=s.heads_per_worker,
            rank=s.rank,
            scale=s.alpha / s.rank,
            seed=self.cfg.seed,
            first_head=loop.runtime.rank * s.heads_per_worker,
        )
        model.to(loop.device)
        set_trainable(model, LTE_PHASE, s)
        loop.model = loop.wrapped = model

    def _enter(self, loop: TrainingLoop, *, rebuild: bool = True) -> None:
        """Into LTE: the heads go in, the merge clock starts."""
        self._inject(loop)
        loop.state.phase = LTE_PHASE
        self.state.since_merge = 0
        if rebuild:
            loop.rebuild()
        if loop.runtime.rank == 0:
            s = self.settings
            heads = s.heads_per_worker * loop.runtime.world_size
            log.info(
                "epoch %d: LTE, %d heads of rank %d (scale %g), merged every %d steps; %s",
                loop.state.epoch,
                heads,
                s.rank,
                s.alpha / s.rank,
                s.merge_every,
                loop.trainable_text(),
            )

    # -- hooks ---------------------------------------------------------------------------------------
    def after_step(self, loop: TrainingLoop, loss: float | None) -> None:
        """Merge every `merge_every` LTE steps."""
        if loop.state.phase is LTE_PHASE:
            self.state.since_merge += 1
            if self.state.since_merge >= self.settings.merge_every:
                self.merge(loop)

    def after_train_pass(self, loop: TrainingLoop, loss: float | None) -> None:
        """Merge what the heads learned since the last merge, so validation (the base alone) is current."""
        if loop.state.phase is LTE_PHASE and self.state.since_merge > 0:
            self.merge(loop)

    def after_epoch(self, loop: TrainingLoop) -> None:
        """Enter LTE at the end of the epoch before `start_epoch`."""
        if loop.state.phase is FULL and loop.state.epoch + 1 == self.settings.start_epoch:
            self._enter(loop)

    def merge(self, loop: TrainingLoop) -> None:
        """W += the mean δ over all heads of all workers; prev ← current; the others averaged: one all-reduce."""
        import torch

        from prelora_ray.adapters.lte import apply_merge, local_mean_deltas

        with torch.no_grad():
            deltas = local_mean_deltas(loop.model)
            others = self._others(loop)
            means = loop.all_reduce_mean([*deltas, *(p.detach() for p in others)])
            apply_merge(loop.model, means[: len(deltas)])
            for param, mean in zip(others, means[len(deltas) :], strict=True):
                param.copy_(mean)
        self.state.lte_merges += 1
        self.state.since_merge = 0

    def _others(self, loop: TrainingLoop) -> list[torch.nn.Parameter]:
        """The trainable parameters that are not heads (`train_others: averaged`), in model order."""
        if self.settings.train_others != "averaged":
            return []
        return [p for n, p in loop.model.named_parameters() if p.requires_grad and not is_head_param(n)]

    # -- reports and checkpoints ---------------------------------------------------------------------
    def event_metrics(self) -> dict[str, Any]:
        """The base class's events (never) plus the cumulative merges."""
        return {**super().event_metrics(), LTE_MERGES: self.state.lte_merges}

    def state_dict(self) -> dict[str, Any]:
        """Merges so far and steps since the last."""
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of state_dict."""
        self.state = LTEState(**state)

    def fork_state(self, snapshots: list[tuple[dict[str, list[float]], float]], start: int) -> dict[str, Any]:
        """No merge yet."""
        return dataclasses.asdict(LTEState())

    def worker_state(self, loop: TrainingLoop) -> dict[str, Any] | None:
        """In LTE: this worker's heads (A, B and their prev copies) and its whole optimizer state."""
        if loop.state.phase is not LTE_PHASE:
            return None
        heads = {k: v.detach().cpu() for k, v in loop.model.state_dict().items() if is_head_state(k)}
        return {"rank": loop.runtime.rank, "model": heads, "optimizer": loop.optimizer.state_dict()}

    def check_worker_state(self, loop: TrainingLoop, worker: dict[str, Any] | None) -> None:
        """An LTE checkpoint must carry this worker's own heads (rank 0's would silently replace the others')."""
        from prelora_ray.adapters.lte import lte_modules

        if loop.state.phase is not LTE_PHASE:
            return
        if worker is None and loop.runtime.world_size > 1:
            raise ValueError(
                f"the LTE checkpoint has no heads of worker {loop.runtime.rank} (worker_rank{loop.runtime.rank}.pt): "
                "it was written by another number of workers or is incomplete"
            )
        if worker is not None and int(worker["rank"]) != loop.runtime.rank:
            raise ValueError(f"worker {loop.runtime.rank} got the LTE heads of worker {worker['rank']}")
        if len(lte_modules(loop.model)) == 0:
            raise ValueError("no LTE heads to load into")
