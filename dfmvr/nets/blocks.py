"""Small building blocks shared by the backbones, regressors and the parse net.

Every convolution that feeds a BatchNorm has no bias: BatchNorm subtracts the per-channel
mean, so such a bias would receive an exactly zero gradient and only waste memory.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """``k x k`` convolution (no bias), BatchNorm, ReLU; "same" padding for odd ``k``.

    Shapes: ``[B, in_channels, H, W] -> [B, out_channels, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two 3x3 ConvBNReLU (the U-Net unit): ``[B, C_in, H, W] -> [B, C_out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, out_channels, 3), ConvBNReLU(out_channels, out_channels, 3))


class AttentionGate(nn.Module):
    """Additive attention gate (Attention U-Net, Oktay et al. 2018), as in DF-MVR's decoder.

    ``alpha = sigmoid(BN(psi(relu(BN(W_g g) + BN(W_x x)))))`` is one weight per pixel in
    [0, 1]; the gate returns ``x * alpha``. In DF-MVR ``g`` is the up-sampled decoder feature
    and ``x`` one view's skip feature at the same level, so each view's encoder is weighed by
    what the shared decoder already knows.

    Args:
        gate_channels: channels of ``g``.
        skip_channels: channels of ``x`` (and of the output).
        inner_channels: channels of the joint embedding (half the skip channels in DF-MVR).
    """

    def __init__(self, gate_channels: int, skip_channels: int, inner_channels: int) -> None:
        super().__init__()
        inner_channels = max(1, inner_channels)
        self.w_g = nn.Sequential(nn.Conv2d(gate_channels, inner_channels, 1, bias=False), nn.BatchNorm2d(inner_channels))
        self.w_x = nn.Sequential(nn.Conv2d(skip_channels, inner_channels, 1, bias=False), nn.BatchNorm2d(inner_channels))
        self.psi = nn.Sequential(nn.Conv2d(inner_channels, 1, 1, bias=False), nn.BatchNorm2d(1))

    def attention(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel weights ``alpha [B, 1, H, W]`` in [0, 1]."""
        return torch.sigmoid(self.psi(torch.relu(self.w_g(g) + self.w_x(x))))

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Args: ``g [B, C_g, H, W]``, ``x [B, C_x, H, W]``. Returns ``x * alpha [B, C_x, H, W]``."""
        return x * self.attention(g, x)


def init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit-scale BatchNorm, zero biases; linear layers are
    left to their owners (the regressor head has its own initialisation)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
