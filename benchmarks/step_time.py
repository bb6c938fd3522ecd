"""Step time and throughput per phase (FULL, WARMUP, LORA, LORA with a frozen prefix, RELORA), one process.

    python benchmarks/step_time.py [--presets vit-small vit-base] [--image-size 128] [--batch 32]
                                   [--repeats 7] [--steps 3] [--device cpu|cuda] [--merge-every 200]

Phases are interleaved within each repeat (full, warmup, lora, lora_prefix, full, ...) so machine
noise hits all of them alike; the table gives the median seconds per step, the spread, images/s
and the ratio to FULL. Ranks cycle through 8..64 as Algorithm 2 would spread them; the frozen
prefix gives the first half of the layers rank 0 (no adapter, frozen), so backward stops halfway.
RELORA (strategy relora_prelora) has a uniform rank hidden/4 on every target layer (the paper's 256
on ViT-L), embeddings, norms, biases and head training in full; its merge (fold s·B·A, re-initialise,
prune the moments) is timed on its own and `relora+merge` adds it amortised over `--merge-every` steps.
"""

from __future__ import annotations

import argparse

import torch
from common import PHASES, build_phase, make_step, spread, timed, write_json

from prelora_ray.adapters.lora import fold_adapters, reinit_adapters
from prelora_ray.adapters.names import is_adapter_param
from prelora_ray.optim import prune_moments


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["vit-small", "vit-base"])
    ap.add_argument("--image-size", type=int, default=128, help="128 with patch 16: 64 patches + CLS = 65 tokens")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--merge-every", type=int, default=200, help="RELORA steps between merges, to amortise the merge's time"
    )
    args = ap.parse_args()
    amp = args.device == "cuda"
    results = {}
    for preset in args.presets:
        g = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(args.device)
        labels = torch.randint(0, 100, (args.batch,), generator=g).to(args.device)
        steps = {}
        for phase in PHASES:
            model, opt = build_phase(preset, phase, image_size=args.image_size, device=args.device)
            steps[phase] = make_step(model, opt, images, labels, amp=amp)
            steps[phase]()  # warm-up: allocations, optimizer state
            if phase == "relora":
                steps["merge"] = merge_of(model, opt, args.device)
        times: dict[str, list[float]] = {p: [] for p in (*PHASES, "merge")}
        for _ in range(args.repeats):
            for phase in (*PHASES, "merge"):
                times[phase].append(timed(steps[phase], 1 if phase == "merge" else args.steps))
        full = spread(times["full"])["median"]
        rows = {}
        for phase in PHASES:
            s = spread(times[phase])
            rows[phase] = {**s, "img_s": args.batch / s["median"], "ratio_to_full": s["median"] / full}
        merge = spread(times["merge"])["median"]
        amortised = rows["relora"]["median"] + merge / args.merge_every
        rows["relora+merge"] = {
            "median": amortised,
            "iqr": float("nan"),
            "min": float("nan"),
            "max": float("nan"),
            "img_s": args.batch / amortised,
            "ratio_to_full": amortised / full,
            "merge_s": merge,
        }
        results[preset] = rows
        print(
            f"\n{preset}  image {args.image_size}, batch {args.batch}, {args.device}{' bf16' if amp else ''}, "
            f"{args.repeats} interleaved repeats x {args.steps} steps"
        )
        print(f"{'phase':<12}{'s/step':>10}{'IQR':>9}{'min':>9}{'max':>9}{'img/s':>9}{'x full':>9}")
        for phase, r in rows.items():
            print(
                f"{phase:<12}{r['median']:>10.4f}{r['iqr']:>9.4f}{r['min']:>9.4f}{r['max']:>9.4f}{r['img_s']:>9.1f}{r['ratio_to_full']:>9.3f}"
            )
        print(f"(one RELORA merge: {merge:.4f} s, amortised over {args.merge_every} steps in relora+merge)")
    path = write_json(f"step_time_{args.device}", {"args": vars(args), "results": results})
    print(f"\nwritten {path}")


def merge_of(model, opt, device: str):
    """One ReLoRA merge as strategy relora_prelora does it.

    Fold, re-initialise (B = 0, A redrawn), prune 90% of the moments by magnitude (the default `relora.reset`).
    """
    adapters = [p for n, p in model.named_parameters() if is_adapter_param(n)]

    def merge() -> None:
        fold_adapters(model)
        reinit_adapters(model, seed=0)
        prune_moments(opt, adapters, mode="magnitude", ratio=0.9)
        if device == "cuda":
            torch.cuda.synchronize()

    return merge


if __name__ == "__main__":
    main()
