"""`strategy: lte` (LoRA-the-Explorer, Huh et al. 2024): FULL for `lte.start_epoch` epochs, then LTE.

In LTE the headed linears' base weights are frozen and `lte.num_heads` LoRA heads per headed linear
train in all, spread evenly over the workers (the algorithm depends on the heads, not on the cluster,
as in the reference where every process holds all `num_heads`), with no per-step gradient all-reduce
(no DDP). Worker r holds the heads g = r + W·l (l = 0, 1, ... its local heads, W workers) and its
loader orders each batch so that local head l's contiguous chunk holds the rows l, l + H/W, ... of the
batch its sampler drew: head g then sees the same samples whatever W (`data.ChunkedBatches`). The
merge, when the LTE optimizer-step clock reaches a multiple of `lte.merge_every` (counted across
epochs, as the reference's MergeCondition): W += the mean over all heads of all workers of
δ_h = s·(B_h·A_h − B_h^prev·A_h^prev), and prev ← current, in ONE all-reduce (with
`lte.train_others: averaged`, the other trainable parameters' values ride in the same buffer and are
averaged). A, B and the AdamW moments are kept. `lte.merge_at_epoch_end` adds a merge at every
epoch's end that restarts the count (the behaviour before issue 25). The last epoch ends with a
merge, so the final validation and the export hold everything the heads learned.

Validation between merges (`lte.validation`): `merged` adds the all-worker mean delta since the last
merge (and the averaged others' mean) for validation only and takes it out after (the clock and the
training are untouched); `base` evaluates the base as it stands, the reference's eval (stale since
the last merge).

`train_others`: `frozen` is the reference's ViT example: every linear has heads, the patch projection
(as a linear over patches) and the classifier included, and everything else stays frozen (position
embedding, class token, norm affines, every bias). `averaged` heads only `prelora.modules` and trains
the rest locally, averaged at merges (beyond the reference, which freezes those).

The loss each head's gradient comes from is the mean over its own chunk (the worker's mean loss times
its heads). With `optim.grad_clip`, each head's gradient is clipped on its own, as a head alone on a
worker would be; the averaged others' (the sum of the heads' shares) are divided by the worker's heads
(its batch mean) and clipped as one more group. Checkpoints hold every worker's heads and optimizer
state (`worker_state`): between merges they differ, and even right after one their A, B and moments
do. See docs/algorithms.md, "LTE".

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
from prelora_ray.models import MODULE_FAMILIES
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

    num_heads: int = setting(
        2,
        "H: LoRA heads per headed linear in all, spread evenly over the workers (cluster.num_workers must divide "
        "it); each worker cuts its batch into its heads' equal chunks (the reference's num_heads; its ViT-S "
        "example: 32).",
    )
    rank: int = setting(8, "Rank r of every head (the reference's ViT-S example: 32).")
    alpha: float = setting(32.0, "Head scale s = alpha / rank (the reference: r = 32, alpha = 4096 on ViT-S).")
    merge_every: int = setting(
        6,
        "T: merge (W += the mean head delta over all heads, one all-reduce) when the LTE optimizer-step clock, "
        "counted across epochs, reaches a multiple of T, as the reference's lte/misc/merge.py (6: two merges per "
        "12-step epoch of 2 workers on digits).",
    )
    merge_at_epoch_end: bool = setting(
        False,
        "Also merge at the end of every epoch, before validation, and count the next T steps from there (the "
        "behaviour before issue 25); false: the reference's clock only.",
    )
    validation: str = setting(
        "merged",
        "What validation sees between merges: merged (the all-worker mean delta since the last merge added for "
        "validation only, then taken out: training and the clock untouched; one more all-reduce per epoch) or "
        "base (the base weights as they stand, the reference's eval: stale since the last merge).",
    )
    start_epoch: int = setting(0, "Full-training epochs before LTE starts (0: LTE from scratch, as the paper).")
    train_others: str = setting(
        "averaged",
        "averaged: heads on prelora.modules; the rest (norms, embeddings, biases, patch projection, classifier) "
        "trains locally and is averaged at each merge (beyond the reference, which freezes the embeddings, norm "
        "affines and biases). frozen: the reference's ViT example: every linear has heads, the patch projection and "
        "the classifier included; position embedding, class token, norm affines and biases stay frozen.",
    )

    def __post_init__(self) -> None:
        check(
            isinstance(self.num_heads, int) and self.num_heads >= 1, "lte.num_heads", self.num_heads, "an integer >= 1"
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
            isinstance(self.merge_at_epoch_end, bool),
            "lte.merge_at_epoch_end",
            self.merge_at_epoch_end,
            "true or false",
        )
        check(self.validation in ("merged", "base"), "lte.validation", self.validation, "merged or base")
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
"""Parallel heads on the frozen headed linears, merged every `lte.merge_every` steps."""


@dataclass(kw_only=True)
class LTEState:
    """The merges so far and the clock: LTE optimizer steps since the last merge (checkpointed with the strategy)."""

    lte_merges: int = 0  # metric LTE_MERGES
    since_merge: int = 0  # never reset at an epoch's end (unless lte.merge_at_epoch_end)


class LTE(Strategy):
    """Parallel LoRA heads spread over the workers, merged into the frozen base every T steps (reset-less)."""

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
        """LTE must start within the run, the workers share the heads equally, each head gets an equal chunk of its
        worker's batch, and `frozen` heads every linear (as the reference)."""
        s = cfg.lte
        check(s.start_epoch < cfg.epochs, "lte.start_epoch", s.start_epoch, f"< epochs ({cfg.epochs})")
        workers = cfg.cluster.num_workers
        check(
            s.num_heads % workers == 0,
            "lte.num_heads",
            s.num_heads,
            f"a multiple of cluster.num_workers ({workers}): every worker trains an equal share of the heads",
        )
        local = s.num_heads // workers
        check(
            cfg.data.batch_size % local == 0,
            "data.batch_size",
            cfg.data.batch_size,
            f"a multiple of lte.num_heads / cluster.num_workers ({local} heads per worker): each head trains on an "
            "equal chunk of its worker's batch",
        )
        check(
            s.train_others != "frozen" or set(cfg.prelora.modules) == set(MODULE_FAMILIES),
            "prelora.modules",
            list(cfg.prelora.modules),
            f"all of {', '.join(MODULE_FAMILIES)} with lte.train_others=frozen (the reference heads every linear)",
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
        self.local_heads = 0  # this worker's share of lte.num_heads, set when the heads go in
        self._validating: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # weights to restore

    def local_share(self, world_size: int) -> int:
        """Heads per worker: lte.num_heads / the workers (refused before the run when it does not divide)."""
        heads = self.settings.num_heads
        if heads % world_size:
            raise ValueError(
                f"lte.num_heads={heads} is invalid: a multiple of the workers ({world_size}): every worker trains an "
                "equal share of the heads"
            )
        return heads // world_size

    # -- how the loop runs the LTE phase -------------------------------------------------------------
    def sync_gradients(self, phase: Phase) -> bool:
        """No DDP in LTE: the workers meet only at merges."""
        return phase is not LTE_PHASE

    def loss_scale(self, phase: Phase) -> float:
        """The worker's heads: each head's gradient is that of its own chunk's mean loss, as a head alone would get."""
        return float(self.local_heads) if phase is LTE_PHASE else 1.0

    def batch_chunks(self, world_size: int) -> int:
        """The worker's heads: each batch is cut into one equal chunk per head (a last short batch is dropped)."""
        return self.local_share(world_size)

    def clip_gradients(self, loop: TrainingLoop, max_norm: float) -> None:
        """LTE: each head clipped on its own; the averaged others on their batch-mean gradient, as one group."""
        if loop.state.phase is not LTE_PHASE:
            super().clip_gradients(loop, max_norm)
            return
        import torch

        from prelora_ray.adapters.lte import clip_per_head

        clip_per_head(loop.model, max_norm)
        others = [p for p in self._others(loop) if p.grad is not None]
        if others:
            with torch.no_grad():
                for param in others:  # the sum of the heads' chunk means: back to the worker's batch mean
                    param.grad.div_(self.local_heads)
            torch.nn.utils.clip_grad_norm_(others, max_norm)

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
        """This worker's heads (global indices r + W·l) on every headed linear, heads trainable."""
        from prelora_ray.adapters.lte import every_linear, inject_lte_heads
        from prelora_ray.adapters.model import set_trainable, unwrap

        s = self.settings
        model = unwrap(loop.wrapped)
        rank, workers = loop.runtime.rank, loop.runtime.world_size
        self.local_heads = self.local_share(workers)
        if s.train_others == "frozen":  # the reference's ViT example: every linear, patch projection and classifier
            names = every_linear(model)
        else:
            names = [n for family, layer_names in loop.family_names.items() for n in layer_names]
        inject_lte_heads(
            model,
            names,
            rank=s.rank,
            scale=s.alpha / s.rank,
            seed=self.cfg.seed,
            global_heads=[rank + workers * local for local in range(self.local_heads)],
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
            log.info(
                "epoch %d: LTE, %d heads (%d per worker) of rank %d (scale %g), merged every %d steps; %s",
                loop.state.epoch,
                s.num_heads,
                self.local_heads,
                s.rank,
                s.alpha / s.rank,
                s.merge_every,
                loop.trainable_text(),
            )

    # -- hooks ---------------------------------------------------------------------------------------
    def after_step(self, loop: TrainingLoop, loss: float | None) -> None:
        """Merge when the clock reaches a multiple of T (the count goes on across epochs)."""
        if loop.state.phase is LTE_PHASE:
            self.state.since_merge += 1
            if self.state.since_merge >= self.settings.merge_every:
                self.merge(loop)

    def after_train_pass(self, loop: TrainingLoop, loss: float | None) -> None:
        """Steps since the last merge: merged at the run's end (or every epoch's, `merge_at_epoch_end`); else, with
        `validation: merged`, their mean delta is added for validation and taken out in `after_epoch`."""
        if loop.state.phase is not LTE_PHASE or self.state.since_merge == 0:
            return
        if self.settings.merge_at_epoch_end or loop.state.epoch + 1 >= self.cfg.epochs:
            self.merge(loop)
        elif self.settings.validation == "merged":
            self._merged_for_validation(loop)

    def after_epoch(self, loop: TrainingLoop) -> None:
        """Take out what validation added; enter LTE at the end of the epoch before `start_epoch`."""
        if self._validating is not None:
            self._restore(loop)
        if loop.state.phase is FULL and loop.state.epoch + 1 == self.settings.start_epoch:
            self._enter(loop)

    def merge(self, loop: TrainingLoop) -> None:
        """W += the mean δ over all heads of all workers; prev ← current; the others averaged: one all-reduce."""
        import torch

        from prelora_ray.adapters.lte import apply_merge

        with torch.no_grad():
            deltas, others = self._all_worker_means(loop)
            apply_merge(loop.model, deltas)
            for param, mean in zip(self._others(loop), others, strict=True):
                param.copy_(mean)
        self.state.lte_merges += 1
        self.state.since_merge = 0

    def _all_worker_means(self, loop: TrainingLoop) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The mean δ of every headed linear over all heads, and the averaged others' means: one all-reduce."""
        from prelora_ray.adapters.lte import local_mean_deltas

        deltas = local_mean_deltas(loop.model)
        means = loop.all_reduce_mean([*deltas, *(p.detach() for p in self._others(loop))])
        return means[: len(deltas)], means[len(deltas) :]

    def _merged_for_validation(self, loop: TrainingLoop) -> None:
        """The model as a merge now would leave it, heads, prev and the clock untouched (undone by `_restore`)."""
        import torch

        from prelora_ray.adapters.lte import add_to_base

        with torch.no_grad():
            deltas, means = self._all_worker_means(loop)
            weights = add_to_base(loop.model, deltas)
            others = [p.detach().clone() for p in self._others(loop)]
            for param, mean in zip(self._others(loop), means, strict=True):
                param.copy_(mean)
        self._validating = (weights, others)

    def _restore(self, loop: TrainingLoop) -> None:
        """The weights as they were before `_merged_for_validation`, exactly."""
        import torch

        from prelora_ray.adapters.lte import restore_base

        weights, others = self._validating
        self._validating = None
        with torch.no_grad():
            restore_base(loop.model, weights)
            for param, value in zip(self._others(loop), others, strict=True):
                param.copy_(value)

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
