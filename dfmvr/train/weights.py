"""An exponential moving average of the model's weights (``optim.ema_decay``).

The average is what validation scores, what checkpoints carry as ``model_ema`` and what the
exported model serves: a smoothed copy of the weights that is often better than the last
iterate at no extra training cost. BatchNorm running statistics are copied from the live model
(they are already averages of the recent batches). Early on the decay is
``min(decay, (1 + t) / (10 + t))`` (t = optimiser steps), so the average is not dominated by
the random initialisation.

Also here: :func:`snapshot_norm_stats` and :func:`restore_norm_stats`, which put BatchNorm's
running statistics back after a step the training loop skips, and after the batches of
:func:`dfmvr.train.curve.learning_curve`'s data-parallel step that are not rank 0's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """EMA of ``model``'s parameters (and a copy of its buffers).

    Args:
        model: the live model (unwrapped from DDP).
        optim_cfg: :class:`dfmvr.config.OptimConfig`; ``ema_decay`` in (0, 1).

    Attributes:
        model: the averaged copy, in eval mode, never trained directly.
    """

    def __init__(self, model: nn.Module, optim_cfg) -> None:
        if not 0 < optim_cfg.ema_decay < 1:
            raise ValueError(f"optim.ema_decay: expected a number in (0, 1), got {optim_cfg.ema_decay}")
        self.decay = optim_cfg.ema_decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model``'s weights into the average after optimiser step ``step`` (1-based)."""
        d = min(self.decay, (1 + step) / (10 + step))
        for avg, live in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(live.detach(), 1 - d)
        for avg, live in zip(self.model.buffers(), model.buffers()):
            avg.copy_(live)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


def snapshot_norm_stats(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(buffer, copy)`` for every normalisation running statistic (small: no face-model buffers):
    what :func:`restore_norm_stats` puts back after a skipped step or a second data-parallel batch."""
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                if b is not None:
                    out.append((b, b.detach().clone()))
    return out


def restore_norm_stats(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buf, value in saved:
            buf.copy_(value)
