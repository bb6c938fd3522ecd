"""Optimizer tools: ReLoRA's schedule against values worked by hand, and its AdamW moment resets (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from prelora_ray.optim import prune_moments, relora_lr_factor, reset_moments

# ReLoRA's cosine_restarts: 100 steps, 10 of warmup, restarts every 20 steps with 5 of rewarm, floor 0.1
RESTARTS = {"total_steps": 100, "warmup_steps": 10, "restart_every": 20, "rewarm_steps": 5, "min_ratio": 0.1}


def _cosine_by_hand(step: int) -> float:
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))


def test_relora_schedule_warms_up_from_zero_as_step_over_w_then_follows_the_cosine():
    """ReLoRA's first warmup is step / W: its step 0 runs at LR 0 (lr_factor's is (step + 1) / W)."""
    assert [relora_lr_factor(s, **RESTARTS) for s in (0, 1, 4, 9)] == pytest.approx([0.0, 0.1, 0.4, 0.9])
    assert relora_lr_factor(10, **RESTARTS) == pytest.approx(1.0)
    for step in (15, 19):
        assert relora_lr_factor(step, **RESTARTS) == pytest.approx(_cosine_by_hand(step))
    assert relora_lr_factor(99, **RESTARTS) == pytest.approx(_cosine_by_hand(99))
    assert _cosine_by_hand(100) == pytest.approx(0.1)


@pytest.mark.parametrize("restart", [20, 40, 80])
def test_relora_schedule_is_zero_at_each_restart_and_back_on_the_cosine_rewarm_steps_later(restart):
    assert relora_lr_factor(restart, **RESTARTS) == 0.0
    back = restart + 5
    assert relora_lr_factor(back, **RESTARTS) == pytest.approx(_cosine_by_hand(back))
    # linear in between, towards the cosine's value where it ends: 2/5 of the way at restart + 2
    assert relora_lr_factor(restart + 2, **RESTARTS) == pytest.approx(0.4 * _cosine_by_hand(back))
    assert relora_lr_factor(back + 3, **RESTARTS) == pytest.approx(_cosine_by_hand(back + 3))


def test_relora_schedule_without_rewarm_is_the_plain_cosine():
    for step in range(10, 100):
        assert relora_lr_factor(step, **{**RESTARTS, "rewarm_steps": 0}) == pytest.approx(_cosine_by_hand(step))


def _adam_with_state() -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(6, 5)),
        torch.nn.Parameter(torch.randn(7)),
        torch.nn.Parameter(torch.randn(3, 4)),
    ]
    opt = torch.optim.AdamW(params, lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        sum((p**3).sum() * (i + 1) for i, p in enumerate(params)).backward()
        opt.step()
    return opt, params


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 1.0])
def test_topk_keeps_exactly_the_top_fraction_of_each_moment_and_nothing_else_moves(keep):
    opt, params = _adam_with_state()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    chosen, other = params[:2], params[2]
    assert prune_moments(opt, chosen, mode="topk", ratio=1.0 - keep) == 4
    for p in chosen:
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = before[id(p)][key], opt.state[p][key]
            n_keep = round(keep * old.numel())
            top = set(torch.topk(old.abs().view(-1), n_keep).indices.tolist())
            survivors = set(torch.nonzero(new.view(-1)).view(-1).tolist())
            assert survivors == top, key  # exactly the top fraction (random values: no ties, no zeros)
            assert torch.equal(new.view(-1)[list(top)], old.view(-1)[list(top)])  # survivors unchanged
        assert torch.equal(opt.state[p]["step"], before[id(p)]["step"])
    assert all(torch.equal(v, before[id(other)][k]) for k, v in opt.state[other].items())


def _adam_holding(moment: torch.Tensor) -> tuple[torch.optim.AdamW, torch.nn.Parameter]:
    """An AdamW whose one parameter's m and v are `moment` and its square."""
    param = torch.nn.Parameter(torch.zeros(moment.shape))
    opt = torch.optim.AdamW([param], lr=0.01)
    opt.state[param] = {"step": torch.tensor(7.0), "exp_avg": moment.clone(), "exp_avg_sq": moment.square()}
    return opt, param


