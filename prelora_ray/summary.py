"""What a finished run leaves, typed: the summary the loop returns (`TrainingLoop.summary`, `trainer.train`), which
the worker completes and the driver logs to MLflow and returns (`prelora-ray train`, a sweep's trial).

A TypedDict, so that it stays the plain dict users already index (`summary["final_val_acc"]`) and that Ray pickles
between processes, while every key has one declared type and meaning here. No imports beyond typing.
"""

from __future__ import annotations

from typing import Any, TypedDict


class RunSummary(TypedDict, total=False):
    """One run's summary; keys are added by the loop, then the worker, then the driver."""

    # from the loop (fork.summarize over the history, and the strategy's switch)
    mean_epoch_time_s: float  # mean wall time of the run's epochs (a fork's include the trunk's before it)
    final_val_acc: float  # validation accuracy after the last epoch
    best_val_acc: float  # the highest validation accuracy of any epoch
    total_train_time_s: float  # the sum of the epoch times
    speedup: float  # against full training, measured in the run: epochs / sum(1 / step_speedup) (speedup.py)
    speedup_lo: float  # the same over every epoch's slowest calibration round
    speedup_hi: float  # ... and its fastest
    switch_epoch: int  # the epoch at whose end LoRA was injected; -1: never
    freeze_epoch: int  # the epoch at whose end the base was frozen; -1: never
    ranks: dict[str, list[int]]  # LoRA rank per module family and layer ({} without a switch)
    resumed_at: list[int]  # epochs at which the run went on from a checkpoint
    forked_from: int  # the trunk checkpoint a fork started from (-1: not a fork)
    epochs_trained: int  # epochs this run trained itself (a fork's after its fork point)
    val_n: int  # validation images scored at the last epoch (absent in records older than per-image correctness)
    val_correct: int  # of them, right
    val_hits: str  # each one right or wrong, packed (significance.pack_hits; the run's val_correct.npy)
    # from the worker (orchestration/worker.py)
    history: list[dict[str, Any]]  # one record per epoch: the metrics logged to MLflow
    decisions: list[dict[str, Any]]  # each worker's switch decisions (the driver checks they agree)
    worker_rank: int  # the rank that returned it (0)
    unsent_metrics: int  # epochs MLflow was down for: the driver sends them at the end
    merged_model_path: str  # where the merged model was saved (a local path or a bucket's URI)
    all_workers: list[dict[str, Any]]  # with several workers: each one's switch, ranks and sync checksums
    # from the driver (orchestration/train.py)
    summary_path: str  # where the summary was written when MLflow could not take it
    run_name: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    experiment: str
    experiment_id: str | None
