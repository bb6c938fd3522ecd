"""Which digits-sized ViT makes the LoRA phase clearly cheaper than full training on CPU, and still learns.

    python benchmarks/demo_model.py                                  # every candidate, threads 1 (~10 min on 2 cores)
    python benchmarks/demo_model.py --candidates vit-digits d128-l2-p4 --repeats 5 --ranks 1-8 4-32
    python benchmarks/demo_model.py --sections epochs                # timings only, no 30-epoch runs

For each candidate shape on the embedded digits data (threads 1, as a Ray worker with
cpus_per_worker=1 runs):

epochs  Seconds per training epoch over the real digits train set (batch 64, the same batches
        every time) of FULL (AdamW on every weight) and LORA (`inject_lora` with per-layer ranks
        cycling r_min..r_max as Algorithm 2 spreads them, `set_trainable(.., Phase.LORA, ..)`, AdamW
        over the trainable parameters only), interleaved within each repeat (full, lora per rank
        set, full, ...) so machine noise hits both alike; the ratio is median LORA / median FULL,
        per rank set, and the median over the rank sets (the quickstart's trials draw r_min from
        {1, 2, 4} and r_max from {8, 16, 32}).
train   A normal 30-epoch `prelora_ray.trainer.train` run (defaults, `tracking.enabled=false`):
        final val_acc, the switch and freeze epochs, and the real run's median LORA-phase epoch time
        over its median FULL-phase epoch time (from its per-epoch reports).

Candidates that are not presets are registered for this process only (models.PRESETS and
config.MODEL_PRESETS). Results go to benchmarks/results/demo_model.json. Timings on a shared 2-core
machine move by 10-20 % between runs: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import make_step, ranks_for, spread, write_json

from prelora_ray import config as config_module
from prelora_ray import models as models_module
from prelora_ray.adapters.lora import inject_lora
from prelora_ray.adapters.model import set_trainable
from prelora_ray.config import DataSettings, ModelSettings, TrainSettings
from prelora_ray.data import build_datasets
from prelora_ray.models import PRESETS, ViTShape, build_model
from prelora_ray.runtime import LocalRuntime
from prelora_ray.strategies import Phase
from prelora_ray.strategies.prelora import PreLoRASettings
from prelora_ray.trainer import train

CANDIDATES: dict[str, ViTShape | None] = {
    "vit-digits": None,  # today's preset: hidden 64, 4 layers, MLP 128, patch 2 (17 tokens)
    "d128-l2-m256-p2": ViTShape(hidden_size=128, num_layers=2, num_heads=4, mlp_size=256, patch_size=2),
    "d64-l4-m128-p4": ViTShape(hidden_size=64, num_layers=4, num_heads=4, mlp_size=128, patch_size=4),
    "d128-l2-m512-p4": ViTShape(hidden_size=128, num_layers=2, num_heads=4, mlp_size=512, patch_size=4),
    "d192-l2-m384-p4": ViTShape(hidden_size=192, num_layers=2, num_heads=4, mlp_size=384, patch_size=4),
    "d256-l1-m1024-p4": ViTShape(hidden_size=256, num_layers=1, num_heads=4, mlp_size=1024, patch_size=4),
    "vit-digits-wide": None,  # the preset: hidden 256, 2 layers, MLP 256, patch 4 (5 tokens)
    "d192-l3-m384-p4": ViTShape(hidden_size=192, num_layers=3, num_heads=4, mlp_size=384, patch_size=4),
}


def register(name: str) -> None:
    """Make a candidate shape a preset for this process (no-op for real presets)."""
    shape = CANDIDATES.get(name)
    if name in PRESETS:
        return
    if shape is None:
        raise SystemExit(f"unknown candidate {name!r}: one of {', '.join(CANDIDATES)} or a preset")
    models_module.PRESETS[name] = shape
    config_module.MODEL_PRESETS = (*config_module.MODEL_PRESETS, name)


def describe(name: str) -> str:
    s = PRESETS[name]
    return (
        f"hidden {s.hidden_size}, {s.num_layers} layers, MLP {s.mlp_size}, patch {s.patch_size} "
        f"({(8 // s.patch_size) ** 2 + 1} tokens)"
    )


def digits_batches(batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of the digits train set, shuffled once (seed 0): the same batches for every model."""
    data = build_datasets(DataSettings(name="digits", batch_size=batch_size))
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    return list(loader)


def build_epoch(name: str, ranks: tuple[int, int] | None, batches):
    """An epoch function (one step per batch, as common.make_step does it) of FULL (ranks None) or LORA."""
    torch.manual_seed(0)
    model = build_model(ModelSettings(preset=name), num_classes=10, image_size=8, num_channels=1)
    settings = PreLoRASettings(r_min=ranks[0], r_max=ranks[1]) if ranks else PreLoRASettings()
    if ranks is None:
        set_trainable(model, Phase.FULL, settings)
    else:
        model = inject_lora(model, ranks_for(PRESETS[name].num_layers, r_min=ranks[0], r_max=ranks[1]), settings)
        set_trainable(model, Phase.LORA, settings)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    steps = [make_step(model, opt, x, y) for x, y in batches]

    def epoch() -> float:
        start = time.perf_counter()
        for step in steps:
            step()
        return time.perf_counter() - start

    return epoch, sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())


