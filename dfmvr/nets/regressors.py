"""Coefficient regressors: RedNet-50 (the paper's) and ResNet-50 (Tab. II v3) on the fused map.

Both share one skeleton: a deep stem (3x3 conv stride 2, a spatial op, 3x3 conv, 3x3 max-pool
stride 2), the ResNet-50 stages ``[3, 4, 6, 3]`` of bottlenecks (1x1, spatial op, 1x1,
expansion 4, stride in the spatial op), global average pooling and one linear head emitting
the coefficient vector (:class:`dfmvr.facemodel.layout.CoeffLayout`). They differ only in
the spatial op: an :class:`~dfmvr.nets.involution.Involution2d` (kernel 7 in the bottlenecks,
3 in the stem, 16 channels per group, reduction 4; stride by average pooling) for
``rednet50``, a 3x3 convolution for ``resnet50``.

The head starts at the mean face turned to each view's nominal yaw: its weight is zero and
its bias is :func:`initial_coefficients`. A zero weight still learns (its gradient is
``dL/dy * features``, and the pooled features are non-zero). Each bottleneck's last
BatchNorm starts at zero scale, so every block is the identity at first. Hence gradients
reach the network in waves: the first backward pass reaches the head only, the second
also the stem, shortcuts and last-BN scales, the third every parameter.

Every down-sampling rounds up (``ceil(H / 2)``), so any input of at least 1 x 1 pixels
works; the map is ``H / 32`` after the last stage. In training mode BatchNorm needs more
than one value per channel, i.e. batch >= 2 when the last stage is 1 x 1 (``H <= 32``).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch
from torch import nn

from dfmvr.facemodel.decode import scale_grad
from dfmvr.facemodel.layout import CoeffLayout, Coeffs
from dfmvr.nets.blocks import ConvBNReLU, init_weights
from dfmvr.nets.involution import Involution2d
from dfmvr.nets.registry import register_regressor

_logger = logging.getLogger(__name__)

RESNET50_STAGES = (3, 4, 6, 3)
EXPANSION = 4

SpatialFactory = Callable[[int, int, bool], nn.Module]
"""``(channels, stride, in_stem) -> module`` keeping the channel count."""


def _involution(norm: str) -> SpatialFactory:
    def make(channels: int, stride: int, in_stem: bool) -> nn.Module:
        return Involution2d(channels, 3 if in_stem else 7, stride, group_channels=16, reduction=4, norm=norm)

    return make


def _conv3x3(channels: int, stride: int, in_stem: bool) -> nn.Module:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)


def initial_coefficients(layout: CoeffLayout, view_yaw_deg: Sequence[float]) -> torch.Tensor:
    """The head's output before training: ``[layout.size]``.

    Identity, expression, texture and lighting 0 (the mean face, mean albedo, the ambient
    0.8 DC light), translation 0, and per view the angles ``(0, yaw_v, 0)`` in radians.

    Raises:
        ValueError: when ``view_yaw_deg`` does not have one angle per view of ``layout``.
    """
    if len(view_yaw_deg) != layout.n_views:
        raise ValueError(
            f"model.view_yaw_deg: expected {layout.n_views} angles (one per view), got {tuple(view_yaw_deg)}"
        )
    parts = layout.zeros(1, dtype=torch.float64)
    angles = parts.angles.clone()
    angles[0, :, 1] = torch.tensor([math.radians(a) for a in view_yaw_deg], dtype=torch.float64)
    return layout.join(Coeffs(parts.id, parts.exp, parts.tex, parts.gamma, angles, parts.trans))[0].float()


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, spatial op (with the stride), 1x1 expand, residual.

    Shapes: ``[B, in_channels, H, W] -> [B, 4 * mid_channels, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_channels: int, mid_channels: int, stride: int, spatial: SpatialFactory) -> None:
        super().__init__()
        out_channels = EXPANSION * mid_channels
        self.reduce = ConvBNReLU(in_channels, mid_channels, 1)
        self.spatial = nn.Sequential(
            spatial(mid_channels, stride, False), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True)
        )
        self.expand = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.expand(self.spatial(self.reduce(x))) + self.shortcut(x))


class CoefficientRegressor(nn.Module):
    """ResNet-50-shaped regressor from a feature map to the coefficient vector.

    Args:
        in_channels: channels of the input map.
        width: stem width; stage ``s`` has ``width * 2**s`` bottleneck channels and
            ``4 * width * 2**s`` outputs (2048 features at width 64).
        layout: coefficient layout; the head emits ``layout.size`` numbers.
        view_yaw_deg: nominal yaw per view (degrees), for the head's initial bias.
        spatial: the bottleneck's spatial op factory (involution or 3x3 conv).
        stages: bottlenecks per stage.

    Shapes: ``feat [B, in_channels, h, w] -> coeffs [B, layout.size]``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        width: int,
        layout: CoeffLayout,
        view_yaw_deg: Sequence[float],
        spatial: SpatialFactory,
        stages: Sequence[int] = RESNET50_STAGES,
    ) -> None:
        super().__init__()
        if in_channels < 1 or width < 2:
            raise ValueError(f"regressor: expected in_channels >= 1 and width >= 2, got {in_channels}, {width}")
        self.in_channels = in_channels
        self.layout = layout
        stem_mid = width // 2
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, stem_mid, 3, stride=2),
            spatial(stem_mid, 1, True),
            nn.BatchNorm2d(stem_mid),
            nn.ReLU(inplace=True),
            ConvBNReLU(stem_mid, width, 3),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers = []
        c_in = width
        for s, n_blocks in enumerate(stages):
            mid = width * 2**s
            for i in range(n_blocks):
                layers.append(Bottleneck(c_in, mid, 2 if (i == 0 and s > 0) else 1, spatial))
                c_in = EXPANSION * mid
        self.layers = nn.Sequential(*layers)
        self.feature_channels = c_in
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, layout.size)
        shape_rows = torch.zeros(layout.size, dtype=torch.bool)
        shape_rows[layout.id] = shape_rows[layout.exp] = True
        self.register_buffer("shape_rows", shape_rows, persistent=False)
        """The head's rows that emit the shape (identity, expression) coefficients."""
        init_weights(self)
        for block in self.layers:
            # Zero-init residual (Goyal et al. 2017; the reference RedNet's default): every block
            # starts as the identity. Involution is quadratic in its input (the kernel is made
            # from the input), so without this, eval mode before BatchNorm has statistics
            # overflows to inf within a dozen blocks.
            nn.init.zeros_(block.expand[1].weight)
        self.reset_head(view_yaw_deg)

    @torch.no_grad()
    def reset_head(self, view_yaw_deg: Sequence[float]) -> None:
        """Zero the head's weight and set its bias to :func:`initial_coefficients`."""
        self.head.weight.zero_()
        self.head.bias.copy_(initial_coefficients(self.layout, view_yaw_deg))

    def features(self, feat: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, feature_channels]`` (the head's input)."""
        if feat.dim() != 4 or feat.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} input must have shape (B, {self.in_channels}, h, w); got {tuple(feat.shape)}"
            )
        return torch.flatten(self.pool(self.layers(self.stem(feat))), 1)

    def forward(self, feat: torch.Tensor, *, other_grad: float = 1.0) -> torch.Tensor:
        """Args: ``feat [B, C, h, w]``. Returns ``coeffs [B, layout.size]``.

        ``other_grad`` scales the gradient that every coefficient but the shape's (identity,
        expression) sends into the features below the head; the head's own rows learn at full
        rate either way, and the values are the same (``loss.backbone_grad_2d``).
        """
        f = self.features(feat)
        coeffs = self.head(f)
        if other_grad == 1.0 or not f.requires_grad:
            return coeffs
        return torch.where(self.shape_rows, coeffs, self.head(scale_grad(f, other_grad)))


