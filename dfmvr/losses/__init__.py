"""DF-MVR losses: one function per term (``terms``) and :func:`compute_losses`, the one place that
weighs and combines them.
"""

from __future__ import annotations

import torch

from dfmvr.losses.terms import (
    gamma_loss,
    landmark_weights,
    lm2d_loss,
    lm3d_loss,
    mask_loss,
    photo_loss,
    reflect_loss,
    reg_loss,
)

__all__ = [
    "LOSS_TERMS", "active_terms", "combine", "gamma_loss", "landmark_weights", "lm2d_loss", "lm3d_loss",
    "mask_loss", "photo_loss", "reflect_loss", "reg_loss",
]

LOSS_TERMS = ("photo", "mask", "lm2d", "lm3d", "reg", "gamma", "reflect")


def active_terms(cfg, step: int, *, has_lm3d: bool = True, has_parse_net: bool = True) -> tuple[str, ...]:
    """Terms that count at ``step`` under the switches of a :class:`dfmvr.config.LossConfig`."""
    out = []
    for name in LOSS_TERMS:
        if getattr(cfg, name) == 0:
            continue
        if name == "mask" and (not cfg.mask_loss or step < cfg.mask_loss_start_step or not has_parse_net):
            continue
        if name == "lm3d" and (not cfg.lm3d_loss or not has_lm3d):
            continue
        out.append(name)
    return tuple(out)


def combine(values: dict[str, torch.Tensor], cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the computed terms.

    Args:
        values: unweighted term values by name (only the active ones).
        cfg: :class:`dfmvr.config.LossConfig` with the weights.

    Returns:
        ``(total, values)``; ``values`` gains ``"total"``.
    """
    unknown = set(values) - set(LOSS_TERMS)
    if unknown:
        raise KeyError(f"unknown loss term(s) {sorted(unknown)}; known: {list(LOSS_TERMS)}")
    total = sum(getattr(cfg, k) * v for k, v in values.items())
    if not isinstance(total, torch.Tensor):
        raise ValueError("no active loss term: every weight is 0 or switched off")
    return total, {**values, "total": total}
