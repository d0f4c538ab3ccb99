"""The learning-rate schedule (warm-up, constant, cosine) and the weight average."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfmvr.config import OptimConfig
from dfmvr.train.schedule import RowRates, build_optimizer, lr_factor
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