@register_regressor
def rednet50(
    *, in_channels: int, width: int, layout: CoeffLayout, view_yaw_deg: Sequence[float] = (-45.0, 0.0, 45.0),
    stages: Sequence[int] = RESNET50_STAGES, involution_norm: str = "group",
) -> CoefficientRegressor:
    """RedNet-50: involution (kernel 7, 16 channels per group) in the 3x3 slot (the paper's);
    ``involution_norm`` is the kernel generator's normalisation (:class:`Involution2d`)."""
    return CoefficientRegressor(
        in_channels=in_channels, width=width, layout=layout, view_yaw_deg=view_yaw_deg,
        spatial=_involution(involution_norm), stages=stages,
    )


@register_regressor
def resnet50(
    *, in_channels: int, width: int, layout: CoeffLayout, view_yaw_deg: Sequence[float] = (-45.0, 0.0, 45.0),
    stages: Sequence[int] = RESNET50_STAGES, involution_norm: str = "group",
) -> CoefficientRegressor:
    """ResNet-50 with the same deep stem: a 3x3 convolution in the 3x3 slot (Tab. II v3);
    it has no involution, so ``involution_norm`` is accepted (one signature for every
    regressor) and unused."""
    return CoefficientRegressor(
        in_channels=in_channels, width=width, layout=layout, view_yaw_deg=view_yaw_deg, spatial=_conv3x3, stages=stages
    )
