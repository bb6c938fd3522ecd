"""What the training loop needs from its surroundings, and the plain single-process version.

The loop talks to a `Runtime` (device, rank, collectives, report + checkpoint) and a
`MetricsSink` (MLflow or nothing). Ray Train's version lives in `prelora_ray.orchestration`;
this module imports neither Ray nor MLflow.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
from torch import nn


class Runtime(Protocol):
    """Distributed context of one training worker."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module, *, sync: bool = True) -> nn.Module:
        """Move to the device and, with `sync`, wrap for data parallelism (re-called after every phase change).

        `sync=False`: no per-step gradient all-reduce (no DDP wrapper): the workers' models drift apart
        until the strategy synchronises them itself (LTE's merges).
        """

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a float64 vector over all workers."""

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean over all workers of each tensor (same shapes, one dtype), on their device, in ONE collective."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's object on every worker."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every worker's object, in rank order."""

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Report an epoch's metrics with a checkpoint of `state` (a torch.save-able dict).

        `state["worker"]`, when present, is this worker's own part (LTE heads differ between workers):
        a multi-worker runtime keeps every worker's, and `latest_checkpoint` gives each worker back its own.
        """

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The state of the last reported checkpoint to resume from, or None."""


class MetricsSink(Protocol):
    """Where rank 0 sends per-epoch metrics (MLflow in practice)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Numeric metrics of one epoch."""

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """A JSON artifact (e.g. the ranks)."""


class NullSink:
    """A sink that drops everything: training without tracking."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Drop."""

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """Drop."""


class LocalRuntime:
    """One process, no Ray: for tests, notebooks and a user's own loop.

    Checkpoints are kept in memory (deep copies); `stop_after_epoch` raises `StopTraining` after that
    epoch's report, which is how tests interrupt a run to resume it.
    """

    rank = 0
    world_size = 1

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        resume_from: dict[str, Any] | None = None,
        stop_after_epoch: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self._resume_from = resume_from
        self._stop_after_epoch = stop_after_epoch

    def prepare_model(self, model: nn.Module, *, sync: bool = True) -> nn.Module:
        """Move to the device (one worker: nothing to sync)."""
        return model.to(self.device)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Identity: one worker."""
        return values

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Identity: one worker."""
        return list(tensors)

    def broadcast_object(self, obj: Any) -> Any:
        """Identity: one worker."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """One worker's object."""
        return [obj]

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Keep the metrics and a deep copy of the checkpoint."""
        self.reports.append(dict(metrics))
        if state is not None:
            self.checkpoints.append(copy.deepcopy(state))
        if self._stop_after_epoch is not None and metrics.get("epoch") == self._stop_after_epoch:
            raise StopTraining(f"stopped after epoch {self._stop_after_epoch}")

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The state given as resume_from."""
        return self._resume_from


class StopTraining(RuntimeError):
    """Raised by LocalRuntime to interrupt a run on purpose."""
