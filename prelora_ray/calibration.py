"""In-process calibration: the run's own training step against full training of the same model, on its own device.

In an epoch whose phase is not FULL, `calibration.rounds` rounds, spread evenly over the epoch's steps, each run
just before a training step on that step's batch, time two steps in the order A, B, B, A: the run's own (A: the
parameters its phase trains) and full training's (B: every base weight requires grad, every adapter out of the
forward: the plain ViT the baseline trains). Each is a forward, a backward, the loop's gradient clipping and an
AdamW step, the last on scratch copies of the parameters and of their moments: nothing of the run is updated, the
gradients it holds are put back, requires_grad is restored exactly and the RNG streams (dropout) are forked, so
its results are the same (`==`) with calibration on or off. The time spent is taken out of `epoch_time_s`.
prelora_ray/speedup.py turns the rounds into the epoch's and the run's numbers.

Left out of both steps: data loading and the host-to-device copy, the loss bookkeeping, the strategy's hooks
(ReLoRA's and LTE's merges, the switch itself) and the gradient all-reduce of several workers (each worker
measures on its own model, unwrapped from DDP). On CPU the timer is the loop's clock (`time.perf_counter`, or a
clock a test injects); on CUDA, CUDA events around each step, read after a synchronize: the device's step time,
as the paper's per-epoch times are.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from prelora_ray import metrics as M
from prelora_ray import speedup
from prelora_ray.adapters.model import adapters_bypassed, unwrap
from prelora_ray.adapters.names import is_adapter_param
from prelora_ray.strategies.phases import FULL, Phase

if TYPE_CHECKING:
    from prelora_ray.config import CalibrationSettings
    from prelora_ray.trainer import TrainingLoop

__all__ = ["Calibration", "round_steps"]


def round_steps(steps: int, rounds: int) -> dict[int, int]:
    """Step index -> rounds taken before it: `rounds` spread evenly over an epoch of `steps` (midpoints of equal
    slices; several at one step when there are more rounds than steps)."""
    if steps < 1 or rounds < 1:
        return {}
    return dict(collections.Counter((2 * j + 1) * steps // (2 * rounds) for j in range(rounds)))


class Calibration:
    """The loop's calibration: which steps of an epoch measure, the measuring, and the epoch's metrics."""

    def __init__(
        self,
        settings: CalibrationSettings,
        device: torch.device,
        clock: Callable[[], float],
        timer: Callable[[], float] | None = None,
    ) -> None:
        """`clock`: the loop's wall clock (what calibration takes out of the epoch's time). `timer`: what times each
        step (synchronized on CUDA); None: `step_timer`'s."""
        self.settings, self.device, self.clock, self.timer = settings, device, clock, timer
        self.peak_bytes = 0  # CUDA: the epoch's peak allocation before each measurement (they reset it)

    def plan(self, phase: Phase, history: Sequence[dict[str, Any]], steps: int) -> dict[int, int]:
        """The rounds of the epoch about to run (step index -> rounds): none in FULL, in an epoch that repeats the
        last measurement (`calibration.every`) or with calibration off."""
        if phase is FULL or self.settings.rounds == 0:
            return {}
        earlier = sum(1 for record in history if record.get(M.PHASE) == phase.value)
        if earlier % self.settings.every:
            return {}
        return round_steps(steps, self.settings.rounds)

    def epoch_metrics(
        self, phase: Phase, history: Sequence[dict[str, Any]], ratios: list[float], spent: float
    ) -> dict[str, float]:
        """The epoch's step_speedup (lo, hi) and calibration_time_s: FULL 1; measured; or the last of its phase."""
        out = {M.CALIBRATION_TIME_S: spent}
        if phase is FULL:
            return {**speedup.full_epoch(), **out}
        if ratios:
            return {**speedup.epoch_speedup(ratios), **out}
        last = next((r for r in reversed(history) if r.get(M.PHASE) == phase.value and M.STEP_SPEEDUP in r), None)
        if last is None:
            return {**speedup.epoch_speedup([]), **out}
        return {**{k: float(last[k]) for k in speedup.KEYS}, **out}

    def measure(
        self, loop: TrainingLoop, images: torch.Tensor, labels: torch.Tensor, rounds: int
    ) -> tuple[list[float], float]:
        """`rounds` rounds on this batch: each round's ratio, and the wall time they took (on the loop's clock)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device))
        start = self.clock()
        steps = _Steps(loop, images, labels)  # changes nothing of the loop's
        ratios = []
        try:
            with torch.random.fork_rng(devices=[self.device] if cuda else []):
                for _ in range(rounds):
                    times = [self._timed(steps, full) for full in (False, True, True, False)]
                    if cuda:
                        torch.cuda.synchronize(self.device)
                    ratios.append(speedup.round_ratio(*(t() for t in times)))
        finally:
            steps.restore()
        del steps
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return ratios, self.clock() - start

    def _timed(self, steps: _Steps, full: bool) -> Callable[[], float]:
        """One step (`full`: full training's, else the run's own); a function that gives its time (on CUDA once the
        round is synchronized)."""
        steps.prepare(full)
        with adapters_bypassed(steps.model) if full else contextlib.nullcontext():
            timer = self.timer or step_timer(self.device)
            if timer is None:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                steps.step(full)
                end.record()
                steps.clear()
                return lambda: begin.elapsed_time(end) / 1000.0
            t0 = timer()
            steps.step(full)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = timer() - t0
        steps.clear()
        return lambda: elapsed

    def peak_mb(self, measured_mb: float) -> float:
        """The epoch's CUDA peak with calibration left out (the peak before each measurement, and since the last)."""
        return max(measured_mb, self.peak_bytes / 2**20) if self.device.type == "cuda" else measured_mb

    def start_epoch(self) -> None:
        """A new epoch's peak-memory bookkeeping."""
        self.peak_bytes = 0


