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
    "LOSS_TERMS", "PICTURE_TERMS", "active_terms", "combine", "picture_step", "gamma_loss", "landmark_weights",
    "lm2d_loss", "lm3d_loss", "mask_loss", "photo_loss", "reflect_loss", "reg_loss",
]

LOSS_TERMS = ("photo", "mask", "lm2d", "lm3d", "reg", "gamma", "reflect")
PICTURE_TERMS = ("photo", "mask")
"""The terms that need the render (and, for the mask, the parse net): ``loss.picture_every``."""


def picture_step(cfg, step: int) -> bool:
    """Whether training step ``step`` renders and counts the picture terms (``loss.picture_every``)."""
    return step % cfg.picture_every == 0


def active_terms(cfg, step: int, *, has_lm3d: bool = True, has_parse_net: bool = True,
                 lazy: bool = True) -> tuple[str, ...]:
    """Terms that count at ``step`` under the switches of a :class:`dfmvr.config.LossConfig`.

    ``lazy``: follow ``loss.picture_every`` (training); validation passes False and gets every term.
    """
    out = []
    for name in LOSS_TERMS:
        if getattr(cfg, name) == 0:
            continue
        if lazy and name in PICTURE_TERMS and not picture_step(cfg, step):
            continue
        if name == "mask" and (not cfg.mask_loss or step < cfg.mask_loss_start_step or not has_parse_net):
            continue
        if name == "lm3d" and (not cfg.lm3d_loss or not has_lm3d):
            continue
        out.append(name)
    return tuple(out)


def combine(values: dict[str, torch.Tensor], cfg, *, lazy: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the computed terms.

    Args:
        values: unweighted term values by name (only the active ones).
        cfg: :class:`dfmvr.config.LossConfig` with the weights.
        lazy: the picture terms count ``loss.picture_every`` times (training: they were computed
            on one step in that many, as :func:`active_terms` with ``lazy`` says); False counts
            every term once (validation).

    Returns:
        ``(total, values)``; ``values`` gains ``"total"``.
    """
    unknown = set(values) - set(LOSS_TERMS)
    if unknown:
        raise KeyError(f"unknown loss term(s) {sorted(unknown)}; known: {list(LOSS_TERMS)}")
    lazy_scale = cfg.picture_every if lazy else 1
    total = sum(getattr(cfg, k) * (lazy_scale if k in PICTURE_TERMS else 1) * v for k, v in values.items())
    if not isinstance(total, torch.Tensor):
        raise ValueError("no active loss term: every weight is 0 or switched off")
    return total, {**values, "total": total}
