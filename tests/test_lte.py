"""`strategy: lte` (LoRA-the-Explorer): the reference's equivalences in fp64 on a real vit-digits ViT
(one head is plain LoRA for any T; after a merge W = W0 + (s/H)·Σ B_h·A_h and every head computes W·x;
H heads on one batch with SGD are multi-head LoRA), the merge clock across epochs (hand-worked steps),
validation of the merged state that leaves training alone, per-head gradient clipping (hand-worked
numbers), `frozen` as the reference's ViT example (every linear headed, the rest frozen), each head's
samples whatever the workers, an exact resume and the plain-ViT export on one worker, the settings'
one-line errors, and Ray runs: 4 heads on 1, 2 and 4 workers give the same merged weights, per-worker
checkpoint files, comm_bytes_per_step, and a worker killed between merges that resumes with every
worker's heads and ends equal to the uninterrupted run."""

from __future__ import annotations

import copy
import os
import types

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from prelora_ray import metrics as M
from prelora_ray.adapters.lora import adapter_root, inject_lora
from prelora_ray.adapters.lte import inject_lte_heads, lte_modules, remove_lte_heads, set_lte_trainable
from prelora_ray.adapters.names import ADAPTER, is_adapter_param
from prelora_ray.config import DataSettings, TrainSettings
from prelora_ray.data import make_train_loader
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


def with_heads(heads: int) -> nn.Module:
    model = plain64()
    names = [n for layer_names in family_module_names(model, FAMILIES).values() for n in layer_names]
    inject_lte_heads(model, names, rank=RANK, scale=SCALE, seed=5, global_heads=list(range(heads)))
    set_lte_trainable(model, train_others=False)
    return model.train()


def batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def merge(model: nn.Module, heads: int) -> None:
    """The strategy's own merge, on one worker."""
    cfg = TrainSettings.load(
        None,
        ["strategy=lte", f"lte.num_heads={heads}", f"data.batch_size={8 * heads}", "lte.train_others=frozen"],
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
    "lte.num_heads=2",
    "lte.merge_every=5",
    "lte.rank=4",
    "lte.alpha=8",
]  # 256 images, a batch of 32: 8 steps per epoch


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


# 8 steps per epoch, T = 5, 3 epochs: the optimizer steps (counted over the run) at which the loop all-reduces the
# heads' mean delta, and the merges so far at each epoch's end
CLOCK = {
    # the reference's clock: merges at steps 5, 10, 15, 20, and 24 (the run's end, 4 steps after the last);
    # validation sees the merged state at the ends of epochs 0 and 1 (steps 8 and 16), with no merge
    "merged": ((), [5, 8, 10, 15, 16, 20, 24], [1, 3, 5]),
    # the base as it stands: nothing at 8 and 16
    "base": (("lte.validation=base",), [5, 10, 15, 20, 24], [1, 3, 5]),
    # a merge at every epoch's end too, the count restarting there: 5, 8 | 13, 16 | 21, 24
    "epoch_end": (("lte.merge_at_epoch_end=true",), [5, 8, 13, 16, 21, 24], [2, 4, 6]),
}


@pytest.fixture(scope="module")
def clock_runs(one_thread):
    return {name: counted_run(cfg(*extra)) for name, (extra, _, _) in CLOCK.items()}


@pytest.mark.parametrize("name", list(CLOCK))
def test_the_merge_clock_counts_optimizer_steps_across_epochs(clock_runs, name):
    loop, runtime = clock_runs[name]
    _, means, merges = CLOCK[name]
    assert [s for kind, s in runtime.calls if kind == "mean"] == means
    # two sums per epoch (the train loss, the validation counts); nothing per step: no DDP, no per-step loss
    assert [s for kind, s in runtime.calls if kind == "sum"] == [8, 8, 16, 16, 24, 24]
    assert {kind for kind, _ in runtime.calls} == {"mean", "sum"}
    assert [r[LTE_MERGES] for r in runtime.reports] == merges
    assert loop.strategy.state.since_merge == 0  # the run ended with a merge: the export holds every step
    assert [r[M.PHASE_INDEX] for r in runtime.reports] == [Phase.LTE.index] * 3 == [4] * 3
    assert all(r[M.COMM_BYTES_PER_STEP] == 0 for r in runtime.reports)  # one worker sends nothing
    assert runtime.reports[-1][M.VAL_ACC] > 0.3