def step_timer(device: torch.device) -> Callable[[], float] | None:
    """What times a step unless a timer is given: None on CUDA (CUDA events); on CPU the calling thread's CPU time
    when torch computes on that thread alone (torch.get_num_threads() == 1: forward and backward run there), which
    time slices given to other processes do not inflate; else the wall clock (time.perf_counter)."""
    if device.type == "cuda":
        return None
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


class _Steps:
    """The two steps a round times, on one batch: the run's own and full training's, each a forward, a backward, the
    loop's gradient clipping and an AdamW step, the last on scratch copies of the parameters and their moments (one
    warm step first, so no state is created while timed). The model's own weights, gradients, requires_grad and
    optimizer are left as they were (`restore`)."""

    def __init__(self, loop: TrainingLoop, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.loop, self.images, self.labels = loop, images, labels
        self.model = unwrap(loop.wrapped)
        named = list(self.model.named_parameters())
        self.params = [p for _, p in named]
        self.own = [p.requires_grad for p in self.params]
        self.full = [not is_adapter_param(name) for name, _ in named]  # every base weight; adapters out of the forward
        self.grads = [p.grad for p in self.params]
        self.scale = loop.strategy.loss_scale(loop.state.phase)
        # scratch copies in the loop's groups (decay, no decay, adapters), with a step of zero gradients taken
        groups = loop._param_groups(every=True)
        copies = {p: p.detach().clone() for p in self.params}
        for group in groups:
            group["params"] = [copies[p] for p in group["params"]]
        self.copies = [copies[p] for p in self.params]
        self.optimizer = loop.new_optimizer(groups)
        for copy in self.copies:
            copy.grad = torch.zeros_like(copy)
        self.optimizer.step()
        for copy in self.copies:
            copy.grad = None

    def prepare(self, full: bool) -> None:
        """requires_grad of the step's parameters; no gradient anywhere."""
        for p, wants in zip(self.params, self.full if full else self.own, strict=True):
            p.requires_grad_(wants)
        self.clear()

    def step(self, full: bool) -> None:
        """Forward, backward, clipping and the optimizer step on the copies: what the loop does but the update."""
        loop = self.loop
        with torch.autocast(loop.device.type, dtype=torch.bfloat16, enabled=loop.autocast):
            loss = loop.loss_fn(self.model(pixel_values=self.images).logits.float(), self.labels)
        scale = 1.0 if full else self.scale
        (loss if scale == 1.0 else loss * scale).backward()
        max_norm = loop.cfg.optim.grad_clip
        if max_norm is not None:
            if full:  # full training's: the norm of every gradient together (Strategy.clip_gradients)
                torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], max_norm)
            else:  # the run's own (on the gradients just computed: the loop's optimizer holds the same parameters)
                loop.strategy.clip_gradients(loop, max_norm)
        for p, copy in zip(self.params, self.copies, strict=True):
            copy.grad = p.grad
        self.optimizer.step()

    def clear(self) -> None:
        """No gradient on the model or the copies."""
        for p, copy in zip(self.params, self.copies, strict=True):
            p.grad = None
            copy.grad = None

    def restore(self) -> None:
        """requires_grad and the gradients as the loop left them."""
        for p, wants, grad in zip(self.params, self.own, self.grads, strict=True):
            p.requires_grad_(wants)
            p.grad = grad
