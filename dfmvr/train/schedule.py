"""The reference learning-rate schedule: constant, then cosine decay to ``lr * min_lr_ratio``,
after an optional linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def lr_factor(step: int, *, total_steps: int, cosine_after: int, min_lr_ratio: float,
              warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < cosine_after or total_steps <= cosine_after:
        return 1.0
    progress = min(1.0, (step - cosine_after) / max(1, total_steps - cosine_after))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params, optim_cfg, total_steps: int):
    """Adam plus the schedule as a ``LambdaLR``: ``(optimizer, scheduler)``."""
    opt = torch.optim.Adam(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: lr_factor(s, total_steps=total_steps, cosine_after=optim_cfg.cosine_after,
                            min_lr_ratio=optim_cfg.min_lr_ratio, warmup_steps=optim_cfg.warmup_steps),
    )
    return opt, sched


class RowRates:
    """Scale the optimiser's update of some rows of some parameters: a learning rate per row.

    Adam's step does not grow with the gradient, so scaling a row's gradient does not change its
    rate; this scales the step itself. ``step(opt)`` runs ``opt.step()`` and then moves each
    ``(parameter, rows)`` pair ``scale`` times as far as the optimiser did (weight decay and
    momentum included), so ``scale=3`` is three times the learning rate for those rows.

    Why not a parameter group: Adam's groups hold whole tensors, and the pose rows are 18 of the
    head's rows; splitting the head into two parameters would change every checkpoint's keys.
    """

    def __init__(self, rows: Sequence[tuple[torch.Tensor, slice]], scale: float) -> None:
        if scale <= 0:
            raise ValueError(f"row learning-rate scale: expected a number > 0, got {scale}")
        self.rows = list(rows)
        self.scale = scale

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.scale == 1.0:
            opt.step()
            return
        before = [p.detach()[rows].clone() for p, rows in self.rows]
        opt.step()
        with torch.no_grad():
            for (p, rows), old in zip(self.rows, before):
                p[rows].sub_(old).mul_(self.scale).add_(old)


def pose_row_rates(model, optim_cfg) -> RowRates:
    """:class:`RowRates` for the regressor head's pose rows at ``optim.pose_lr_scale``."""
    head, pose = model.regressor.head, model.regressor.layout.pose
    return RowRates([(head.weight, pose), (head.bias, pose)], optim_cfg.pose_lr_scale)
