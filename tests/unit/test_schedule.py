"""The learning-rate schedule (warm-up, constant, cosine) and the weight average."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfmvr.config import OptimConfig
from dfmvr.train.schedule import RowRates, StepBudget, StepPlan, build_optimizer, lr_factor
from dfmvr.train.weights import WeightAverage


def test_warmup_then_constant_then_cosine_to_the_floor():
    f = [lr_factor(s, total_steps=100, cosine_after=60, min_lr_ratio=0.1, warmup_steps=10) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in f[10:61])
    assert f[80] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[60:], f[61:]))


def test_optimizer_follows_the_factor():
    cfg = OptimConfig(lr=1e-2, warmup_steps=4, cosine_after=6, min_lr_ratio=0.0)
    p = nn.Parameter(torch.zeros(2))
    opt, sched = build_optimizer([p], cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[4:7] == pytest.approx([1e-2] * 3)
    assert lrs[9] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))


def test_weight_average_blends_parameters_and_copies_buffers():
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    average = WeightAverage(live, OptimConfig(ema_decay=0.9))
    start = live[0].weight.detach().clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
        live[1].running_mean.fill_(5.0)
    average.update(live, step=1000)  # past warm-up: decay 0.9
    torch.testing.assert_close(average.model[0].weight, start + 0.1)
    assert torch.equal(average.model[1].running_mean, live[1].running_mean)
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())
    # early on the average follows the live weights closely: (1 + t) / (10 + t) at t = 1 is 2/11
    average2 = WeightAverage(live, OptimConfig(ema_decay=0.999))
    with torch.no_grad():
        live[0].weight.add_(1.0)
    average2.update(live, step=1)
    torch.testing.assert_close(average2.model[0].weight, live[0].weight - 1.0 + 9 / 11)


def test_row_rates_scale_adams_step_of_the_chosen_rows_only():
    torch.manual_seed(0)
    grads = [torch.randn(4, 3) for _ in range(5)]
    plain, scaled = (nn.Parameter(torch.ones(4, 3)) for _ in range(2))
    opt_plain = torch.optim.Adam([plain], lr=1e-2)
    opt_scaled = torch.optim.Adam([scaled], lr=1e-2)
    rates = RowRates([(scaled, slice(2, 4))], scale=3.0)
    for g in grads:
        plain.grad, scaled.grad = g.clone(), g.clone()
        opt_plain.step()
        rates.step(opt_scaled)
    # Adam's moments see the same gradients, so the chosen rows moved three times as far
    torch.testing.assert_close(scaled[:2], plain[:2])
    torch.testing.assert_close(scaled[2:] - 1, 3 * (plain[2:] - 1))
    with pytest.raises(ValueError, match="> 0"):
        RowRates([(scaled, slice(0, 1))], scale=0.0)


@pytest.mark.parametrize("key,value", [("warmup_steps", -1), ("ema_decay", 1.0), ("ema_decay", -0.1),
                                       ("pose_lr_scale", 0.0)])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"optim.{key}"):
        OptimConfig(**{key: value})


def _budget(deadline: float = 100.0, max_steps: int = 1000, cosine_after: int = 600):
    plan = StepPlan(max_steps, cosine_after)
    return plan, StepBudget(plan, deadline=deadline, max_steps=max_steps, cosine_after=cosine_after)


def test_step_budget_fits_the_run_and_its_decay_to_the_deadline():
    plan, budget = _budget()
    assert not budget.update(0, 0.0)  # the first call only anchors the pace
    assert not budget.update(10, 5.0) and plan == StepPlan(1000, 600)  # too few steps to time
    # 0.5 s per step with 80 s left: 160 more steps; the decay keeps its 60% share
    assert budget.update(40, 20.0) and plan == StepPlan(200, 120)
    assert not budget.update(40, 20.0)  # on pace: unchanged
    # slower before the decay: the run shrinks, and may grow again while the decay has not begun
    assert budget.update(60, 36.0) and plan == StepPlan(60 + math.floor(64 / 0.6), 100)
    assert budget.update(80, 44.0) and plan == StepPlan(80 + math.floor(56 / 0.55), 109)
    # shrunk past its decay's share: the decay begins at once
    assert budget.update(100, 70.0) and plan == StepPlan(100 + math.floor(30 / 0.7), 100)


def test_step_budget_never_exceeds_the_step_maximum():
    plan, budget = _budget(deadline=1e6)
    budget.update(0, 0.0)
    assert not budget.update(50, 1.0) and plan == StepPlan(1000, 600)  # the run without a budget
    # a run whose decay never begins (cosine_after beyond the run) reaches its maximum and stops
    plan, budget = _budget(deadline=1e6, max_steps=30, cosine_after=1440)
    budget.update(3, 0.0)
    for step in (24, 27, 30):
        assert not budget.update(step, 0.1 * step) and plan == StepPlan(30, 1440)


def test_step_budget_only_shrinks_a_decaying_run():
    plan, budget = _budget()
    budget.update(0, 0.0)
    budget.update(40, 20.0)
    assert plan == StepPlan(200, 120)
    assert not budget.update(150, 40.0)  # faster than planned: the decay is not stretched
    assert budget.update(150, 90.0) and plan == StepPlan(150 + math.floor(10 / 0.6), 120)
    assert budget.update(160, 101.0) and plan.steps == 160  # past the deadline: stop now


def test_schedule_follows_a_refitted_plan():
    plan = StepPlan(100, 60)
    opt, sched = build_optimizer([nn.Parameter(torch.zeros(1))], OptimConfig(lr=1.0, min_lr_ratio=0.0), plan)
    for _ in range(50):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1.0
    plan.steps, plan.cosine_after = 60, 40  # the budget moved the decay before the current step
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 20)))


def test_time_budget_must_be_seconds():
    from dfmvr.config import TrainConfig

    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="train.time_budget_s"):
            TrainConfig(time_budget_s=bad)
