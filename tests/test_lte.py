"""`strategy: lte` (LoRA-the-Explorer): the reference's equivalences in fp64 on a real vit-digits ViT
(one head is plain LoRA for any T; after a merge W = W0 + (s/H)·Σ B_h·A_h and every head computes W·x;
H heads on one batch with SGD are multi-head LoRA), the loop's merge schedule and its only
collectives, an exact resume and the plain-ViT export on one worker, the settings' one-line errors,
and a 2-worker Ray run: equal to the same two heads emulated on one worker, per-worker checkpoint
files, comm_bytes_per_step, and a worker killed between merges that resumes with every worker's heads
and ends equal to the uninterrupted run."""

from __future__ import annotations

import copy
import os
import types

import pytest
import torch
from torch import nn

from prelora_ray import metrics as M
from prelora_ray.adapters.lora import adapter_root, inject_lora
from prelora_ray.adapters.lte import inject_lte_heads, lte_modules, set_lte_trainable
from prelora_ray.adapters.names import ADAPTER, is_adapter_param
from prelora_ray.config import TrainSettings
from prelora_ray.models import FAMILY_MODULES, family_module_names
from prelora_ray.runtime import LocalRuntime, StopTraining
from prelora_ray.strategies import Phase
from prelora_ray.strategies.lte import LTE, LTE_MERGES
from prelora_ray.strategies.prelora import PreLoRASettings
from prelora_ray.trainer import TrainingLoop
from tests.builders import LOOP_BASE as BASE
from tests.builders import tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
FAMILIES = tuple(FAMILY_MODULES)


# -- the heads on a model, in fp64 ----------------------------------------------------------------------
def plain64() -> nn.Module:
    return tiny_vit(seed=0).double()


def with_heads(heads: int, *, first_head: int = 0) -> nn.Module:
    model = plain64()
    names = [n for layer_names in family_module_names(model, FAMILIES).values() for n in layer_names]
    inject_lte_heads(model, names, heads=heads, rank=RANK, scale=SCALE, seed=5, first_head=first_head)
    set_lte_trainable(model, train_others=False)
    return model.train()


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def merge(model: nn.Module, heads: int) -> None:
    """The strategy's own merge, on one worker."""
    cfg = TrainSettings.load(
        None,
        ["strategy=lte", f"lte.heads_per_worker={heads}", f"data.batch_size={8 * heads}", "lte.train_others=frozen"],
    )
    LTE(cfg).merge(types.SimpleNamespace(model=model, all_reduce_mean=LocalRuntime().all_reduce_mean))


def heads_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("merge_every", [1, 3, 7])
def test_one_head_is_plain_lora_at_every_step_for_any_merge_every(merge_every):
    lte = with_heads(1)
    lora = (
        inject_lora(plain64(), {f: [RANK] * 4 for f in FAMILIES}, PreLoRASettings(alpha_scale=SCALE)).double().train()
    )
    root = adapter_root(lora)
    with torch.no_grad():  # the same A (the LTE head's), B = 0 in both
        for name, module in lte_modules(lte).items():
            root.get_submodule(name).lora_A[ADAPTER].weight.copy_(module.lte_A[0])
    for name, p in lora.named_parameters():
        p.requires_grad_(is_adapter_param(name))
    opts = [torch.optim.AdamW(heads_params(m), lr=1e-3, weight_decay=0.01) for m in (lte, lora)]
    for step in range(1, 15):
        x, y = batch(6, step)
        outs = []
        for model, opt in zip((lte, lora), opts, strict=True):
            logits = model(pixel_values=x).logits
            outs.append(logits.detach())
            opt.zero_grad()
            nn.functional.cross_entropy(logits, y).backward()
            opt.step()
        torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0, msg=f"step {step}")
        if step % merge_every == 0:
            merge(lte, 1)
    merge(lte, 1)  # after a merge the base alone (eval) is the LoRA model
    x, _ = batch(6, 99)
    torch.testing.assert_close(
        lte.eval()(pixel_values=x).logits, lora.eval()(pixel_values=x).logits, atol=1e-10, rtol=0
    )


