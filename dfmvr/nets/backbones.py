"""Multi-view backbones: the paper's deep fusion and the two ablation baselines (Tab. II).

Every backbone maps the views of one sample, ``x [B, V, C_in, H, W]`` (views in the order
left, front, right; ``C_in`` = 3 RGB channels in [-1, 1], plus the parsing mask as a 4th when
``model.mask_input``), to one feature map ``[B, out_channels, h, w]`` for the regressor.

- ``fusion`` (ours, Sec. III-C): one encoder per view (no shared weights), ONE decoder that at
  every level gates each view's skip feature with an attention gate driven by the decoder
  and fuses them; output at input resolution, ``width`` channels.
- ``unet`` (v2): a full U-Net per view (skips within the view only), fused at the very end by
  a 3x3 ConvBNReLU over the concatenated outputs; input resolution, ``width`` channels.
- ``cnn`` (v1): the encoders alone; the views' deepest features are concatenated at the
  lowest resolution (``H / 2**(levels-1)``), ``V * width * 2**(levels-1)`` channels.

Level ``i`` of an encoder has ``width * 2**i`` channels at ``H / 2**i``; at paper size
(width 64, 5 levels) that is 64..1024 channels and 224..14 px.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from dfmvr.config import check_at_least
from dfmvr.nets.blocks import AttentionGate, DoubleConv, init_weights
from dfmvr.nets.registry import register_backbone

_logger = logging.getLogger(__name__)


class Encoder(nn.Module):
    """U-Net encoder: ``levels`` DoubleConvs with a 2x2 max-pool between consecutive ones.

    Shapes: ``[B, C_in, H, W]`` -> a list of ``levels`` maps, level ``i`` being
    ``[B, width * 2**i, H / 2**i, W / 2**i]``.
    """

    def __init__(self, in_channels: int, width: int, levels: int) -> None:
        super().__init__()
        self.channels = [width * 2**i for i in range(levels)]
        self.stages = nn.ModuleList(
            DoubleConv(c_in, c_out) for c_in, c_out in zip([in_channels] + self.channels[:-1], self.channels)
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class MultiViewBackbone(nn.Module):
    """Common input checks and attributes of the registered backbones.

    Attributes:
        in_channels: channels per view.
        n_views: number of views ``V``.
        out_channels: channels of the output map.
        size_multiple: ``H`` and ``W`` must be multiples of this (``2**(levels-1)``).
    """

    def __init__(self, *, in_channels: int, width: int, levels: int, n_views: int) -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or n_views < 1:
            raise ValueError(
                f"backbone: expected in_channels, width, n_views >= 1, got {in_channels}, {width}, {n_views}"
            )
        check_at_least("model.levels", levels, 2)
        self.in_channels = in_channels
        self.width = width
        self.levels = levels
        self.n_views = n_views
        self.size_multiple = 2 ** (levels - 1)
        self.out_channels = width

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.n_views or x.shape[2] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} input must have shape (B, V={self.n_views}, C={self.in_channels}, H, W); "
                f"got {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"{type(self).__name__} with {self.levels} levels needs H and W divisible by "
                f"{self.size_multiple}; got {h} x {w}"
            )


class FusionBackbone(MultiViewBackbone):
    """Deep fusion (DF-MVR Sec. III-C, Fig. 1): V encoders, one attention-gated decoder.

    The decoder starts from the concatenation of the views' deepest features. At each
    shallower level ``i`` it up-samples with a 2x2 transposed convolution to ``up`` (``w_i``
    channels), gates every view's level-``i`` skip with its own :class:`AttentionGate`
    (``g = up``), concatenates ``[up, gated_left, gated_front, gated_right]`` and applies a
    DoubleConv back to ``w_i`` channels. Output: level 0, ``[B, width, H, W]``.

    Attributes:
        encoders: one :class:`Encoder` per view (view order), no shared weights.
        gates: ``gates[j][v]`` is the gate of view ``v`` at decoder step ``j`` (deepest first).
    """

    def __init__(self, *, in_channels: int, width: int, levels: int, n_views: int = 3) -> None:
        super().__init__(in_channels=in_channels, width=width, levels=levels, n_views=n_views)
        self.encoders = nn.ModuleList(Encoder(in_channels, width, levels) for _ in range(n_views))
        chans = self.encoders[0].channels
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.convs = nn.ModuleList()
        c_in = n_views * chans[-1]
        for c in reversed(chans[:-1]):
            self.ups.append(nn.ConvTranspose2d(c_in, c, 2, stride=2, bias=False))
            self.gates.append(nn.ModuleList(AttentionGate(c, c, c // 2) for _ in range(n_views)))
            self.convs.append(DoubleConv((n_views + 1) * c, c))
            c_in = c
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: ``x [B, V, C_in, H, W]``. Returns ``[B, width, H, W]``."""
        self._check_input(x)
        feats = [enc(x[:, v]) for v, enc in enumerate(self.encoders)]  # feats[v][level]
        d = torch.cat([f[-1] for f in feats], dim=1)
        for j, (up, gates, conv) in enumerate(zip(self.ups, self.gates, self.convs)):
            level = self.levels - 2 - j
            u = up(d)
            gated = [gate(u, f[level]) for gate, f in zip(gates, feats)]
            d = conv(torch.cat([u, *gated], dim=1))
        return d


