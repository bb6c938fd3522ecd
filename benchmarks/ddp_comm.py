"""Gradient bytes all-reduced per step, FULL vs LORA phase: 2 workers, gloo, on CPU.

    python benchmarks/ddp_comm.py [--preset vit-small] [--image-size 64] [--batch 8]

Each phase is wrapped in DistributedDataParallel with a communication hook that counts the bytes of
every bucket it all-reduces (then all-reduces it as the default hook does). Frozen weights have no
gradient, so DDP leaves them out of its buckets: the LoRA phase sends only adapter gradients.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from common import build_phase, write_json


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
        if rank == 0:
            trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            out[phase] = {"bytes_per_step": state["bytes"] / (args.steps + 1), "buckets_per_step": state["buckets"] / (args.steps + 1),
                          "trainable_bytes": trainable, "fwd_bwd_s": elapsed}
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="vit-small")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--port", type=int, default=29533)
    args = ap.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(args, out), nprocs=2, join=True)
        rows = dict(out)
    full = rows["full"]["bytes_per_step"]
    print(f"{args.preset}: gradient bytes all-reduced per step, 2 workers, gloo")
    print(f"{'phase':<12}{'MiB/step':>10}{'buckets':>9}{'x full':>9}{'trainable MiB':>15}")
    for phase, r in rows.items():
        r["ratio_to_full"] = r["bytes_per_step"] / full
        print(f"{phase:<12}{r['bytes_per_step'] / 2**20:>10.2f}{r['buckets_per_step']:>9.0f}{r['ratio_to_full']:>9.4f}{r['trainable_bytes'] / 2**20:>15.2f}")
    print(f"written {write_json('ddp_comm', {'args': vars(args), 'results': rows})}")


if __name__ == "__main__":
    main()
