"""Where the LoRA step's time and memory go, and what each saving in `prelora_ray.adapters` buys.

    python benchmarks/lora_step_profile.py                      # all sections, CPU, ~10 min on 2 cores
    python benchmarks/lora_step_profile.py --sections steps     # one section: steps, optimizer, memory, compile
    python benchmarks/lora_step_profile.py --presets vit-small --ranks 8-64 --repeats 5

Sections (each prints a table; everything goes to benchmarks/results/lora_step_profile.json):

steps      Seconds per optimizer step, interleaved in one process (same weights, same batch), of:
           full (AdamW on everything); floor (base frozen, NO adapters, but the patch embedding trains,
           so backward still runs through every layer: the least a LoRA step can cost with backward
           through all layers); lora with PEFT's own forward (`stock`) and with the lean forward that
           `inject_lora` installs (`lean`); the same two with a frozen prefix (first half of the layers
           rank 0: no adapter, frozen, backward stops there). Ranks cycle r_min..r_max per layer as
           Algorithm 2 spreads them; --ranks takes several sets (8-64: the paper's; 2-16: the defaults).
optimizer  One AdamW step on CPU over the parameters of each phase: single-tensor (what
           torch.optim.AdamW does on CPU unless told: `fused=None` picks foreach only on GPUs), foreach,
           and fused. The training loop passes fused=True on GPU only.
memory     Two ways. Saved-for-backward bytes of one forward (saved_tensors_hooks, storages counted
           once, parameters excluded), in fp32 and under bf16 autocast (what runs on GPU; measured
           here with CPU autocast), stock vs lean. And the real peak: peak RSS of a fresh child process
           per phase and forward (3 steps), minus its RSS after building the model, with glibc's
           default malloc and with MALLOC_MMAP_THRESHOLD_=65536 (big blocks always returned to the OS).
compile    torch.compile (inductor) of the full and the lean LoRA model on CPU: compile time and
           step time against eager. Off by default (--sections compile): minutes on 2 cores.

Image 128 with patch 16 (65 tokens) instead of 224 (197): 224 is too slow on 2 CPUs. Timings on a
shared 2-core machine move by 10-20 % between runs: compare ratios within one run; `min` is the
least disturbed repeat.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import make_step  # the same step as the other benchmarks (and the child processes import it from here)
from torch import nn

from prelora_ray.adapters.lean import lean_lora_forward
from prelora_ray.adapters.lora import inject_lora
from prelora_ray.adapters.model import set_trainable
from prelora_ray.config import ModelSettings
from prelora_ray.models import FAMILY_MODULES, PRESETS, build_model
from prelora_ray.strategies import Phase
from prelora_ray.strategies.prelora import PreLoRASettings

RESULTS = Path(__file__).parent / "results"
STEP_KINDS = ("full", "floor", "lora_stock", "lora_lean", "prefix_stock", "prefix_lean")


# -- building the phases -----------------------------------------------------------------------------


def parse_ranks(text: str) -> tuple[int, int]:
    lo, hi = (int(v) for v in text.split("-"))
    return lo, hi


def ranks_for(layers: int, r_min: int, r_max: int, *, prefix: bool) -> dict[str, list[int]]:
    """Ranks cycling r_min..r_max over layers (shifted per family); rank 0 on the first half with a prefix."""
    cands = [r_min * 2**i for i in range((r_max // r_min).bit_length())]
    return {
        family: [0 if prefix and i < layers // 2 else cands[(i + j) % len(cands)] for i in range(layers)]
        for j, family in enumerate(FAMILY_MODULES)
    }


def build(kind: str, preset: str, image_size: int, ranks: tuple[int, int], *, device: str = "cpu") -> nn.Module:
    """The model of one step kind, from the same seed (same base weights for every kind)."""
    torch.manual_seed(0)
    model = build_model(ModelSettings(preset=preset), num_classes=100, image_size=image_size, num_channels=3)
    settings = PreLoRASettings(r_min=ranks[0], r_max=ranks[1])
    if kind == "floor":
        for name, p in model.named_parameters():
            p.requires_grad_(".embeddings." in f".{name}" or "classifier" in name)
    elif kind != "full":
        model = inject_lora(
            model, ranks_for(PRESETS[preset].num_layers, *ranks, prefix=kind.startswith("prefix")), settings
        )
        set_trainable(model, Phase.WARMUP if kind.startswith("warmup") else Phase.LORA, settings)
        if kind.endswith("stock"):
            lean_lora_forward(model, False)
    return model.to(device).train()


def adamw(model: nn.Module, mode: str = "default", device: str = "cpu") -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {
        "default": {"fused": device == "cuda" or None},
        "single": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }[mode]
    return torch.optim.AdamW(params, lr=1e-4, **kwargs)


def batch(size: int, image_size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(size, 3, image_size, image_size, generator=g).to(device), torch.randint(
        0, 100, (size,), generator=g
    ).to(device)


def stats(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "iqr": q[2] - q[0],
        "n": len(values),
    }


# -- sections ----------------------------------------------------------------------------------------


def section_steps(args: argparse.Namespace) -> dict:
    device = args.device
    amp = device == "cuda"
    out: dict = {}
    for preset in args.presets:
        x, y = batch(args.batch, args.image_size, device)
        for ranks_text in args.ranks:
            ranks = parse_ranks(ranks_text)
            steps = {}
            for kind in STEP_KINDS:
                model = build(kind, preset, args.image_size, ranks, device=device)
                steps[kind] = make_step(model, adamw(model, device=device), x, y, amp=amp)
                steps[kind]()  # first step: allocations, optimizer state
            times: dict[str, list[float]] = {k: [] for k in STEP_KINDS}
            for _ in range(args.repeats):
                for kind in STEP_KINDS:
                    start = time.perf_counter()
                    steps[kind]()
                    times[kind].append(time.perf_counter() - start)
            full = stats(times["full"])
            rows = {}
            for kind in STEP_KINDS:
                s = stats(times[kind])
                rows[kind] = {
                    **s,
                    "img_s": args.batch / s["median"],
                    "ratio_median": s["median"] / full["median"],
                    "ratio_min": s["min"] / full["min"],
                }
            key = f"{preset}/ranks {ranks_text}"
            out[key] = rows
            print(
                f"\n[steps] {preset}, ranks {ranks_text}, image {args.image_size} "
                f"({(args.image_size // 16) ** 2 + 1} tokens), batch {args.batch}, {device}{' bf16' if amp else ''}, "
                f"{args.repeats} interleaved repeats"
            )
            print(
                f"{'kind':<14}{'median s':>10}{'min s':>9}{'IQR':>8}{'img/s':>8}"
                f"{'x full (med)':>14}{'x full (min)':>14}"
            )
            for kind, r in rows.items():
                print(
                    f"{kind:<14}{r['median']:>10.3f}{r['min']:>9.3f}{r['iqr']:>8.3f}{r['img_s']:>8.1f}{r['ratio_median']:>14.3f}{r['ratio_min']:>14.3f}"
                )
            del steps
    return out


def section_optimizer(args: argparse.Namespace) -> dict:
    """AdamW step time by implementation, grads filled with noise (no forward needed)."""
    out: dict = {}
    cases = [
        ("vit-digits", 8, "full"),
        ("vit-digits", 8, "lora_lean"),
        (args.presets[0], args.image_size, "full"),
        (args.presets[0], args.image_size, "lora_lean"),
    ]
    print("\n[optimizer] one AdamW step (ms, median of 20 after 3 warm-up), CPU")
    print(f"{'model':<12}{'phase':<11}{'tensors':>8}{'params':>12}{'single':>9}{'foreach':>9}{'fused':>9}")
    for preset, image, kind in cases:
        if preset == "vit-digits":
            torch.manual_seed(0)
            model = build_model(ModelSettings(preset="vit-digits"), num_classes=10, image_size=8, num_channels=1)
            if kind != "full":
                s = PreLoRASettings()
                model = inject_lora(model, ranks_for(PRESETS[preset].num_layers, 2, 16, prefix=False), s)
                set_trainable(model, Phase.LORA, s)
        else:
            model = build(kind, preset, image, parse_ranks(args.ranks[0]))
        params = [p for p in model.parameters() if p.requires_grad]
        row = {"tensors": len(params), "params": sum(p.numel() for p in params)}
        for mode in ("single", "foreach", "fused"):
            opt = adamw(model, mode)
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            times = []
            for i in range(23):
                start = time.perf_counter()
                opt.step()
                if i >= 3:
                    times.append(time.perf_counter() - start)
            row[mode] = statistics.median(times) * 1e3
            del opt
        out[f"{preset}/{kind}"] = row
        print(
            f"{preset:<12}{kind:<11}{row['tensors']:>8}{row['params']:>12,}{row['single']:>9.2f}{row['foreach']:>9.2f}{row['fused']:>9.2f}"
        )
    return out


def saved_bytes(model: nn.Module, x: torch.Tensor, amp: bool) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            model(pixel_values=x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {here!r})
from lora_step_profile import adamw, batch, build, make_step, parse_ranks
torch.set_num_threads({threads})
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
model = build({kind!r}, {preset!r}, {image}, parse_ranks({ranks!r}))
step = make_step(model, adamw(model), *batch({batch}, {image}))
built = rss_mb()
times = []
for _ in range(3):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"built_mb": built, "peak_mb": peak, "step_s_min": min(times)}}))
"""


