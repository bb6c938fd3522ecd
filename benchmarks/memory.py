"""Memory per phase, two ways: a deterministic account, and the real peak.

    python benchmarks/memory.py [--preset vit-small] [--image-size 128] [--batch 32]

Deterministic account, in bytes, of one training step:
  parameters (all, incl. LoRA) + gradients (trainable only) + AdamW state (2 moments per trainable
  value) + activations saved for backward (every tensor autograd keeps, counted once per storage
  through torch.autograd.graph.saved_tensors_hooks; parameters themselves excluded).
Real peak: CUDA max allocated on a GPU; on CPU the peak resident set size of a separate child
process per phase (so phases do not share an allocator high-water mark).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
from common import PHASES, build_phase, make_step, write_json


def saved_activation_bytes(model, images, labels) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward pass."""
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            ptr, size = id(t), t.numel() * t.element_size()
        if ptr not in param_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), size)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(pixel_values=images).logits, labels)
    loss.backward()
    return sum(seen.values())


def account(preset: str, phase: str, image_size: int, batch: int) -> dict[str, int]:
    model, opt = build_phase(preset, phase, image_size=image_size)
    g = torch.Generator().manual_seed(0)
    images, labels = (
        torch.randn(batch, 3, image_size, image_size, generator=g),
        torch.randint(0, 100, (batch,), generator=g),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    out = {
        "parameters": sum(p.numel() * p.element_size() for p in model.parameters()),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_state": 2 * sum(p.numel() * 4 for p in trainable),  # AdamW exp_avg + exp_avg_sq, fp32
        "activations": saved_activation_bytes(model, images, labels),
    }
    out["total"] = sum(out.values())
    return out


def child_peak(preset: str, phase: str, image_size: int, batch: int, env: dict[str, str] | None = None) -> float:
    """Peak RSS (MiB) of a fresh process that builds the phase and runs 3 steps."""
    here = str(__import__("pathlib").Path(__file__).parent)
    code = (
        f"import sys, resource, torch; sys.path.insert(0, {here!r}); from common import build_phase, make_step; "
        f"m, o = build_phase({preset!r}, {phase!r}, image_size={image_size:d}); g = torch.Generator().manual_seed(0); "
        f"x = torch.randn({batch:d}, 3, {image_size:d}, {image_size:d}, generator=g); "
        f"y = torch.randint(0, 100, ({batch:d},), generator=g); "
        "s = make_step(m, o, x, y); [s() for _ in range(3)]; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    import os

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
    )
    return float(out.stdout.strip().splitlines()[-1])


def cuda_peak(preset: str, phase: str, image_size: int, batch: int) -> float:
    model, opt = build_phase(preset, phase, image_size=image_size, device="cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).cuda()
    y = torch.randint(0, 100, (batch,), generator=g).cuda()
    step = make_step(model, opt, x, y, amp=True)
    step()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, opt, step
    torch.cuda.empty_cache()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vit-small")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    rows = {}
    for phase in PHASES:
        acc = account(args.preset, phase, args.image_size, args.batch)
        peak = (
            cuda_peak(args.preset, phase, args.image_size, args.batch)
            if torch.cuda.is_available()
            else child_peak(args.preset, phase, args.image_size, args.batch)
        )
        rows[phase] = {**acc, "real_peak_mib": peak}
        if not torch.cuda.is_available():
            # glibc keeps freed heap memory; with large blocks mmapped, what the LoRA phase frees goes back
            rows[phase]["peak_mib_mmap_threshold"] = child_peak(
                args.preset, phase, args.image_size, args.batch, {"MALLOC_MMAP_THRESHOLD_": "131072"}
            )
    full = rows["full"]
    kind = "CUDA max allocated" if torch.cuda.is_available() else "child-process peak RSS"
    print(
        f"{args.preset}, image {args.image_size}, batch {args.batch}: "
        f"deterministic account (MiB) and real peak ({kind})"
    )
    print(
        f"{'phase':<12}{'params':>9}{'grads':>9}{'adam':>9}{'activ.':>9}{'total':>9}{'x full':>8}"
        f"{'peak':>9}{'x full':>8}{'peak*':>9}{'x full':>8}"
    )
    for phase, r in rows.items():
        mib = {k: v / 2**20 for k, v in r.items() if not k.startswith(("real_peak", "peak_"))}
        r["total_ratio_to_full"] = r["total"] / full["total"]
        r["peak_ratio_to_full"] = r["real_peak_mib"] / full["real_peak_mib"]
        print(
            f"{phase:<12}{mib['parameters']:>9.1f}{mib['gradients']:>9.1f}{mib['optimizer_state']:>9.1f}{mib['activations']:>9.1f}"
            f"{mib['total']:>9.1f}{r['total_ratio_to_full']:>8.3f}{r['real_peak_mib']:>9.1f}{r['peak_ratio_to_full']:>8.3f}",
            end="",
        )
        if "peak_mib_mmap_threshold" in r:
            r["peak_mmap_ratio_to_full"] = r["peak_mib_mmap_threshold"] / full["peak_mib_mmap_threshold"]
            print(f"{r['peak_mib_mmap_threshold']:>9.1f}{r['peak_mmap_ratio_to_full']:>8.3f}", end="")
        print()
    if not torch.cuda.is_available():
        print(
            "peak*: the same with MALLOC_MMAP_THRESHOLD_=131072 (what cluster.release_memory=true sets in CPU workers)"
        )
    path = write_json(
        "memory_" + ("cuda" if torch.cuda.is_available() else "cpu"), {"args": vars(args), "results": rows}
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
