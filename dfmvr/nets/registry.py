"""Name -> constructor registries for backbones and regressors (timm style).

A variant is a function decorated with :func:`register_backbone` or :func:`register_regressor`;
its name is the function's name, and the config (``model.backbone``, ``model.regressor``)
refers to it by that name. Tests parametrise over :func:`list_backbones` and
:func:`list_regressors`, so a variant is tested the day it is registered.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

from torch import nn

from dfmvr.facemodel.layout import CoeffLayout

_logger = logging.getLogger(__name__)

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_REGRESSORS: dict[str, Callable[..., nn.Module]] = {}

_F = TypeVar("_F", bound=Callable[..., nn.Module])


def _register(table: dict[str, Callable[..., nn.Module]], kind: str, fn: _F) -> _F:
    name = fn.__name__
    if name in table and table[name] is not fn:
        raise ValueError(f"{kind} {name!r} is already registered (by {table[name].__module__})")
    table[name] = fn
    return fn


def register_backbone(fn: _F) -> _F:
    """Register ``fn(*, in_channels, width, levels, n_views) -> nn.Module`` under its name."""
    return _register(_BACKBONES, "backbone", fn)


def register_regressor(fn: _F) -> _F:
    """Register ``fn(*, in_channels, width, layout, view_yaw_deg) -> nn.Module`` under its name."""
    return _register(_REGRESSORS, "regressor", fn)


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_BACKBONES)


def list_regressors() -> list[str]:
    """Registered regressor names, sorted."""
    return sorted(_REGRESSORS)


def create_backbone(name: str, *, in_channels: int, width: int, levels: int, n_views: int = 3) -> nn.Module:
    """Build a registered multi-view backbone.

    Args:
        name: ``fusion`` (deep fusion, paper Sec. III-C), ``unet`` (Tab. II v2), ``cnn`` (v1).
        in_channels: channels per view: 3 (RGB) or 4 (RGB + parsing mask).
        width: channels of the first encoder level; level ``i`` has ``width * 2**i``.
        levels: encoder levels (``levels - 1`` max-pools).
        n_views: views per sample (left, front, right).

    Returns:
        A module mapping ``x [B, V, C_in, H, W]`` to ``[B, C_out, h, w]``, with the attribute
        ``out_channels`` (``C_out``) and ``size_multiple`` (``H`` and ``W`` must be multiples of it).
    """
    if name not in _BACKBONES:
        raise ValueError(f"model.backbone: unknown backbone {name!r}; registered: {list_backbones()}")
    model = _BACKBONES[name](in_channels=in_channels, width=width, levels=levels, n_views=n_views)
    _logger.debug("built backbone %s: %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model


def create_regressor(
    name: str,
    *,
    in_channels: int,
    width: int,
    layout: CoeffLayout,
    view_yaw_deg: Sequence[float] = (-45.0, 0.0, 45.0),
    stages: Sequence[int] = (3, 4, 6, 3),
    involution_norm: str = "group",
) -> nn.Module:
    """Build a registered coefficient regressor.

    Args:
        name: ``rednet50`` (involution, the paper's) or ``resnet50`` (Tab. II v3).
        in_channels: channels of the fused feature map (``backbone.out_channels``).
        width: stem width (64 for ResNet-50 proper).
        layout: the coefficient layout; the head emits ``layout.size`` numbers.
        view_yaw_deg: nominal yaw per view in degrees (``layout.n_views`` of them); the
            untrained head outputs the mean face turned by these angles.
        stages: bottlenecks per stage (ResNet-50's ``3, 4, 6, 3`` by default).
        involution_norm: normalisation of involution kernel generators (``group`` or ``batch``).

    Returns:
        A module mapping ``feat [B, C, h, w]`` to ``coeffs [B, layout.size]``.
    """
    if name not in _REGRESSORS:
        raise ValueError(f"model.regressor: unknown regressor {name!r}; registered: {list_regressors()}")
    model = _REGRESSORS[name](in_channels=in_channels, width=width, layout=layout, view_yaw_deg=tuple(view_yaw_deg),
                                   stages=tuple(stages), involution_norm=involution_norm)
    _logger.debug("built regressor %s: %d parameters", name, sum(p.numel() for p in model.parameters()))
    return model
