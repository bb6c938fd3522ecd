"""Framework overhead: a digits epoch on Ray Train (one worker) vs the same loop in a plain process.

    python benchmarks/ray_overhead.py [--epochs 12] [--threads 2] [--repeats 2]

Both run the same config (digits, vit-digits, tracking off, the same torch threads) through the
same TrainingLoop; the Ray run adds the TorchTrainer, a worker actor and a per-epoch report with a
checkpoint. Per-epoch wall time = (end of the last epoch - end of the first) / (epochs - 1), so
start-up is excluded and validation, reporting and checkpointing included; start-up = from the
call to the end of epoch 0 minus epoch 0's own wall time. Runs alternate (plain, Ray, plain, ...).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import write_json

from prelora_ray.config import TrainSettings
from prelora_ray.runtime import LocalRuntime
from prelora_ray.trainer import TrainingLoop


def per_epoch(history: list[dict]) -> float:
    t = [e["wall_time"] for e in history]
    return (t[-1] - t[0]) / (len(t) - 1)


def startup(history: list[dict], started: float) -> float:
    return history[0]["wall_time"] - started - per_epoch(history)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--set", nargs="*", default=[], help="extra config overrides for both runs, e.g. cluster.checkpoint_every=5"
    )
    args = ap.parse_args()
    from prelora_ray.orchestration.train import init_ray, run_train

    tmp = tempfile.mkdtemp()
    base = [
        f"epochs={args.epochs}",
        "tracking.enabled=false",
        "model.preset=vit-digits",
        f"cluster.cpus_per_worker={args.threads}",
        f"cluster.torch_threads={args.threads}",
        f"cluster.storage_path={tmp}/ray",
        f"output_dir={tmp}/out",
        *args.set,
    ]
    t0 = time.perf_counter()
    init_ray(None, num_cpus=args.threads)
    ray_init_s = time.perf_counter() - t0
    rows: dict[str, list[dict]] = {"plain": [], "ray": []}
    for i in range(args.repeats):
        torch.set_num_threads(args.threads)
        cfg = TrainSettings.load(None, base)
        started = time.time()
        loop = TrainingLoop(cfg, LocalRuntime())
        loop.run()
        h = loop.state.history
        rows["plain"].append(
            {
                "per_epoch_s": per_epoch(h),
                "startup_s": startup(h, started),
                "epoch_time_s": statistics.mean(e["epoch_time_s"] for e in h),
            }
        )
        started = time.time()
        summary = run_train(TrainSettings.load(None, [*base, f"name=overhead-{i}"]))
        h = summary["history"]
        rows["ray"].append(
            {
                "per_epoch_s": per_epoch(h),
                "startup_s": startup(h, started),
                "epoch_time_s": statistics.mean(e["epoch_time_s"] for e in h),
            }
        )
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("per_epoch_s", "startup_s", "epoch_time_s")}
        for k, v in rows.items()
    }
    overhead = med["ray"]["per_epoch_s"] / med["plain"]["per_epoch_s"] - 1
    print(
        f"digits, vit-digits, {args.epochs} epochs, {args.threads} threads, "
        f"{args.repeats} alternating repeats (medians)"
    )
    print(f"{'':<8}{'wall/epoch s':>14}{'train-only s':>14}{'start-up s':>12}")
    for k, v in med.items():
        print(f"{k:<8}{v['per_epoch_s']:>14.3f}{v['epoch_time_s']:>14.3f}{v['startup_s']:>12.2f}")
    print(f"Ray overhead per epoch: {100 * overhead:+.1f}% (ray.init itself: {ray_init_s:.1f} s, once per driver)")
    result = {
        "args": vars(args),
        "runs": rows,
        "medians": med,
        "overhead_per_epoch": overhead,
        "ray_init_s": ray_init_s,
    }
    print(f"written {write_json('ray_overhead', result)}")


if __name__ == "__main__":
    main()
