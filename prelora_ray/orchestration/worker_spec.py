"""What a training worker is given (the driver builds it, Ray carries it, the worker reads it): typed, so that the
fields passed between the driver's modules and the worker are named in one place. Plain data: it pickles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TrunkRecords:
    """The run is a sweep's trunk: it records its history, and a fork checkpoint every `every` epochs, in `folder`."""

    folder: str  # a storage location's URI (prelora_ray.storage)
    every: int


@dataclass(frozen=True, kw_only=True)
class ForkFrom:
    """The run forks from the trunk in `folder`: it starts from `checkpoint`, the state at the start of `epoch`.

    `reseed`: a repeat (`repeats:`), whose RNGs restart from its own seed after the fork (trainer.ForkStart)."""

    folder: str
    checkpoint: str
    epoch: int
    reseed: bool = False


@dataclass(frozen=True, kw_only=True)
class WorkerSpec:
    """One run's worker: its settings, MLflow run, export folder, faults to inject, console, and where it starts."""

    settings: dict[str, Any]  # TrainSettings.to_dict(): what the worker rebuilds its settings from
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    export_dir: str | None = None  # where rank 0 saves the merged model (a storage location's URI)
    fault: dict[str, str] = field(default_factory=dict)  # the driver's PRELORA_FAULT_* variables (tests)
    verbose: bool = False  # Ray Train's per-report dumps and the progress bars
    progress: bool = True  # our line per epoch
    start: TrunkRecords | ForkFrom | None = None  # None: from scratch (or its own last checkpoint)