def test_validating_the_merged_state_leaves_training_alone(clock_runs):
    merged, base, epoch_end = (clock_runs[name][0] for name in ("merged", "base", "epoch_end"))
    assert [h[M.TRAIN_LOSS] for h in merged.state.history] == [h[M.TRAIN_LOSS] for h in base.state.history]
    state, base_state = merged.model.state_dict(), base.model.state_dict()
    assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
    # the base alone is stale at the ends of epochs 0 and 1 (3 and 1 steps since the last merge), not at the run's end
    val, base_val = ([h[M.VAL_LOSS] for h in loop.state.history] for loop in (merged, base))
    assert val[0] != base_val[0] and val[1] != base_val[1] and val[2] == base_val[2]
    # at epoch 0's end validation saw what a merge there makes (merge_at_epoch_end trained the same 8 steps)
    for key in (M.VAL_LOSS, M.VAL_ACC):
        assert merged.state.history[0][key] == epoch_end.state.history[0][key]


@pytest.fixture(scope="module")
def reference(clock_runs):
    return clock_runs["merged"]


def test_resume_between_epochs_is_exact_and_the_export_is_a_plain_vit(reference, tmp_path):
    ref_loop, ref_runtime = reference
    first = LocalRuntime(stop_after_epoch=0)
    with pytest.raises(StopTraining):
        TrainingLoop(cfg(), first).run()
    assert first.checkpoints[-1]["worker"]["rank"] == 0 and first.checkpoints[-1]["worker"]["model"]
    assert first.checkpoints[-1]["strategy"]["since_merge"] == 3  # the clock goes on from the checkpoint
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


def test_grad_clip_clips_each_head_alone_and_the_others_on_their_batch_mean():
    loop = TrainingLoop(cfg(), LocalRuntime())  # `averaged`, one worker with both heads
    loop.strategy.prepare(loop, loop.state.phase)
    loop.rebuild()
    for param in loop.model.parameters():
        param.grad = torch.zeros_like(param) if param.requires_grad else None
    heads = lte_modules(loop.model)
    q, fc2 = heads["vit.layers.0.attention.q_proj"], heads["vit.layers.3.mlp.fc2"]
    q.lte_A.grad[0, 1, 2] = 3.0  # head 0: norm 5 over two layers
    fc2.lte_B.grad[0, 4, 0] = 4.0
    q.lte_B.grad[1, 0, 3] = 0.3  # head 1: norm 0.3, under the clip
    # the others' gradient is the sum of the two heads' chunk means: 6 and 8 are a batch mean of 3 and 4, norm 5
    cls_bias, norm_weight = loop.model.classifier.bias, loop.model.vit.layernorm.weight
    cls_bias.grad[7] = 6.0
    norm_weight.grad[5] = 8.0
    loop.strategy.clip_gradients(loop, 1.0)
    # torch's rule on each group alone: g · 1 / (norm + 1e-6) when the norm is above 1
    assert float(q.lte_A.grad[0, 1, 2]) == pytest.approx(3.0 / (5.0 + 1e-6), rel=1e-6)
    assert float(fc2.lte_B.grad[0, 4, 0]) == pytest.approx(4.0 / (5.0 + 1e-6), rel=1e-6)
    assert float(q.lte_B.grad[1, 0, 3]) == pytest.approx(0.3, rel=1e-6)
    assert float(cls_bias.grad[7]) == pytest.approx(3.0 / (5.0 + 1e-6), rel=1e-6)
    assert float(norm_weight.grad[5]) == pytest.approx(4.0 / (5.0 + 1e-6), rel=1e-6)
    nonzero = sum(int((p.grad != 0).sum()) for p in loop.model.parameters() if p.grad is not None)
    assert nonzero == 5