def test_h_heads_merge_into_w0_plus_mean_head_product_and_keep_a_b_and_optimizer_state():
    heads = 3
    model = with_heads(heads)
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in lte_modules(model).items()}
    opt = torch.optim.AdamW(heads_params(model), lr=2e-2)
    for step in range(1, 7):
        x, y = batch(3 * 4, step)  # a different chunk of 4 per head
        opt.zero_grad()
        (heads * nn.functional.cross_entropy(model(pixel_values=x).logits, y)).backward()
        opt.step()
        if step % 2:
            continue
        kept = [p.detach().clone() for p in heads_params(model)]
        moments = copy.deepcopy(opt.state_dict())
        merge(model, heads)
        assert all(torch.equal(a, b) for a, b in zip(kept, heads_params(model), strict=True))
        after = opt.state_dict()
        assert all(
            torch.equal(after["state"][i][k], moments["state"][i][k])
            for i in moments["state"]
            for k in ("exp_avg", "exp_avg_sq", "step")
        )
        for name, module in lte_modules(model).items():
            expected = w0[name] + SCALE / heads * torch.bmm(module.lte_B, module.lte_A).sum(0)
            torch.testing.assert_close(module.base_layer.weight, expected, atol=1e-10, rtol=0)
            for head_weight in module.head_weights():  # every head's effective weight is W right after the merge
                torch.testing.assert_close(head_weight, module.base_layer.weight.detach(), atol=1e-12, rtol=0)
        x1, _ = batch(4, 100 + step)
        with torch.no_grad():
            per_head = model.train()(pixel_values=x1.repeat(heads, 1, 1, 1)).logits.view(heads, 4, -1)
            plain = model.eval()(pixel_values=x1).logits
        model.train()
        for h in range(heads):
            torch.testing.assert_close(per_head[h], plain, atol=1e-10, rtol=0)
        assert any(m.lte_B.abs().sum() > 0 for m in lte_modules(model).values())


