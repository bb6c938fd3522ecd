"""A prepared GPU check in one bounded run: phase step times and memory, the data loader's throughput, a fork sweep.

    python benchmarks/gpu_check.py [--tiny] [--out PATH] [--presets vit-base vit-large] [--batch 128]
                                   [--image-size 224] [--steps 10] [--repeats 3] [--loader-seconds 20]
                                   [--loader-workers N] [--budget-s 450]

On CUDA (bf16 autocast, fused AdamW): FULL, LORA and LORA with a frozen prefix (benchmarks/common.py's build_phase:
ranks 8-64 through prelora_ray.adapters.lora, the first half of the layers at rank 0) of vit-base and vit-large at image
224 and the paper's batch, 128 per GPU (search_spaces/paper_vit_large.yaml); on CUDA out of memory a model is retried at
half the batch, and the reduction is recorded. Phases are interleaved within each repeat (the project's convention for
timing ratios); each phase's peak is CUDA max allocated during its steps less what the other phases hold. Then the train
DataLoader the training loop builds (prelora_ray.data.make_train_loader, data.loader_workers auto unless
--loader-workers), alone, on synthetic tensors and on a generated folder of JPEGs through the imagefolder train
transforms (RandomResizedCrop, flip, RandAugment): its images/s against the fastest phase's. Last, `prelora-ray tune` on
a generated 2-trial digits space (fork mode, trial_executor tune, cluster.use_gpu on CUDA).

Without CUDA, or with --tiny: vit-digits and vit-tiny at image 32, batch 8, 2 steps per phase, small loader and
sweep, well under 2 minutes on 2 CPUs (tests/test_gpu_check.py runs it); CPU peaks are null per phase (the process
peak RSS of the whole run is given instead; benchmarks/memory.py measures CPU peaks per phase in child processes).
Writes benchmarks/results/gpu_check_<cuda|cpu>.json (or --out) even when a part fails, then exits 1 if one did.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml
from common import RESULTS, build_phase, machine, make_step, spread, timed
from mlflow.tracking import MlflowClient
from PIL import Image

from prelora_ray.config import DataSettings
from prelora_ray.data import available_cpus, build_datasets, make_train_loader

PHASES = ("full", "lora", "lora_prefix")  # the FULL vs LoRA comparison the paper's speed-up is about
# Defaults per form; an explicit flag wins. The CUDA form is sized for 3-4 minutes on an H100 (estimated: not yet run
# on one). budget_s: the sweep's deadline from the start; 450 keeps the CUDA form under 8 minutes, 240 guards CI
# against a hang.
PROFILES = {
    "cuda": dict(
        presets=["vit-base", "vit-large"],
        image_size=224,
        batch=128,
        steps=10,
        repeats=3,
        warmup=2,
        loader_seconds=20.0,
        jpeg_side=384,
        sweep_epochs=5,
        budget_s=450.0,
    ),
    "tiny": dict(
        presets=["vit-digits", "vit-tiny"],
        image_size=32,
        batch=8,
        steps=2,
        repeats=2,
        warmup=1,
        loader_seconds=3.0,
        jpeg_side=40,
        sweep_epochs=5,
        budget_s=240.0,
    ),
}
T0 = time.perf_counter()


def say(msg: str) -> None:
    """One progress line on stderr with the elapsed time (stdout keeps the final table)."""
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def allocated(device: str) -> int:
    """Bytes of live CUDA tensors; 0 on CPU, where no per-phase figure is taken."""
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def bench_model(preset: str, batch: int, args: argparse.Namespace) -> dict:
    """Interleaved step times and per-phase CUDA peaks of the PHASES of one model at one batch."""
    device, cuda = args.device, args.device == "cuda"
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=g).to(device)
    labels = torch.randint(0, 100, (batch,), generator=g).to(device)
    steps, own = {}, {}
    for phase in PHASES:
        before = allocated(device)
        model, opt = build_phase(preset, phase, image_size=args.image_size, device=device)
        steps[phase] = make_step(model, opt, images, labels, amp=cuda)
        del model, opt  # the step holds them; deleting `steps` frees the phase
        for _ in range(args.warmup):  # allocations, AdamW state, cuBLAS heuristics
            steps[phase]()
        own[phase] = allocated(device) - before  # weights, gradients, AdamW state: held between steps
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    peaks = dict.fromkeys(PHASES, 0)
    for _ in range(args.repeats):
        for phase in PHASES:
            others = allocated(device) - own[phase]  # the other phases' state and the input batch
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times[phase].append(timed(steps[phase], args.steps))
            if cuda:
                peaks[phase] = max(peaks[phase], torch.cuda.max_memory_allocated() - others)
    full = spread(times["full"])["median"]
    rows = {}
    for phase in PHASES:
        s = spread(times[phase])
        rows[phase] = {
            "batch": batch,
            "s_per_step": s["median"],
            "iqr": s["iqr"],
            "img_s": batch / s["median"],
            "ratio_to_full": s["median"] / full,
            "peak_mib": peaks[phase] / 2**20 if cuda else None,
        }
    return rows


def bench_with_fallback(preset: str, args: argparse.Namespace) -> dict:
    """bench_model at --batch, halving the batch on CUDA out of memory until it fits.

    The same batch for every phase.
    """
    batch = args.batch
    while True:
        try:
            rows = bench_model(preset, batch, args)
            break
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # here, outside the except block, its traceback (and the models its frames hold) is gone
        gc.collect()
        torch.cuda.empty_cache()
        say(f"{preset}: CUDA out of memory at batch {batch}, retrying at {batch // 2}")
        batch //= 2
    return {"batch": batch, "batch_reduced_from": args.batch if batch != args.batch else None, "phases": rows}


def jpeg_tree(root: Path, side: int, unique: int, total: int, classes: int = 10) -> Path:
    """An ImageNet-style folder of smooth random JPEGs.

    `unique` encoded files, hard-linked up to `total` train images.
    """
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(unique):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BICUBIC)
        noisy = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3)), 0, 255)
        files.append(root / f"src{i}.jpg")
        Image.fromarray(noisy.astype(np.uint8)).save(files[-1], quality=90)  # noise: real-photo-like entropy, not flat
    for split, n in (("train", total), ("val", classes)):
        for i in range(n):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            os.link(files[i % unique], folder / f"{i}.jpg")  # decoding is per read: links cost the loader the same
    return root


def loader_throughput(settings: DataSettings, args: argparse.Namespace) -> dict:
    """Images/s through the training loop's train loader, batches copied to the device as the loop does; epochs
    repeat until --loader-seconds, each paying its workers' start-up as training does (non-persistent workers)."""
    bundle = build_datasets(settings)
    loader, sampler = make_train_loader(bundle.train, settings, args.device)
    images = epoch = 0
    firsts: list[float] = []  # per epoch: worker start-up and pipeline fill until its first batch
    start = time.perf_counter()
    while time.perf_counter() - start < args.loader_seconds:
        sampler.set_epoch(epoch)
        epoch += 1
        began = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            images += len(y)
            if i == 0:
                firsts.append(time.perf_counter() - began)
            if time.perf_counter() - start >= args.loader_seconds:
                break
    if args.device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {
        "workers": loader.num_workers,
        "train_images": len(bundle.train),
        "image_size": bundle.image_size,
        "batch": settings.batch_size,
        "images": images,
        "epochs": epoch,
        "wall_s": wall,
        "img_s": images / wall,
        "first_batch_s": sum(firsts) / len(firsts),
    }


