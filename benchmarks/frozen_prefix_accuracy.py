"""Accuracy cost of rank 0 for stable layers (prelora.zero_rank_below) against the plain switch, on digits.

    python benchmarks/frozen_prefix_accuracy.py [--seeds 0 1 2] [--threshold 1.0]

Each seed runs the digits default (40 epochs, tracking off, no Ray) twice: the plain PreLoRA switch
and the same with zero_rank_below=THRESHOLD (layers whose |ΔW| between the last two windows is below
THRESHOLD % get no adapter and freeze). Prints final val_acc mean ± std, the layers at rank 0, the
trainable fraction and mean epoch time of the LoRA phase.
"""

from __future__ import annotations

import argparse
import statistics

from common import write_json

from prelora_ray.config import TrainSettings
from prelora_ray.runtime import LocalRuntime
from prelora_ray.trainer import TrainingLoop


def one(seed: int, extra: list[str]) -> dict:
    cfg = TrainSettings.load(
        None, [f"seed={seed}", "tracking.enabled=false", "model.preset=vit-digits", *extra]
    )  # as measured
    loop = TrainingLoop(cfg, LocalRuntime())
    s = loop.run()
    lora = [e for e in s_history(loop) if e["phase"] == "lora"]
    return {
        "final_val_acc": s["final_val_acc"],
        "switch_epoch": s["switch_epoch"],
        "zero_rank_layers": sum(r == 0 for ranks in s["ranks"].values() for r in ranks),
        "layers": sum(len(r) for r in s["ranks"].values()),
        "lora_epoch_time_s": statistics.mean(e["epoch_time_s"] for e in lora) if lora else float("nan"),
        "lora_trainable_fraction": lora[-1]["trainable_fraction"] if lora else float("nan"),
    }


def s_history(loop: TrainingLoop) -> list[dict]:
    return loop.state.history


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threshold", type=float, default=1.0, help="zero_rank_below, in percent")
    args = ap.parse_args()
    arms = {"plain switch": [], f"zero_rank_below={args.threshold}": []}
    for seed in args.seeds:  # interleaved arms, same seed
        arms["plain switch"].append(one(seed, []))
        arms[f"zero_rank_below={args.threshold}"].append(one(seed, [f"prelora.zero_rank_below={args.threshold}"]))
    print(f"digits default, seeds {args.seeds}")
    print(f"{'arm':<24}{'val_acc mean':>13}{'std':>8}{'rank-0 layers':>15}{'LoRA trainable':>16}{'LoRA epoch s':>14}")
    summary = {}
    for arm, runs in arms.items():
        accs = [r["final_val_acc"] for r in runs]
        summary[arm] = {
            "val_acc_mean": statistics.mean(accs),
            "val_acc_std": statistics.pstdev(accs),
            "zero_rank_layers": statistics.mean(r["zero_rank_layers"] for r in runs),
            "layers": runs[0]["layers"],
            "lora_trainable_fraction": statistics.mean(r["lora_trainable_fraction"] for r in runs),
            "lora_epoch_time_s": statistics.mean(r["lora_epoch_time_s"] for r in runs),
        }
        s = summary[arm]
        print(
            f"{arm:<24}{s['val_acc_mean']:>13.4f}{s['val_acc_std']:>8.4f}"
            f"{s['zero_rank_layers']:>9.1f} / {s['layers']:<3}"
            f"{100 * s['lora_trainable_fraction']:>15.2f}%{s['lora_epoch_time_s']:>14.3f}"
        )
    print(f"written {write_json('frozen_prefix_accuracy', {'args': vars(args), 'runs': arms, 'summary': summary})}")


if __name__ == "__main__":
    main()