def test_magnitude_drops_every_entry_tied_at_the_quantile_worked_by_hand():
    """ReLoRA: keep |x| > quantile(|x|, ratio). |x| sorted: .1 .2 .2 .2 .2 .3 .5 .9; the 0.5-quantile sits at
    position 0.5 * 7 = 3.5, between two 0.2s: 0.2. All four 0.2s go (a top-k would keep one); .3 .5 .9 stay."""
    m = torch.tensor([0.5, -0.2, 0.2, 0.2, 0.9, -0.1, 0.3, 0.2])
    opt, param = _adam_holding(m)
    prune_moments(opt, [param], mode="magnitude", ratio=0.5)
    assert opt.state[param]["exp_avg"].tolist() == pytest.approx([0.5, 0, 0, 0, 0.9, 0, 0.3, 0])
    assert opt.state[param]["exp_avg_sq"].tolist() == pytest.approx([0.25, 0, 0, 0, 0.81, 0, 0.09, 0])
    assert opt.state[param]["step"] == 7.0
    # position 0.25 * 7 = 1.75, between .2 and .2 again: only the 0.1 and the 0.2s go
    opt, param = _adam_holding(m)
    prune_moments(opt, [param], mode="magnitude", ratio=0.25)
    assert opt.state[param]["exp_avg"].tolist() == pytest.approx([0.5, 0, 0, 0, 0.9, 0, 0.3, 0])
    # position 0.9 * 7 = 6.3: 0.5 + 0.3 * (0.9 - 0.5) = 0.62; only the 0.9 stays
    opt, param = _adam_holding(m)
    prune_moments(opt, [param], mode="magnitude", ratio=0.9)
    assert opt.state[param]["exp_avg"].tolist() == pytest.approx([0, 0, 0, 0, 0.9, 0, 0, 0])


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.8, 0.9, 0.999])
def test_magnitude_is_the_references_quantile_rule_on_tensors_full_of_ties(ratio):
    """ReLoRA's rule restated: mask = |x| > torch.quantile(|x|.flatten().float(), ratio), per tensor, m and v."""
    opt, params = _adam_with_state()
    gen = torch.Generator().manual_seed(3)
    for p in params:  # values on a coarse grid: many ties, some exact zeros
        for key in ("exp_avg", "exp_avg_sq"):
            opt.state[p][key] = torch.randint(-4, 5, opt.state[p][key].shape, generator=gen).float() / 8
    before = {id(p): {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in params}
    prune_moments(opt, params, mode="magnitude", ratio=ratio)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            old = before[id(p)][key]
            expected = old * (old.abs() > torch.quantile(old.abs().flatten().float(), ratio))
            assert torch.equal(opt.state[p][key], expected), (key, ratio)


def test_random_keeps_the_entries_whose_draw_is_above_the_ratio_and_leaves_the_global_rng_alone():
    """ReLoRA's random pruning: keep where rand > ratio (its default reset: ratio 0.999)."""
    big = torch.nn.Parameter(torch.zeros(200, 500))
    opt = torch.optim.AdamW([big], lr=0.01)
    opt.state[big] = {"step": torch.tensor(3.0), "exp_avg": torch.ones(200, 500), "exp_avg_sq": torch.ones(200, 500)}
    rng = torch.get_rng_state()
    prune_moments(opt, [big], mode="random", ratio=0.999, seed=11)
    assert torch.equal(torch.get_rng_state(), rng)
    draws = torch.rand((200, 500), generator=torch.Generator().manual_seed(11))
    assert torch.equal(opt.state[big]["exp_avg"], (draws > 0.999).float())  # m first, from the seeded generator
    kept = int(opt.state[big]["exp_avg_sq"].count_nonzero())
    assert 50 <= kept <= 150  # about 0.001 of 100 000 (this seed's draws: a fixed number)
    assert not torch.equal(opt.state[big]["exp_avg"], opt.state[big]["exp_avg_sq"])  # v gets draws of its own


def test_reset_zeros_both_moments_keeps_the_step_and_a_param_without_state_is_skipped():
    opt, params = _adam_with_state()
    steps = [opt.state[p]["step"].clone() for p in params]
    fresh = torch.nn.Parameter(torch.ones(2))
    assert reset_moments(opt, [params[0], fresh]) == 2
    assert not opt.state[params[0]]["exp_avg"].any() and not opt.state[params[0]]["exp_avg_sq"].any()
    assert opt.state[params[1]]["exp_avg"].any()
    assert [opt.state[p]["step"] for p in params] == steps
    with pytest.raises(ValueError, match="ratio=1.5"):
        prune_moments(opt, params, mode="magnitude", ratio=1.5)
    with pytest.raises(ValueError, match="mode='zero' is invalid: one of magnitude, random, topk"):
        prune_moments(opt, params, mode="zero", ratio=0.5)