def child_peak(kind: str, args: argparse.Namespace, preset: str, env_extra: dict[str, str]) -> dict:
    code = CHILD.format(
        here=str(Path(__file__).parent),
        threads=torch.get_num_threads(),
        kind=kind,
        preset=preset,
        image=args.image_size,
        ranks=args.ranks[0],
        batch=args.batch,
    )
    env = {**os.environ, **env_extra}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section_memory(args: argparse.Namespace) -> dict:
    out: dict = {}
    kinds = ("full", "lora_stock", "lora_lean", "prefix_stock", "prefix_lean")
    for preset in args.presets:
        x, _ = batch(args.batch, args.image_size)
        saved = {}
        for kind in kinds:
            model = build(kind, preset, args.image_size, parse_ranks(args.ranks[0]))
            saved[kind] = {"fp32": saved_bytes(model, x, False), "bf16_autocast": saved_bytes(model, x, True)}
            del model
        peaks: dict = {}
        for label, env in (
            ("glibc default", {}),
            ("MALLOC_MMAP_THRESHOLD_=65536", {"MALLOC_MMAP_THRESHOLD_": "65536"}),
        ):
            peaks[label] = {}
            for kind in kinds:
                r = child_peak(kind, args, preset, env)
                r["peak_minus_built_mb"] = r["peak_mb"] - r["built_mb"]
                peaks[label][kind] = r
        out[preset] = {"saved_for_backward_bytes": saved, "child_peak_rss": peaks}
        print(f"\n[memory] {preset}, ranks {args.ranks[0]}, image {args.image_size}, batch {args.batch}")
        print(
            f"{'kind':<14}{'saved fp32 MB':>14}{'saved bf16 MB':>14}"
            + "".join(
                f"{'peak-built ' + ('default' if 'default' in label else 'mmap64k'):>20}{'s/step':>8}"
                for label in peaks
            )
        )
        for kind in kinds:
            line = f"{kind:<14}{saved[kind]['fp32'] / 2**20:>14.1f}{saved[kind]['bf16_autocast'] / 2**20:>14.1f}"
            for label in peaks:
                r = peaks[label][kind]
                line += f"{r['peak_minus_built_mb']:>20.0f}{r['step_s_min']:>8.2f}"
            print(line)
    return out