def section_epochs(name: str, args: argparse.Namespace, batches) -> dict:
    rank_sets = [tuple(int(v) for v in r.split("-")) for r in args.ranks]
    kinds = {"full": None, **{f"lora {lo}-{hi}": (lo, hi) for lo, hi in rank_sets}}
    epochs, trainable = {}, {}
    for kind, ranks in kinds.items():
        epochs[kind], trainable[kind], total = build_epoch(name, ranks, batches)
        epochs[kind]()  # warm-up: allocations, optimizer state
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.repeats):
        for kind in kinds:
            times[kind].append(epochs[kind]())
    full = statistics.median(times["full"])
    rows = {
        k: {**spread(v), "ratio_to_full": statistics.median(v) / full, "trainable": trainable[k]}
        for k, v in times.items()
    }
    lora_ratios = [rows[k]["ratio_to_full"] for k in kinds if k != "full"]
    return {
        "params": total,
        "rows": rows,
        "full_s": full,
        "lora_s": statistics.median([rows[k]["median"] for k in kinds if k != "full"]),
        "ratio": statistics.median(lora_ratios),
    }


def section_train(name: str, args: argparse.Namespace) -> dict:
    cfg = TrainSettings.load(
        None, ["tracking.enabled=false", f"model.preset={name}", f"epochs={args.epochs}", f"seed={args.seed}"]
    )
    runtime = LocalRuntime()
    start = time.perf_counter()
    summary = train(cfg, runtime)
    wall = time.perf_counter() - start
    by_phase: dict[str, list[float]] = {}
    for report in runtime.reports:
        by_phase.setdefault(report["phase"], []).append(report["epoch_time_s"])
    med = {p: statistics.median(v) for p, v in by_phase.items()}
    ratio = med["lora"] / med["full"] if "lora" in med and "full" in med else float("nan")
    return {
        "final_val_acc": summary["final_val_acc"],
        "best_val_acc": summary["best_val_acc"],
        "switch_epoch": summary["switch_epoch"],
        "freeze_epoch": summary["freeze_epoch"],
        "ranks": summary["ranks"],
        "epochs_by_phase": {p: len(v) for p, v in by_phase.items()},
        "median_epoch_s_by_phase": med,
        "lora_over_full": ratio,
        "mean_epoch_time_s": summary["mean_epoch_time_s"],
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--sections", nargs="+", default=["epochs", "train"], choices=["epochs", "train"])
    ap.add_argument("--ranks", nargs="+", default=["1-8", "2-16", "4-32"], help="r_min-r_max sets of the LORA epochs")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed epochs per kind")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker with cpus_per_worker=1 uses 1)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30, help="length of the real training run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.candidates:
        register(name)
    batches = digits_batches(args.batch) if "epochs" in args.sections else []
    results: dict[str, dict] = {}
    for name in args.candidates:
        results[name] = {"shape": describe(name)}
        if "epochs" in args.sections:
            r = results[name]["epochs"] = section_epochs(name, args, batches)
            print(
                f"\n[epochs] {name}: {describe(name)}, {r['params']:,} parameters, threads {args.threads}, "
                f"{args.repeats} interleaved repeats",
                flush=True,
            )
            for kind, row in r["rows"].items():
                print(
                    f"  {kind:<12}{row['median']:>8.3f} s/epoch  IQR {row['iqr']:.3f}  "
                    f"x full {row['ratio_to_full']:.3f}  trainable {row['trainable']:,}",
                    flush=True,
                )
        if "train" in args.sections:
            t = results[name]["train"] = section_train(name, args)
            print(
                f"[train] {name}: final val_acc {t['final_val_acc']:.4f}, switch {t['switch_epoch']}, "
                f"freeze {t['freeze_epoch']}, epochs by phase {t['epochs_by_phase']}, "
                f"median s/epoch { ({k: round(v, 3) for k, v in t['median_epoch_s_by_phase'].items()}) }, "
                f"LORA/FULL {t['lora_over_full']:.3f}, wall {t['wall_s']:.0f} s",
                flush=True,
            )
    print(
        f"\nthreads {args.threads}; epochs: median over interleaved repeats, "
        f"LORA over rank sets {' '.join(args.ranks)}; train: {args.epochs}-epoch run, defaults"
    )
    print(
        f"{'candidate':<18}{'shape':<48}{'full s/ep':>10}{'LoRA s/ep':>10}{'ratio':>7}{'run ratio':>10}{'val_acc':>9}"
    )
    for name, r in results.items():
        e, t = r.get("epochs", {}), r.get("train", {})
        print(
            f"{name:<18}{r['shape']:<48}{e.get('full_s', float('nan')):>10.3f}"
            f"{e.get('lora_s', float('nan')):>10.3f}{e.get('ratio', float('nan')):>7.3f}"
            f"{t.get('lora_over_full', float('nan')):>10.3f}{t.get('final_val_acc', float('nan')):>9.4f}"
        )
    path = write_json("demo_model", {"args": vars(args), "results": results})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