class UNet(nn.Module):
    """Plain U-Net (one view): encoder, then per level a 2x2 transposed conv, concat with the
    skip, DoubleConv. ``[B, C_in, H, W] -> [B, width, H, W]``."""

    def __init__(self, in_channels: int, width: int, levels: int) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, width, levels)
        chans = self.encoder.channels
        self.ups = nn.ModuleList(nn.ConvTranspose2d(2 * c, c, 2, stride=2, bias=False) for c in reversed(chans[:-1]))
        self.convs = nn.ModuleList(DoubleConv(2 * c, c) for c in reversed(chans[:-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        d = feats[-1]
        for j, (up, conv) in enumerate(zip(self.ups, self.convs)):
            d = conv(torch.cat([up(d), feats[-2 - j]], dim=1))
        return d


class LateFusionUNetBackbone(MultiViewBackbone):
    """Tab. II v2: one U-Net per view, no cross-view interaction until the end, where the
    outputs are concatenated and fused by a 3x3 ConvBNReLU to ``width`` channels.
    ``[B, V, C_in, H, W] -> [B, width, H, W]``."""

    def __init__(self, *, in_channels: int, width: int, levels: int, n_views: int = 3) -> None:
        super().__init__(in_channels=in_channels, width=width, levels=levels, n_views=n_views)
        self.unets = nn.ModuleList(UNet(in_channels, width, levels) for _ in range(n_views))
        self.fuse = nn.Sequential(
            nn.Conv2d(n_views * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.fuse(torch.cat([net(x[:, v]) for v, net in enumerate(self.unets)], dim=1))


class LateFusionCNNBackbone(MultiViewBackbone):
    """Tab. II v1: one plain CNN (the encoder, no decoder) per view; the views' deepest
    features are concatenated at the lowest resolution and handed to the regressor as they are.
    ``[B, V, C_in, H, W] -> [B, V * width * 2**(levels-1), H / 2**(levels-1), W / 2**(levels-1)]``."""

    def __init__(self, *, in_channels: int, width: int, levels: int, n_views: int = 3) -> None:
        super().__init__(in_channels=in_channels, width=width, levels=levels, n_views=n_views)
        self.encoders = nn.ModuleList(Encoder(in_channels, width, levels) for _ in range(n_views))
        self.out_channels = n_views * self.encoders[0].channels[-1]
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return torch.cat([enc(x[:, v])[-1] for v, enc in enumerate(self.encoders)], dim=1)


@register_backbone
def fusion(*, in_channels: int, width: int, levels: int, n_views: int = 3) -> FusionBackbone:
    """DF-MVR deep fusion backbone (ours; Tab. II v3-v6)."""
    return FusionBackbone(in_channels=in_channels, width=width, levels=levels, n_views=n_views)


@register_backbone
def unet(*, in_channels: int, width: int, levels: int, n_views: int = 3) -> LateFusionUNetBackbone:
    """Per-view U-Nets fused at the end (Tab. II v2)."""
    return LateFusionUNetBackbone(in_channels=in_channels, width=width, levels=levels, n_views=n_views)


@register_backbone
def cnn(*, in_channels: int, width: int, levels: int, n_views: int = 3) -> LateFusionCNNBackbone:
    """Per-view plain CNNs, features concatenated at the end (Tab. II v1)."""
    return LateFusionCNNBackbone(in_channels=in_channels, width=width, levels=levels, n_views=n_views)
