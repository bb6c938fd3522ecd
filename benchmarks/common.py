"""Shared set-up of the phase benchmarks: the same model in FULL, WARMUP, LORA, LORA+frozen-prefix and RELORA.

A phase is built the way the training loop builds it: LoRA injected by prelora_ray.adapters.lora with
per-layer ranks (RELORA: one uniform rank, `relora_rank`), requires_grad set by `set_trainable`, an
AdamW over the trainable parameters.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from prelora_ray.adapters.lora import inject_lora
from prelora_ray.adapters.model import set_trainable
from prelora_ray.config import ModelSettings
from prelora_ray.models import FAMILY_MODULES, PRESETS, build_model
from prelora_ray.strategies import Phase
from prelora_ray.strategies.prelora import PreLoRASettings

RESULTS = Path(__file__).parent / "results"
PHASES = ("full", "warmup", "lora", "lora_prefix", "relora")


def relora_rank(preset: str) -> int:
    """The RELORA phase's uniform rank: hidden/4, the paper's ratio (256 on ViT-L's 1024)."""
    return max(1, PRESETS[preset].hidden_size // 4)


def ranks_for(num_layers: int, *, r_min: int = 8, r_max: int = 64, frozen_prefix: bool = False) -> dict[str, list[int]]:
    """A spread of ranks like Algorithm 2 gives (r_min..r_max cycling).

    Rank 0 on the first half with a frozen prefix.
    """
    cands = [r_min * 2**i for i in range((r_max // r_min).bit_length())]
    out = {}
    for j, family in enumerate(FAMILY_MODULES):
        ranks = [cands[(i + j) % len(cands)] for i in range(num_layers)]
        if frozen_prefix:
            ranks = [0 if i < num_layers // 2 else r for i, r in enumerate(ranks)]
        out[family] = ranks
    return out


def build_phase(
    preset: str, phase: str, *, image_size: int, num_classes: int = 100, device: str = "cpu", seed: int = 0
):
    """(model, optimizer) of one phase; the same initial weights for every phase."""
    torch.manual_seed(seed)
    model = build_model(
        ModelSettings(preset=preset), num_classes=num_classes, image_size=image_size, num_channels=3
    ).to(device)
    settings = PreLoRASettings(r_min=8, r_max=64)
    layers = PRESETS[preset].num_layers
    if phase == "full":
        set_trainable(model, Phase.FULL, settings)
    elif phase == "relora":  # uniform rank on every target layer; embeddings, norms, biases, head train in full
        model = inject_lora(model, {f: [relora_rank(preset)] * layers for f in FAMILY_MODULES}, settings).to(device)
        set_trainable(model, Phase.RELORA, settings)
    else:
        model = inject_lora(model, ranks_for(layers, frozen_prefix=phase == "lora_prefix"), settings).to(device)
        set_trainable(model, Phase.WARMUP if phase == "warmup" else Phase.LORA, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda" or None)
    return model, opt


def make_step(model, opt, images: torch.Tensor, labels: torch.Tensor, *, amp: bool = False):
    """One optimizer step as the loop does it (forward, loss, backward, clip, step)."""
    loss_fn = torch.nn.CrossEntropyLoss()
    params = [p for g in opt.param_groups for p in g["params"]]

    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(pixel_values=images).logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def timed(step, n: int) -> float:
    """Seconds per step over n steps."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and the interquartile range."""
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "iqr": q[2] - q[0]}


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>.json with the date and machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(), **payload}, indent=2))
    return path


def run_cli(args: list[str], root: Path) -> tuple[float, str]:
    """Run `prelora-ray ARGS` in `root` with its MLflow store there; its wall time and output (fails loudly)."""
    cmd = [sys.executable, "-m", "prelora_ray.cli", *args, "--tracking-uri", f"sqlite:///{root}/mlflow.db"]
    started = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}")
    return wall, proc.stdout