def section_compile(args: argparse.Namespace) -> dict:
    out: dict = {}
    preset = args.presets[0]
    x, y = batch(args.batch, args.image_size)
    rows = {}
    for kind in ("full", "lora_lean"):
        eager = build(kind, preset, args.image_size, parse_ranks(args.ranks[0]))
        compiled_model = copy.deepcopy(eager)
        compiled = torch.compile(compiled_model)
        step_e = make_step(eager, adamw(eager), x, y)
        step_c = make_step(compiled, adamw(compiled_model), x, y)
        start = time.perf_counter()
        step_c()  # compiles forward and backward
        compile_s = time.perf_counter() - start
        step_e()
        te, tc = [], []
        for _ in range(args.repeats):
            for fn, acc in ((step_e, te), (step_c, tc)):
                s = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - s)
        rows[kind] = {
            "compile_s": compile_s,
            "eager": stats(te),
            "compiled": stats(tc),
            "speedup_median": statistics.median(te) / statistics.median(tc),
        }
    out[preset] = rows
    print(f"\n[compile] {preset}, ranks {args.ranks[0]}, image {args.image_size}, batch {args.batch}, CPU inductor")
    print(f"{'kind':<12}{'compile s':>10}{'eager s':>9}{'compiled s':>11}{'speed-up':>10}")
    for kind, r in rows.items():
        print(
            f"{kind:<12}{r['compile_s']:>10.1f}{r['eager']['median']:>9.3f}{r['compiled']['median']:>11.3f}{r['speedup_median']:>10.2f}"
        )
    if "full" in rows and "lora_lean" in rows:
        print(
            f"lora/full ratio: eager {rows['lora_lean']['eager']['median'] / rows['full']['eager']['median']:.3f}, "
            f"compiled {rows['lora_lean']['compiled']['median'] / rows['full']['compiled']['median']:.3f}"
        )
    return out


def machine() -> dict[str, str]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sections",
        nargs="+",
        default=["steps", "optimizer", "memory"],
        choices=["steps", "optimizer", "memory", "compile"],
    )
    ap.add_argument("--presets", nargs="+", default=["vit-small", "vit-base"])
    ap.add_argument(
        "--ranks",
        nargs="+",
        default=["8-64", "2-16"],
        help="r_min-r_max sets; the first is used by optimizer, memory, compile",
    )
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS / "lora_step_profile.json"))
    args = ap.parse_args()
    path = Path(args.out)
    previous = json.loads(path.read_text()) if path.exists() else {}
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "args": vars(args),
        "sections": previous.get("sections", {}),
    }
    for name in args.sections:
        payload["sections"][name] = {
            "args": vars(args),
            "date": payload["date"],
            "results": globals()[f"section_{name}"](args),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
