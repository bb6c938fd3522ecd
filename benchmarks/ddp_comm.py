"""Bytes all-reduced per optimizer step, FULL vs LORA phase (DDP) vs LTE at T = 1, 10, 100: 2 workers, gloo, on CPU.

    python benchmarks/ddp_comm.py [--preset vit-small] [--image-size 64] [--batch 8] [--lte-steps 100]

Each DDP phase is wrapped in DistributedDataParallel with a communication hook that counts the bytes
of every bucket it all-reduces (then all-reduces it as the default hook does). Frozen weights have no
gradient, so DDP leaves them out of its buckets: the LoRA phase sends only adapter gradients.

LTE (`strategy: lte`, one head per worker, rank --lte-rank) has no DDP: its merge (the strategy's own
`LTE.merge`, with the frozen rest) all-reduces one fp32 delta per headed linear every T steps, in
one flat buffer; the hook here counts its bytes. Step time: mean over the timed optimizer steps
(forward, backward, AdamW, and for LTE the merges that fall in them).
"""

from __future__ import annotations

import argparse
import os
import time
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import build_phase, write_json
from torch.nn.parallel import DistributedDataParallel as DDP

from prelora_ray.adapters.lte import inject_lte_heads, set_lte_trainable
from prelora_ray.config import ModelSettings, TrainSettings
from prelora_ray.models import FAMILY_MODULES, build_model, family_module_names
from prelora_ray.strategies.lte import LTE


def count_hook(state: dict, bucket):
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    state["buckets"] += 1
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0] / dist.get_world_size())


def worker(rank: int, args: argparse.Namespace, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 100, (args.batch,), generator=g)
    for phase in ("full", "lora", "lora_prefix"):
        model, _ = build_phase(args.preset, phase, image_size=args.image_size)
        ddp = DDP(model)
        state = {"bytes": 0, "buckets": 0}
        ddp.register_comm_hook(state, count_hook)
        for _ in range(args.steps):
            loss = torch.nn.functional.cross_entropy(ddp(pixel_values=x).logits, y)
            loss.backward()
            ddp.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(ddp(pixel_values=x).logits, y)
        loss.backward()
        elapsed = time.perf_counter() - start
        sent = dict(state)  # the counted steps only
        step_s = timed_steps(ddp, x, y, args.lte_steps // 10)  # every rank: DDP's all-reduces need both
        if rank == 0:
            trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            out[phase] = {
                "bytes_per_step": sent["bytes"] / (args.steps + 1),
                "buckets_per_step": sent["buckets"] / (args.steps + 1),
                "trainable_bytes": trainable,
                "fwd_bwd_s": elapsed,
                "step_s": step_s,
            }
    for t in (1, 10, 100):
        lte = lte_run(args, x, y, merge_every=t)
        if rank == 0:
            out[f"lte_T{t}"] = lte
    dist.destroy_process_group()


def timed_steps(model, x, y, steps: int) -> float:
    """Seconds per optimizer step (forward, backward, AdamW) of a DDP-wrapped phase."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def lte_run(args: argparse.Namespace, x, y, *, merge_every: int) -> dict:
    """`--lte-steps` LTE optimizer steps on this worker's head, merged every `merge_every` (the strategy's merge)."""
    torch.manual_seed(0)
    model = build_model(ModelSettings(preset=args.preset), num_classes=100, image_size=args.image_size, num_channels=3)
    names = [n for layer_names in family_module_names(model, tuple(FAMILY_MODULES)).values() for n in layer_names]
    inject_lte_heads(model, names, rank=args.lte_rank, scale=2.0, seed=0, global_heads=[dist.get_rank()])
    set_lte_trainable(model, train_others=False)
    counted = {"bytes": 0, "merges": 0}

    def all_reduce_mean(tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors])
        counted["bytes"] += flat.numel() * flat.element_size()
        counted["merges"] += 1
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]

    cfg = TrainSettings.from_dict(
        {"strategy": "lte", "lte": {"merge_every": merge_every, "train_others": "frozen", "rank": args.lte_rank}}
    )
    strategy = LTE(cfg)
    loop = types.SimpleNamespace(model=model, all_reduce_mean=all_reduce_mean)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.lte_steps + 1):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y).backward()
        opt.step()
        if step % merge_every == 0:
            strategy.merge(loop)
    elapsed = time.perf_counter() - start
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "bytes_per_step": counted["bytes"] / args.lte_steps,
        "buckets_per_step": counted["merges"] / args.lte_steps,
        "trainable_bytes": trainable,
        "step_s": elapsed / args.lte_steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vit-small")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument(
        "--lte-steps",
        type=int,
        default=100,
        help="LTE optimizer steps per T (T=100: one merge); DDP phases time a tenth of it",
    )
    ap.add_argument("--lte-rank", type=int, default=16)
    args = ap.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args, out), nprocs=2, join=True)
        rows = dict(out)
    full, lora = rows["full"]["bytes_per_step"], rows["lora"]["bytes_per_step"]
    print(
        f"{args.preset}: bytes all-reduced per optimizer step, 2 workers, gloo "
        f"(LTE: rank {args.lte_rank}, one head per worker)"
    )
    print(
        f"{'phase':<12}{'MiB/step':>10}{'colls/step':>11}{'x full':>9}{'x lora':>9}{'trainable MiB':>15}{'step s':>9}"
    )
    for phase, r in rows.items():
        r["ratio_to_full"] = r["bytes_per_step"] / full
        r["ratio_to_lora"] = r["bytes_per_step"] / lora
        print(
            f"{phase:<12}{r['bytes_per_step'] / 2**20:>10.3f}{r['buckets_per_step']:>11.2f}"
            f"{r['ratio_to_full']:>9.4f}{r['ratio_to_lora']:>9.3f}"
            f"{r['trainable_bytes'] / 2**20:>15.2f}{r['step_s']:>9.3f}"
        )
    print(f"written {write_json('ddp_comm', {'args': vars(args), 'results': rows})}")


if __name__ == "__main__":
    main()