def test_frozen_is_the_reference_vit_example_every_linear_headed_the_rest_frozen_the_classifier_learning():
    settings = cfg("lte.train_others=frozen")
    init = {k: v.clone() for k, v in TrainingLoop(settings, LocalRuntime()).model.state_dict().items()}
    loop, runtime = counted_run(settings)
    heads = lte_modules(loop.model)
    encoder = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    assert list(heads) == [
        "vit.embeddings.patch_embeddings.projection",
        *(f"vit.layers.{i}.{linear}" for i in range(4) for linear in encoder),
        "classifier",
    ]
    trainable = [n for n, p in loop.model.named_parameters() if p.requires_grad]
    assert trainable == [f"{m}.{part}" for m in heads for part in ("lte_A", "lte_B")]
    # the run ended with a merge: each headed weight is W0 + (s/H)·Σ_h B_h·A_h, the classifier's and the patch
    # projection's (in the conv's shape) included
    for name, module in heads.items():
        w0 = init[f"{name}.weight"]
        product = torch.bmm(module.lte_B.detach(), module.lte_A.detach()).sum(0).view_as(w0)
        torch.testing.assert_close(module.base_layer.weight.detach(), w0 + SCALE / 2 * product, atol=1e-5, rtol=0)
        assert (module.base_layer.weight - w0).abs().max() > 1e-3, name
    plain = remove_lte_heads(copy.deepcopy(loop.model)).state_dict()
    rest = [k for k in plain if k.removesuffix(".weight") not in heads]
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings", "classifier.bias"} <= set(rest)
    assert "vit.layernorm.weight" in rest and "vit.embeddings.patch_embeddings.projection.bias" in rest
    assert all(torch.equal(plain[k], init[k]) for k in rest)
    assert [r[LTE_MERGES] for r in runtime.reports] == [1, 3, 5]
    assert runtime.reports[-1][M.VAL_ACC] > 0.3