def loaders(args: argparse.Namespace, tmp: Path) -> dict:
    """loader_throughput on in-memory synthetic tensors and on JPEGs through the imagefolder train transforms."""
    # the rate includes each epoch's worker start-up (conservative): epochs of 12 batches (in-memory tensors
    # cost 0.6 MB an image at 224) and 40 (hard links cost nothing) keep it a small share
    n = args.batch * 12
    shared = dict(image_size=args.image_size, batch_size=args.batch, loader_workers=args.loader_workers)
    out = {"synthetic": loader_throughput(DataSettings(name="synthetic", synthetic_samples=n, **shared), args)}
    say(f"loader synthetic: {out['synthetic']['img_s']:.0f} img/s, {out['synthetic']['workers']} workers")
    root = jpeg_tree(tmp / "jpegs", args.jpeg_side, unique=64, total=args.batch * 40)
    out["imagefolder"] = loader_throughput(DataSettings(name="imagefolder", root=str(root), **shared), args)
    out["imagefolder"]["jpeg_side"] = args.jpeg_side
    say(f"loader imagefolder: {out['imagefolder']['img_s']:.0f} img/s, {out['imagefolder']['workers']} workers")
    return out


def fork_sweep(args: argparse.Namespace, tmp: Path, timeout: float) -> dict:
    """`prelora-ray tune` on a 2-trial digits space (tests/test_tune.py's shape) through the CLI, in a fresh store."""
    space = {
        "name": "gpucheck",
        "base": {
            "epochs": args.sweep_epochs,
            "model": {"preset": "vit-digits"},
            "data": {"name": "digits"},
            "prelora": {"k": 2, "m": 1, "warmup": 1},  # switch possible from epoch 1: forks happen in 5 epochs
            "cluster": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": args.device == "cuda"},
        },
        "parameters": {
            "prelora.tau": {"type": "loguniform", "low": 20.0, "high": 80.0},
            "prelora.zeta": {"type": "uniform", "low": 20.0, "high": 80.0},
            "prelora.r_min": {"type": "categorical", "values": [1, 2]},
            "prelora.r_max": {"type": "categorical", "values": [4, 8]},
        },
        "objectives": [{"metric": "final_val_acc", "mode": "max"}, {"metric": "mean_epoch_time_s", "mode": "min"}],
        "sampler": {"type": "random", "seed": 0},
        "num_samples": 2,
        "max_concurrent": 1,
        "baseline": True,
        "trial_executor": "tune",
    }
    path = tmp / "gpucheck.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cmd = [
        sys.executable,
        "-m",
        "prelora_ray.cli",
        "tune",
        str(path),
        "--tracking-uri",
        uri,
        "--storage",
        str(tmp / "ray"),
    ]
    start = time.perf_counter()
    # its own session, so a timeout ends the CLI and the local Ray it started, not this process
    proc = subprocess.Popen(
        cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise RuntimeError(f"the sweep ran past its {timeout:.0f} s; stderr tail: {err[-400:]!r}") from None
    wall = time.perf_counter() - start
    front: list[str] = []  # the CLI's table: "Pareto front ..." then a header and one line per run, then a blank line
    lines = iter(out.splitlines())
    if any(line.startswith("Pareto front") for line in lines):
        for line in lines:
            if not line.strip():
                break
            front.append(line)
    result = {"rc": proc.returncode, "wall_s": wall, "trials": 2, "epochs": args.sweep_epochs, "front": front}
    if proc.returncode == 0:
        result.update(sweep_records(uri))
    else:
        result["stderr_tail"] = err[-2000:]
    return result


def sweep_records(uri: str) -> dict:
    """Finished trials and the parent's epoch totals, from the sweep's own MLflow store."""
    from prelora_ray import metrics as M

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("prelora-ray").experiment_id])
    role = {r.info.run_id: r.data.tags.get(M.ROLE_TAG) for r in runs}
    parent = next((r.data.metrics for r in runs if role[r.info.run_id] == "parent"), {})
    return {
        "trials_finished": sum(role[r.info.run_id] == "trial" and r.info.status == "FINISHED" for r in runs),
        **{
            key: int(parent[metric]) if metric in parent else None
            for key, metric in (
                ("epochs_trained_total", M.EPOCHS_TRAINED_TOTAL),
                ("epochs_naive_total", M.EPOCHS_NAIVE_TOTAL),
            )
        },
    }