class MultiHeadLoRA(nn.Module):
    """The reference the LTE heads must match: W0 + (s/H)·Σ_h B_h·A_h on the whole batch (a test-only linear)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, heads: int) -> None:
        super().__init__()
        self.base, self.heads = base, heads
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(torch.zeros(heads, base.out_features, a.shape[1], dtype=a.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight + SCALE / self.heads * torch.bmm(self.b, self.a).sum(0)
        return nn.functional.linear(x, weight, self.base.bias)


def test_h_heads_on_one_batch_with_sgd_and_merge_every_1_are_multi_head_lora():
    heads, lr = 3, 0.05
    lte = with_heads(heads)
    multi = plain64().train()
    for p in multi.parameters():
        p.requires_grad_(False)
    for name, module in lte_modules(lte).items():
        parent, _, child = name.rpartition(".")
        setattr(
            multi.get_submodule(parent), child, MultiHeadLoRA(multi.get_submodule(name), module.lte_A.detach(), heads)
        )
    # each LTE head's gradient is its chunk's mean (the worker's loss times H): H times multi-head LoRA's, so lr/H
    opt_lte = torch.optim.SGD(heads_params(lte), lr=lr / heads)
    opt_multi = torch.optim.SGD([p for p in multi.parameters() if p.requires_grad], lr=lr)
    for step in range(1, 6):
        x, y = batch(5, step)
        opt_lte.zero_grad()
        (
            heads * nn.functional.cross_entropy(lte(pixel_values=x.repeat(heads, 1, 1, 1)).logits, y.repeat(heads))
        ).backward()
        opt_lte.step()
        merge(lte, heads)
        opt_multi.zero_grad()
        nn.functional.cross_entropy(multi(pixel_values=x).logits, y).backward()
        opt_multi.step()
        for name, module in lte_modules(lte).items():
            ref = multi.get_submodule(name)
            torch.testing.assert_close(module.lte_A, ref.a, atol=1e-10, rtol=0)
            torch.testing.assert_close(module.lte_B, ref.b, atol=1e-10, rtol=0)
            torch.testing.assert_close(
                module.base_layer.weight,
                ref.base.weight + SCALE / heads * torch.bmm(ref.b, ref.a).sum(0),
                atol=1e-10,
                rtol=0,
            )
    x, _ = batch(5, 50)
    torch.testing.assert_close(
        lte.eval()(pixel_values=x).logits, multi.eval()(pixel_values=x).logits, atol=1e-10, rtol=0
    )


# -- the strategy in the loop, one worker -----------------------------------------------------------------
LTE_CFG = [
    *BASE,
    "epochs=3",
    "strategy=lte",
    "lte.heads_per_worker=2",
    "lte.merge_every=3",
    "lte.rank=4",
    "lte.alpha=8",
]


def cfg(*extra: str) -> TrainSettings:
    return TrainSettings.load(None, [*LTE_CFG, *extra])


class CountingRuntime(LocalRuntime):
    """Records the optimizer step at every collective the loop makes."""

    loop: TrainingLoop

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[str, int]] = []

    def all_reduce_sum(self, values):
        self.calls.append(("sum", self.loop.state.step))
        return super().all_reduce_sum(values)

    def all_reduce_mean(self, tensors):
        self.calls.append(("mean", self.loop.state.step))
        return super().all_reduce_mean(tensors)

    def broadcast_object(self, obj):
        self.calls.append(("broadcast", self.loop.state.step))
        return super().broadcast_object(obj)

    def all_gather_object(self, obj):
        self.calls.append(("gather", self.loop.state.step))
        return super().all_gather_object(obj)


def counted_run(settings: TrainSettings, **kwargs) -> tuple[TrainingLoop, CountingRuntime]:
    runtime = CountingRuntime(**kwargs)
    loop = TrainingLoop(settings, runtime)
    runtime.loop = loop
    loop.run()
    return loop, runtime


@pytest.fixture(scope="module")
def reference(one_thread):
    return counted_run(cfg())


def test_collectives_only_at_merges_and_the_epoch_ends(reference):
    loop, runtime = reference
    # 8 steps per epoch: merges every 3 steps and at each epoch's end (before validation); two sums per
    # epoch (the train loss, the validation counts); nothing per step: no DDP, no per-step loss
    assert [s for kind, s in runtime.calls if kind == "mean"] == [3, 6, 8, 11, 14, 16, 19, 22, 24]
    assert [s for kind, s in runtime.calls if kind == "sum"] == [8, 8, 16, 16, 24, 24]
    assert {kind for kind, _ in runtime.calls} == {"mean", "sum"}
    assert [r[LTE_MERGES] for r in runtime.reports] == [3, 6, 9]
    assert [r[M.PHASE_INDEX] for r in runtime.reports] == [Phase.LTE.index] * 3 == [4] * 3
    assert all(r[M.COMM_BYTES_PER_STEP] == 0 for r in runtime.reports)  # one worker sends nothing
    assert runtime.reports[-1][M.VAL_ACC] > 0.3


def test_resume_between_epochs_is_exact_and_the_export_is_a_plain_vit(reference, tmp_path):
    ref_loop, ref_runtime = reference
    first = LocalRuntime(stop_after_epoch=0)
    with pytest.raises(StopTraining):
        TrainingLoop(cfg(), first).run()
    assert first.checkpoints[-1]["worker"]["rank"] == 0 and first.checkpoints[-1]["worker"]["model"]
    loop = TrainingLoop(cfg(), LocalRuntime(resume_from=first.checkpoints[-1]))
    loop.run()
    for key in (M.TRAIN_LOSS, M.VAL_LOSS, LTE_MERGES):
        assert [h[key] for h in loop.state.history] == [h[key] for h in ref_loop.state.history], key
    state, ref_state = loop.model.state_dict(), ref_loop.model.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)

    from transformers import ViTForImageClassification

    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = loop.model.eval()(pixel_values=x).logits
    path = loop.export_merged(tmp_path / "merged")
    plain = ViTForImageClassification.from_pretrained(path).eval()
    assert not any("lte_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=x).logits, expected)


def test_full_epochs_first_then_lte_with_a_frozen_rest():
    loop, runtime = counted_run(cfg("epochs=2", "lte.start_epoch=1", "lte.train_others=frozen"))
    assert [r[M.PHASE] for r in runtime.reports] == ["full", "lte"]
    assert [r[LTE_MERGES] for r in runtime.reports] == [0, 3]
    trainable = {n for n, p in loop.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lte_A", ".lte_B")) for n in trainable)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=30", "data.batch_size"),
        ("lte.rank=0", "lte.rank"),
        ("lte.merge_every=0", "lte.merge_every"),
        ("lte.heads_per_worker=0", "lte.heads_per_worker"),
        ("lte.start_epoch=3", "lte.start_epoch"),
        ("lte.alpha=0", "lte.alpha"),
        ("lte.train_others=trained", "lte.train_others"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ValueError) as err:
        cfg("lte.heads_per_worker=4", override)  # batch 32: 30 is not a multiple of 4
    assert f"{key}=" in str(err.value) and "\n" not in str(err.value)


# -- two Ray Train workers --------------------------------------------------------------------------------
RAY_CFG = [
    *LTE_CFG,
    "lte.heads_per_worker=1",
    "lte.train_others=frozen",
    "optim.grad_clip=null",
    "tracking.enabled=false",
    "cluster.num_workers=2",
    "cluster.cpus_per_worker=1",
    "cluster.checkpoints_to_keep=4",
]  # 128 images, 4 steps per worker-epoch


def ray_cfg(tmp, name: str, *extra: str) -> TrainSettings:
    return TrainSettings.load(
        None, [*RAY_CFG, f"cluster.storage_path={tmp / 'ray'}", f"output_dir={tmp / 'out'}", f"name={name}", *extra]
    )


@pytest.fixture(scope="module")
def two_workers(ray_local, tmp_path_factory):
    """An uninterrupted 2-worker run, and one whose rank 0 dies between two merges of epoch 2 (max_failures=1)."""
    from prelora_ray.orchestration.train import run_train

    tmp = tmp_path_factory.mktemp("lte-ray")
    plain = run_train(ray_cfg(tmp, "plain"))
    # after step 9; merges at steps 8 (epoch 1's end) and 11. Not in epoch 1: Ray Train registers a checkpoint only
    # once its controller has polled every worker's report (every 0.2 s), and these epochs take less than that
    fault = {"PRELORA_FAULT_EPOCH": "2", "PRELORA_FAULT_BATCH": "1", "PRELORA_FAULT_MARKER": str(tmp / "fired")}
    os.environ.update(fault)
    try:
        killed = run_train(ray_cfg(tmp, "killed", "cluster.max_failures=1"))
    finally:
        for key in fault:
            os.environ.pop(key, None)
    assert (tmp / "fired").exists()
    return tmp, plain, killed


class TwoShards:
    """One worker's loader giving, as each batch, worker 0's batch followed by worker 1's (their DistributedSampler
    shards)."""

    def __init__(self, loop: TrainingLoop, batch_size: int) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        self.samplers = [
            DistributedSampler(loop.data.train, num_replicas=2, rank=r, shuffle=True, seed=loop.cfg.seed)
            for r in (0, 1)
        ]
        self.loaders = [DataLoader(loop.data.train, batch_size=batch_size, sampler=s) for s in self.samplers]

    def set_epoch(self, epoch: int) -> None:
        for s in self.samplers:
            s.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for (x0, y0), (x1, y1) in zip(*self.loaders, strict=True):
            yield torch.cat([x0, x1]), torch.cat([y0, y1])


@pytest.mark.slow
def test_two_workers_equal_two_heads_emulated_on_one_worker(two_workers):
    tmp, plain, _ = two_workers
    settings = TrainSettings.load(
        None, [*RAY_CFG, "cluster.num_workers=1", "lte.heads_per_worker=2", "data.batch_size=64"]
    )
    loop = TrainingLoop(settings, LocalRuntime())
    loop.train_loader = loop.sampler = TwoShards(loop, 32)
    loop.run()
    assert [h[LTE_MERGES] for h in plain["history"]] == [h[LTE_MERGES] for h in loop.state.history] == [2, 4, 6]
    for got, want in zip(plain["history"], loop.state.history, strict=True):
        assert got[M.TRAIN_LOSS] == pytest.approx(want[M.TRAIN_LOSS], rel=1e-5)
        assert got[M.VAL_ACC] == want[M.VAL_ACC]
    from transformers import ViTForImageClassification

    merged = ViTForImageClassification.from_pretrained(plain["merged_model_path"]).state_dict()
    loop.export_merged(tmp / "emulated")
    emulated = ViTForImageClassification.from_pretrained(tmp / "emulated").state_dict()
    assert merged.keys() == emulated.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], emulated[key], atol=2e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_every_worker_keeps_its_own_heads_in_the_checkpoint_and_comm_is_merges_plus_sums(two_workers):
    tmp, plain, _ = two_workers
    folders = sorted(p for p in (tmp / "ray" / "plain").glob("checkpoint_*") if p.is_dir())
    assert folders
    for folder in folders:
        assert {"state.pt", "worker_rank0.pt", "worker_rank1.pt"} <= {p.name for p in folder.iterdir()}
    from prelora_ray.orchestration.worker import load_checkpoint_dir

    last = [load_checkpoint_dir(folders[-1], rank=r)["worker"] for r in (0, 1)]
    assert [w["rank"] for w in last] == [0, 1]
    assert any(
        not torch.equal(last[0]["model"][k], last[1]["model"][k]) for k in last[0]["model"] if k.endswith("lte_A")
    )
    # per epoch: 2 merges of one fp32 delta per headed linear, plus the train-loss (2) and validation (3) float64 sums,
    # over 4 steps
    shapes = [(64, 64)] * 4 + [(128, 64), (64, 128)]
    merge_bytes = 4 * sum(o * i for o, i in shapes) * 4  # 4 layers
    assert [h[M.COMM_BYTES_PER_STEP] for h in plain["history"]] == [(2 * merge_bytes + 5 * 8) / 4] * 3


@pytest.mark.slow
def test_a_worker_killed_between_merges_resumes_with_every_workers_heads_and_ends_equal(two_workers):
    _, plain, killed = two_workers
    assert killed["resumed_at"] in ([1], [2])  # from a checkpoint, not from scratch (see the fixture)
    assert [h[M.TRAIN_LOSS] for h in killed["history"]] == [h[M.TRAIN_LOSS] for h in plain["history"]]
    from transformers import ViTForImageClassification

    a = ViTForImageClassification.from_pretrained(plain["merged_model_path"]).state_dict()
    b = ViTForImageClassification.from_pretrained(killed["merged_model_path"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
