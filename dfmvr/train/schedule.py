"""The reference learning-rate schedule: constant, then cosine decay to ``lr * min_lr_ratio``,
after an optional linear warm-up."""

from __future__ import annotations

import math

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