def device_info(device: str) -> dict:
    """What the figures were measured on.

    Device name, torch, its CUDA build, cuDNN, the CPUs and shared memory a loader may use.
    """
    cuda = device == "cuda"
    return {
        "type": device,
        "name": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "bf16_autocast": cuda,
        "cpus_available": available_cpus(),
        # loader workers hand batches over in /dev/shm: a small one (Docker's 64 MiB) kills them with a bus error
        "dev_shm_gib": shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags, with unset ones filled from the form's PROFILES entry (tiny without CUDA or with --tiny)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny settings (automatic without CUDA)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu_check_<device>.json)")
    ap.add_argument("--presets", nargs="+")
    ap.add_argument("--batch", type=int, help="per step; the paper's 128 per GPU on CUDA, halved on OOM")
    for flag, kind in (
        ("--image-size", int),
        ("--steps", int),
        ("--repeats", int),
        ("--warmup", int),
        ("--loader-seconds", float),
        ("--jpeg-side", int),
        ("--sweep-epochs", int),
        ("--budget-s", float),
    ):
        ap.add_argument(flag, type=kind)
    ap.add_argument("--loader-workers", type=int, help="data.loader_workers of the loader check (default: auto)")
    args = ap.parse_args(argv)
    args.form = "tiny" if args.tiny or args.device == "cpu" else "cuda"
    for key, value in PROFILES[args.form].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every part (each bounded, a failure recorded and the rest still run), print the table, write the JSON."""
    args = parse_args(argv)
    say(
        f"gpu_check on {args.device} ({args.form} form): {', '.join(args.presets)}, "
        f"batch {args.batch}, image {args.image_size}"
    )
    errors: list[dict] = []
    steps: dict = {}
    for preset in args.presets:
        try:
            steps[preset] = bench_with_fallback(preset, args)
            say(f"{preset}: " + ", ".join(f"{p} {r['s_per_step']:.4f} s" for p, r in steps[preset]["phases"].items()))
        except Exception as exc:  # recorded; the other parts still run
            errors.append({"part": f"steps {preset}", "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the next model, and the sweep's Ray worker, get the memory back
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    loader: dict = {}
    try:
        loader = loaders(args, tmp)
    except Exception as exc:
        errors.append({"part": "loader", "error": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
    keeps_up = {}
    for preset, model in steps.items():
        fastest = max(model["phases"], key=lambda p: model["phases"][p]["img_s"])  # the most demanding consumer
        need = model["phases"][fastest]["img_s"]
        keeps_up[preset] = {
            name: {
                "phase": fastest,
                "step_img_s": need,
                "loader_img_s": lo["img_s"],
                "ratio": lo["img_s"] / need,
                "keeps_up": lo["img_s"] >= need,
            }
            for name, lo in loader.items()
        }
    sweep: dict = {}
    try:
        sweep = fork_sweep(args, tmp, timeout=max(30.0, args.budget_s - (time.perf_counter() - T0)))
        if sweep["rc"] != 0 or sweep.get("trials_finished") != 2:
            errors.append(
                {"part": "sweep", "error": f"rc {sweep['rc']}, trials finished {sweep.get('trials_finished')} of 2"}
            )
    except Exception as exc:
        errors.append({"part": "sweep", "error": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
    say(f"sweep: {sweep.get('trials_finished')} trials finished in {sweep.get('wall_s', float('nan')):.1f} s")
    wall = time.perf_counter() - T0
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "device": device_info(args.device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "memory_kind": "CUDA max allocated per phase, less the other phases' state"
        if args.device == "cuda"
        else "none per phase on CPU (peak_mib null); process_peak_rss_mib is the whole run's peak RSS",
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": steps,
        "loader": loader,
        "loader_keeps_up": keeps_up,
        "sweep": sweep,
        "errors": errors,
        "wall_time_s": wall,
    }
    payload["scratch_kept"] = str(tmp) if errors else None  # the sweep's logs and stores, to look into a failure
    path = args.out or RESULTS / f"gpu_check_{args.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print_table(payload)
    print(f"total {wall:.1f} s; {len(errors)} part(s) failed; written {path}")
    if not errors:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if errors else 0


def print_table(p: dict) -> None:
    """The compact summary: one row per model and phase, one line each for the loader, its keeping up, the sweep."""
    d = p["device"]
    print(f"{d['name']} ({d['type']}{', bf16' if d['bf16_autocast'] else ''}), torch {d['torch']}, CUDA {d['cuda']}")
    print(f"{'model':<12}{'phase':<13}{'batch':>6}{'s/step':>9}{'img/s':>9}{'x full':>8}{'peak MiB':>10}")
    for preset, model in p["steps"].items():
        for phase, r in model["phases"].items():
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
            print(
                f"{preset:<12}{phase:<13}{r['batch']:>6}{r['s_per_step']:>9.4f}{r['img_s']:>9.1f}{r['ratio_to_full']:>8.3f}{peak:>10}"
            )
    for name, lo in p["loader"].items():
        ups = ", ".join(
            f"{m} {k[name]['ratio']:.2f}x {'ok' if k[name]['keeps_up'] else 'SHORT'}"
            for m, k in p["loader_keeps_up"].items()
        )
        print(
            f"loader {name}: {lo['img_s']:.0f} img/s, {lo['workers']} workers; loader/step of the fastest phase: {ups}"
        )
    s = p["sweep"]
    if s:
        print(
            f"sweep: {s.get('trials_finished')}/2 trials finished, {s['wall_s']:.1f} s, "
            f"epochs trained {s.get('epochs_trained_total')} "
            f"(naive {s.get('epochs_naive_total')}), front {len(s['front']) - 1 if s['front'] else 0} rows"
        )
    for e in p["errors"]:
        print(f"FAILED {e['part']}: {e['error']}")


if __name__ == "__main__":
    sys.exit(main())