def test_full_epochs_first_then_lte_with_a_frozen_rest():
    loop, runtime = counted_run(cfg("epochs=2", "lte.start_epoch=1", "lte.train_others=frozen"))
    assert [r[M.PHASE] for r in runtime.reports] == ["full", "lte"]
    assert [r[LTE_MERGES] for r in runtime.reports] == [0, 2]  # step 5 of LTE, and its end (8)
    trainable = {n for n, p in loop.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lte_A", ".lte_B")) for n in trainable)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_each_global_head_sees_the_same_samples_whatever_the_workers(workers):
    n, per_step, heads, seed, epoch = 64, 16, 4, 7, 1  # 4 steps of 16 samples over all workers, 4 heads of 4
    data = TensorDataset(torch.arange(n))
    # DistributedSampler's one permutation (seed + epoch) for every worker
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    local = heads // workers
    for rank in range(workers):
        loader, sampler = make_train_loader(
            data,
            DataSettings(batch_size=per_step // workers),
            "cpu",
            world_size=workers,
            rank=rank,
            seed=seed,
            chunks=local,
        )
        sampler.set_epoch(epoch)
        batches = [b for (b,) in loader]
        assert len(batches) == n // per_step
        for step, batch in enumerate(batches):
            for chunk, rows in enumerate(batch.view(local, -1)):
                head = rank + workers * chunk  # the head's global index
                assert rows.tolist() == [perm[per_step * step + head + heads * i] for i in range(per_step // heads)]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("data.batch_size=30",), "data.batch_size"),  # 4 heads on one worker
        (("cluster.num_workers=3",), "lte.num_heads"),  # 4 heads cannot be shared by 3 workers
        (("lte.num_heads=0",), "lte.num_heads"),
        (("lte.rank=0",), "lte.rank"),
        (("lte.merge_every=0",), "lte.merge_every"),
        (("lte.validation=heads",), "lte.validation"),
        (("lte.merge_at_epoch_end=sometimes",), "lte.merge_at_epoch_end"),
        (("lte.start_epoch=3",), "lte.start_epoch"),
        (("lte.alpha=0",), "lte.alpha"),
        (("lte.train_others=trained",), "lte.train_others"),
        (("lte.train_others=frozen", "prelora.modules=[query,value]"), "prelora.modules"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(overrides, key):
    with pytest.raises(ValueError) as err:
        cfg("lte.num_heads=4", *overrides)  # batch 32
    assert f"{key}=" in str(err.value) and "\n" not in str(err.value)


# -- Ray Train workers ------------------------------------------------------------------------------------
RAY_CFG = [
    *LTE_CFG,
    "lte.num_heads=4",
    "lte.train_others=frozen",
    "optim.grad_clip=0.1",  # it bites: each head is clipped on its own, so the worker split cannot matter
    "tracking.enabled=false",
    "cluster.num_workers=2",
    "cluster.cpus_per_worker=1",
    "cluster.checkpoints_to_keep=4",
]  # 256 images, 64 per step over the workers: 4 steps per epoch; merges at steps 5, 10 and the run's end (12)


def ray_cfg(tmp, name: str, *extra: str) -> TrainSettings:
    return TrainSettings.load(
        None, [*RAY_CFG, f"cluster.storage_path={tmp / 'ray'}", f"output_dir={tmp / 'out'}", f"name={name}", *extra]
    )


@pytest.fixture(scope="module")
def two_workers(ray_local, tmp_path_factory):
    """An uninterrupted 2-worker run (2 heads each), and one whose rank 0 dies between two merges of epoch 2
    (max_failures=1)."""
    from prelora_ray.orchestration.train import run_train

    tmp = tmp_path_factory.mktemp("lte-ray")
    plain = run_train(ray_cfg(tmp, "plain"))
    # before batch 1 of epoch 2: after step 9, between the merges at steps 5 and 10. Not in epoch 1: Ray Train
    # registers a checkpoint only once its controller has polled every worker's report (every 0.2 s), and these
    # epochs take less than that
    fault = {"PRELORA_FAULT_EPOCH": "2", "PRELORA_FAULT_BATCH": "1", "PRELORA_FAULT_MARKER": str(tmp / "fired")}
    os.environ.update(fault)
    try:
        killed = run_train(ray_cfg(tmp, "killed", "cluster.max_failures=1"))
    finally:
        for key in fault:
            os.environ.pop(key, None)
    assert (tmp / "fired").exists()
    return tmp, plain, killed


@pytest.mark.slow
def test_four_heads_on_one_two_or_four_workers_give_the_same_merged_weights(two_workers):
    from transformers import ViTForImageClassification

    from prelora_ray.orchestration.train import run_train

    tmp, two, _ = two_workers
    # the same 64 samples per step over the workers: 1 x 64, 2 x 32, 4 x 16
    one = TrainingLoop(
        TrainSettings.load(None, [*RAY_CFG, "cluster.num_workers=1", "data.batch_size=64"]), LocalRuntime()
    )
    one.run()
    one.export_merged(tmp / "one")
    four = run_train(ray_cfg(tmp, "four", "cluster.num_workers=4", "cluster.cpus_per_worker=0.5", "data.batch_size=16"))
    runs = {"one": one.state.history, "two": two["history"], "four": four["history"]}
    for name, history in runs.items():
        assert [h[LTE_MERGES] for h in history] == [0, 1, 3], name
        for got, want in zip(history, runs["one"], strict=True):
            assert got[M.TRAIN_LOSS] == pytest.approx(want[M.TRAIN_LOSS], rel=1e-5), name
            assert got[M.VAL_ACC] == want[M.VAL_ACC], name
    merged = {
        name: ViTForImageClassification.from_pretrained(path).state_dict()
        for name, path in (("one", tmp / "one"), ("two", two["merged_model_path"]), ("four", four["merged_model_path"]))
    }
    for name in ("two", "four"):
        assert merged[name].keys() == merged["one"].keys()
        for key, value in merged["one"].items():
            torch.testing.assert_close(merged[name][key], value, atol=2e-6, rtol=1e-5, msg=f"{name}: {key}")


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
    # one fp32 delta per headed linear: the patch projection (64 x 3·2·2), 4 encoder layers, the classifier (10 x 64)
    shapes = [(64, 12)] + [(64, 64)] * 4 * 4 + [(128, 64), (64, 128)] * 4 + [(10, 64)]
    delta_bytes = 4 * sum(o * i for o, i in shapes)
    # all-reduces of deltas per epoch: the merged state for validation (step 4); the merge at 5 and validation at 8;
    # the merge at 10 and the run's last (12). Plus the train-loss (2) and validation (3) float64 sums, over 4 steps
    assert [h[M.COMM_BYTES_PER_STEP] for h in plain["history"]] == [(k * delta_bytes + 5 * 8) / 4 for k in (1, 2, 2)]


@pytest.mark.slow
def test_a_worker_killed_between_merges_resumes_with_every_workers_heads_and_ends_equal(two_workers):
    _, plain, killed = two_workers
    assert killed["resumed_at"] in ([1], [2])  # from a checkpoint, not from scratch (see the fixture)
    assert [h[M.TRAIN_LOSS] for h in killed["history"]] == [h[M.TRAIN_LOSS] for h in plain["history"]]
    from transformers import ViTForImageClassification

    a = ViTForImageClassification.from_pretrained(plain["merged_model_path"]).state_dict()
    b = ViTForImageClassification.from_pretrained(killed["merged_model_path"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
