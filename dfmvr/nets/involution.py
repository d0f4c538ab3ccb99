"""Involution (Li et al., CVPR 2021) in pure PyTorch: a weighted sum of shifted inputs.

Convolution shares one kernel over all pixels and holds a different one per channel;
involution is the inverse: each pixel gets its own ``k x k`` kernel, generated from that
pixel's features, and the kernel is shared by the ``group_channels`` channels of a group.
RedNet puts it in the 3x3 slot of ResNet's bottleneck. The reference implementation uses a
CuPy kernel; this one needs nothing compiled and runs on CPU, CUDA and MPS alike.

On maps at least :data:`LOOP_MIN_WIDTH` pixels wide the sum runs as a loop over the ``k*k``
taps, each adding ``kernel_tap * shifted input`` into the output in place, with a
hand-written backward of the same form. The textbook ``F.unfold`` version materialises a
``k*k`` times larger copy of the input (49x at kernel 7) and its product with the kernels,
and was 3 to 12 times slower on CPU at paper size (``docs/benchmarks.md``, "Train step").
On narrow maps the loop's ``k*k`` short row-segment operations cost more than the copy, so
those use the unfold form. Both give the same results up to float rounding order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

LOOP_MIN_WIDTH = 12
"""Output width (pixels) from which :func:`involve` uses the tap loop rather than unfold: the
crossover measured on CPU (7 px maps were 2-3x faster with unfold, 14 px maps 1.2-3x faster
with the loop)."""


def _tap_slices(kernel_size: int, stride: int, dilation: int, h: int, w: int) -> list[tuple[slice, slice]]:
    """For each tap ``(u, v)`` (row-major), the rows and columns of the zero-padded input that
    tap reads for an ``h x w`` output."""
    return [
        (slice(u * dilation, u * dilation + stride * (h - 1) + 1, stride),
         slice(v * dilation, v * dilation + stride * (w - 1) + 1, stride))
        for u in range(kernel_size) for v in range(kernel_size)
    ]


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class _Involve(torch.autograd.Function):
    """``y = sum_t kernels[:, g, t] * shift_t(x)`` for every channel of group ``g``.

    Shapes: ``x [B, C, H, W]``, ``kernels [B, G, k*k, h, w]`` -> ``[B, C, h, w]``. The backward
    is the same loop: ``dx`` accumulates ``kernels_t * dy`` into the shifted window of a padded
    buffer, ``dkernels_t`` is ``sum over the group's channels of dy * shift_t(x)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernels: torch.Tensor, kernel_size: int, stride: int,
                dilation: int) -> torch.Tensor:
        b, c, hi, wi = x.shape
        _, g, _, h, w = kernels.shape
        dtype = torch.promote_types(x.dtype, kernels.dtype)
        pad = dilation * (kernel_size - 1) // 2
        # NCHW with the group split off: the taps are then unit-stride row segments, and the
        # kernel broadcasts over the group's channels.
        xp = F.pad(x.to(dtype).contiguous(), (pad, pad, pad, pad)).view(b, g, c // g, hi + 2 * pad, wi + 2 * pad)
        kernels = kernels.to(dtype).contiguous()
        # the k*k-term sum accumulates in float32 under bf16/fp16 autocast, as a reduction would
        out = xp.new_zeros(b, g, c // g, h, w, dtype=_accumulator(dtype))
        for t, (rows, cols) in enumerate(_tap_slices(kernel_size, stride, dilation, h, w)):
            out.addcmul_(xp[..., rows, cols], kernels[:, :, t].unsqueeze(2))
        ctx.save_for_backward(xp, kernels)
        ctx.geometry = (kernel_size, stride, dilation, pad, hi, wi)
        ctx.dtypes = (x.dtype, kernels.dtype)
        return out.view(b, c, h, w).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        xp, kernels = ctx.saved_tensors
        kernel_size, stride, dilation, pad, hi, wi = ctx.geometry
        b, g, gc = xp.shape[:3]
        kk, h, w = kernels.shape[2:]
        dy = grad_out.to(xp.dtype).contiguous().view(b, g, gc, h, w)
        taps = _tap_slices(kernel_size, stride, dilation, h, w)
        grad_x = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_xp = torch.zeros_like(xp, dtype=_accumulator(xp.dtype))
            for t, (rows, cols) in enumerate(taps):
                grad_xp[..., rows, cols].addcmul_(dy, kernels[:, :, t].unsqueeze(2))
            grad_x = grad_xp.view(b, g * gc, *xp.shape[-2:])[..., pad:pad + hi, pad:pad + wi].to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            # tap-major so that each tap's reduction writes one contiguous block
            grad_k = xp.new_empty(kk, b, g, h, w)
            prod = torch.empty_like(dy)
            for t, (rows, cols) in enumerate(taps):
                torch.mul(dy, xp[..., rows, cols], out=prod)
                torch.sum(prod, 2, out=grad_k[t])
            grad_k = grad_k.permute(1, 2, 0, 3, 4).to(ctx.dtypes[1])
        return grad_x, grad_k, None, None, None


def _involve_unfold(x: torch.Tensor, kernels: torch.Tensor, kernel_size: int, stride: int,
                    dilation: int) -> torch.Tensor:
    b, c = x.shape[:2]
    _, g, kk, h, w = kernels.shape
    patches = F.unfold(x, kernel_size, dilation=dilation, padding=dilation * (kernel_size - 1) // 2, stride=stride)
    patches = patches.reshape(b, g, c // g, kk, h, w)  # unfold is channel-major: [B, C * k*k, h*w]
    return (kernels.unsqueeze(2) * patches).sum(dim=3).reshape(b, c, h, w)


def involve(x: torch.Tensor, kernels: torch.Tensor, kernel_size: int, stride: int = 1,
            dilation: int = 1, *, method: str = "auto") -> torch.Tensor:
    """The involution sum with given per-pixel kernels (zero padding, "same" for odd ``k``).

    ``y[b, c, i, j] = sum_{u,v} kernels[b, c // (C / G), u*k+v, i, j] *
    x[b, c, i*stride + (u - k//2)*dilation, j*stride + (v - k//2)*dilation]``.

    Args:
        x: ``[B, C, H, W]``.
        kernels: ``[B, G, k*k, h, w]`` with ``G`` dividing ``C`` and ``h = ceil(H / stride)``,
            ``w = ceil(W / stride)``.
        kernel_size: ``k`` (odd).
        stride: output stride.
        dilation: spacing of the taps.
        method: ``"loop"`` (tap loop), ``"unfold"``, or ``"auto"``: the loop when
            ``w >= LOOP_MIN_WIDTH``, else unfold.

    Returns:
        ``[B, C, h, w]`` in the promoted dtype of the inputs.
    """
    b, c, hi, wi = x.shape
    if kernels.dim() != 5 or kernels.shape[0] != b or c % kernels.shape[1] or kernels.shape[2] != kernel_size**2:
        raise ValueError(
            f"involve: kernels must have shape (B={b}, G dividing C={c}, k*k={kernel_size**2}, h, w); "
            f"got {tuple(kernels.shape)}"
        )
    expected = (-(-hi // stride), -(-wi // stride))
    if tuple(kernels.shape[-2:]) != expected:
        raise ValueError(f"involve: kernels must be {expected} pixels for a {hi} x {wi} input at stride {stride}; "
                         f"got {tuple(kernels.shape[-2:])}")
    if method not in ("auto", "loop", "unfold"):
        raise ValueError(f"involve: method must be 'auto', 'loop' or 'unfold'; got {method!r}")
    if method == "loop" or (method == "auto" and expected[1] >= LOOP_MIN_WIDTH):
        return _Involve.apply(x, kernels, kernel_size, stride, dilation)
    return _involve_unfold(x, kernels, kernel_size, stride, dilation)


class Involution2d(nn.Module):
    """Involution with per-pixel kernels generated by a two-layer 1x1 bottleneck.

    Kernel generation (the involution paper's): ``W = conv2(relu(norm(conv1(pool(x)))))`` with
    ``conv1: C -> C / reduction`` and ``conv2: C / reduction -> groups * k * k``, where
    ``pool`` is an average pool by ``stride`` (so kernels are generated at the output
    resolution). Output: ``y[b, c, i, j] = sum_{u,v} W[b, g(c), u*k+v, i, j] *
    x[b, c, i*stride + (u - k//2)*dilation, j*stride + (v - k//2)*dilation]`` with zero padding
    and ``g(c) = c // group_channels``.

    Args:
        channels: input and output channels ``C``.
        kernel_size: ``k`` (odd).
        stride: 1 or 2 (any positive integer works).
        group_channels: channels sharing one kernel; when it does not divide ``C`` the
            largest common divisor of the two is used (16 at paper size, fewer in tiny nets).
        reduction: channel reduction of the kernel-generation bottleneck.
        dilation: spacing of the kernel taps.
        norm: normalisation in the kernel generator. ``"group"`` (default): one GroupNorm group
            per sample, so the kernels do not change with the scale of ``x`` and the layer is
            linear in that scale. ``"batch"``: BatchNorm, the involution paper's; its kernels
            grow with ``x``, the layer is then quadratic in it, and in eval mode, where running
            statistics lag the weights early in training, a stack of such layers squares any
            excess scale at every block and overflows to inf (seen at step 25 of the tiny preset:
            44 of 200 validation triplets non-finite; ``docs/notes/training-readings.md``, reading 3).
        method: how the sum is computed (:func:`involve`): ``"auto"``, ``"loop"`` or
            ``"unfold"``; the same result either way. An attribute, so a built model can be
            switched (the train-step benchmark compares them).

    Shapes: ``[B, C, H, W] -> [B, C, ceil(H / stride), ceil(W / stride)]``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        *,
        group_channels: int = 16,
        reduction: int = 4,
        dilation: int = 1,
        norm: str = "group",
        method: str = "auto",
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"involution kernel_size: expected an odd number, got {kernel_size}")
        if stride < 1 or dilation < 1 or channels < 1:
            raise ValueError(
                f"involution: expected channels, stride, dilation >= 1, got {channels}, {stride}, {dilation}"
            )
        self.channels = channels
        if method not in ("auto", "loop", "unfold"):
            raise ValueError(f"involution method: expected 'auto', 'loop' or 'unfold', got {method!r}")
        if norm not in ("group", "batch"):
            raise ValueError(f"involution norm: expected 'group' or 'batch', got {norm!r}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.method = method
        self.group_channels = math.gcd(channels, group_channels)
        self.groups = channels // self.group_channels
        hidden = max(1, channels // reduction)
        # ceil_mode makes the pooled grid match the tap grid (ceil(H / stride)) for odd sizes too.
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
        norm_layer = nn.GroupNorm(1, hidden) if norm == "group" else nn.BatchNorm2d(hidden)
        self.reduce = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), norm_layer, nn.ReLU(inplace=True))
        self.span = nn.Conv2d(hidden, self.groups * kernel_size * kernel_size, 1)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel kernels ``[B, groups, k*k, h, w]`` (row-major taps) at the output resolution."""
        weight = self.span(self.reduce(self.pool(x)))
        b, _, h, w = weight.shape
        return weight.reshape(b, self.groups, self.kernel_size * self.kernel_size, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: ``x [B, C, H, W]``. Returns ``[B, C, ceil(H / stride), ceil(W / stride)]``."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"involution input must have shape (B, {self.channels}, H, W); got {tuple(x.shape)}")
        return involve(x, self.kernels(x), self.kernel_size, self.stride, self.dilation, method=self.method)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, group_channels={self.group_channels}, dilation={self.dilation}"
        )
