"""Per-epoch results of `full` and `prelora` on digits, to compare two versions of the loop with `==`.

Records, for a few deterministic short runs (one thread, `vit-digits`, digits data), each epoch's
losses, accuracies, learning rate, phase, trainable parameters and family norms, the switch and
freeze epochs, the ranks and a hash of the final weights, and writes them as JSON. Run it on two
checkouts and compare:

    PYTHONPATH=/tmp/base python benchmarks/strategy_equality.py --out /tmp/eq_main.json
    PYTHONPATH=$PWD python benchmarks/strategy_equality.py --out /tmp/eq_branch.json --compare /tmp/eq_main.json

Uses only what both versions have (`TrainingLoop`, `LocalRuntime`, the history and the summary).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

import torch

from prelora_ray.config import TrainSettings
from prelora_ray.runtime import LocalRuntime
from prelora_ray.trainer import TrainingLoop

TIMING = ("epoch_time_s", "throughput_img_s", "peak_mem_mb", "wall_time")
BASE = [
    "epochs=6",
    "deterministic=true",
    "model.preset=vit-digits",
    "tracking.enabled=false",
    "data.name=digits",
    "seed=3",
    "prelora.k=2",
    "prelora.m=1",
    "prelora.tau=50",
    "prelora.zeta=50",
    "prelora.warmup=1",
]
RUNS = {
    "full": ["strategy=full"],
    "prelora": [],
    "prelora_w0_head": ["prelora.warmup=0", "prelora.trainable_after_freeze=[head,norms]"],
    "prelora_steps": ["prelora.window_unit=step", "prelora.m=10", "prelora.tau=5", "prelora.zeta=30"],
}


def record(extra: list[str]) -> dict[str, Any]:
    """One run's per-epoch results (timings dropped) and outcome."""
    loop = TrainingLoop(TrainSettings.load(None, [*BASE, *extra]), LocalRuntime())
    summary = loop.run()
    weights = hashlib.sha256()
    for key, value in sorted(loop.model.state_dict().items()):
        weights.update(key.encode())
        weights.update(value.detach().cpu().contiguous().numpy().tobytes())
    return {
        "history": [{k: v for k, v in h.items() if k not in TIMING} for h in loop.state.history],
        "switch_epoch": summary["switch_epoch"],
        "freeze_epoch": summary["freeze_epoch"],
        "ranks": summary["ranks"],
        "steps": loop.state.step,
        "weights_sha256": weights.hexdigest(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--compare", help="JSON of another version: exit 1 unless equal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: record(extra) for name, extra in RUNS.items()}
    results = json.loads(json.dumps(results))  # the same types as a file read back
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as f:
            other = json.load(f)
        for name in RUNS:
            same = results[name] == other[name]
            print(
                f"{name}: {'equal' if same else 'DIFFERENT'} (switch {results[name]['switch_epoch']}, freeze {results[name]['freeze_epoch']})"
            )
        return 0 if results == other else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
