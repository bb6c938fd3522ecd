"""Optimizer tools: the schedules against values worked by hand, and AdamW moment pruning (no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from prelora_ray.optim import jagged_cosine_factor, lr_factor, prune_moments, reset_moments

# 100 steps, 10 of linear warmup, restarts at 40, 60, 80 with 5 steps of rewarm, floor 0.1
JAGGED = {
    "total_steps": 100,
    "warmup_steps": 10,
    "min_ratio": 0.1,
    "first_restart": 40,
    "restart_every": 20,
    "rewarm_steps": 5,
}


def _cosine_by_hand(step: int) -> float:
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))


def test_jagged_cosine_warms_up_linearly_then_follows_the_cosine_until_the_first_restart():
    assert [jagged_cosine_factor(s, **JAGGED) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert jagged_cosine_factor(10, **JAGGED) == pytest.approx(1.0)
    for step in (25, 39):
        assert jagged_cosine_factor(step, **JAGGED) == pytest.approx(_cosine_by_hand(step))


@pytest.mark.parametrize("restart", [40, 60, 80])
def test_jagged_cosine_is_zero_at_each_restart_and_back_on_the_cosine_rewarm_steps_later(restart):
    assert jagged_cosine_factor(restart, **JAGGED) == 0.0
    back = restart + 5
    assert jagged_cosine_factor(back, **JAGGED) == pytest.approx(_cosine_by_hand(back))
    # linear in between: 2/5 of the way at restart + 2
    assert jagged_cosine_factor(restart + 2, **JAGGED) == pytest.approx(0.4 * _cosine_by_hand(back))
    assert jagged_cosine_factor(back + 3, **JAGGED) == pytest.approx(_cosine_by_hand(back + 3))


def test_jagged_cosine_without_rewarm_is_the_plain_cosine():
    for step in range(100):
        plain = lr_factor(step, total_steps=100, warmup_steps=10, schedule="cosine", min_ratio=0.1)
        assert jagged_cosine_factor(step, **{**JAGGED, "rewarm_steps": 0}) == plain


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
def test_pruning_keeps_exactly_the_top_fraction_of_each_moment_and_nothing_else_moves(keep):
    opt, params = _adam_with_state()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    chosen, other = params[:2], params[2]
    assert prune_moments(opt, chosen, keep) == 4
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


def test_reset_zeros_both_moments_keeps_the_step_and_a_param_without_state_is_skipped():
    opt, params = _adam_with_state()
    steps = [opt.state[p]["step"].clone() for p in params]
    fresh = torch.nn.Parameter(torch.ones(2))
    assert reset_moments(opt, [params[0], fresh]) == 2
    assert not opt.state[params[0]]["exp_avg"].any() and not opt.state[params[0]]["exp_avg_sq"].any()
    assert opt.state[params[1]]["exp_avg"].any()
    assert [opt.state[p]["step"] for p in params] == steps
    with pytest.raises(ValueError, match="keep=1.5"):
        prune_moments(opt, params, 1.5)
