"""dfmvr.nets.involution.involve: the tap-loop involution with its hand-written backward and the
unfold path, against an independent unfold formulation and finite differences (test_nets.py
checks the module against a brute-force loop)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dfmvr.nets.involution import LOOP_MIN_WIDTH, Involution2d, involve

# (channels, groups, H, W, kernel, stride, dilation)
CASES = [
    (4, 2, 5, 6, 3, 1, 1),
    (4, 2, 5, 6, 3, 2, 1),
    (4, 2, 5, 6, 3, 1, 2),
    (4, 2, 5, 6, 3, 2, 2),
    (8, 2, 7, 7, 7, 2, 1),
    (4, 4, 1, 1, 7, 1, 1),
    (6, 3, 4, 9, 5, 3, 1),
]


def _unfold_involution(x, kernels, k, stride, dilation):
    b, c = x.shape[:2]
    _, g, kk, h, w = kernels.shape
    patches = F.unfold(x, k, dilation=dilation, padding=dilation * (k - 1) // 2, stride=stride)
    patches = patches.reshape(b, g, c // g, kk, h, w)
    return (kernels.unsqueeze(2) * patches).sum(dim=3).reshape(b, c, h, w)


def _inputs(c, g, hi, wi, k, stride, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, hi, wi, dtype=torch.float64, generator=gen).requires_grad_()
    h, w = math.ceil(hi / stride), math.ceil(wi / stride)
    kernels = torch.randn(2, g, k * k, h, w, dtype=torch.float64, generator=gen).requires_grad_()
    return x, kernels


@pytest.mark.parametrize("method", ["loop", "unfold", "auto"])
@pytest.mark.parametrize("c,g,hi,wi,k,stride,dilation", CASES)
def test_involve_matches_the_unfold_formulation_forward_and_backward(c, g, hi, wi, k, stride, dilation, method):
    x, kernels = _inputs(c, g, hi, wi, k, stride)
    out = involve(x, kernels, k, stride, dilation, method=method)
    ref = _unfold_involution(x, kernels, k, stride, dilation)
    torch.testing.assert_close(out, ref)
    dy = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, kernels), dy), torch.autograd.grad(ref, (x, kernels), dy)):
        torch.testing.assert_close(got, want)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(involve(x_cl, kernels.detach(), k, stride, dilation, method=method), ref.detach())


@pytest.mark.parametrize("c,g,hi,wi,k,stride,dilation", CASES[:5])
def test_involve_backward_passes_gradcheck(c, g, hi, wi, k, stride, dilation):
    x, kernels = _inputs(c, g, hi, wi, k, stride, seed=1)
    assert torch.autograd.gradcheck(lambda a, b: involve(a, b, k, stride, dilation, method="loop"), (x, kernels))


def test_auto_picks_the_loop_on_wide_maps_and_unfold_on_narrow_ones():
    x, kernels = _inputs(4, 2, 6, 2 * LOOP_MIN_WIDTH, 3, 2)
    assert involve(x, kernels, 3, stride=2).grad_fn.name() == "_InvolveBackward"
    x, kernels = _inputs(4, 2, 6, 2 * LOOP_MIN_WIDTH - 2, 3, 2)
    assert involve(x, kernels, 3, stride=2).grad_fn.name() != "_InvolveBackward"


@pytest.mark.parametrize("method", ["loop", "unfold"])
def test_involve_gradient_to_one_input_only_and_mixed_dtypes(method):
    x, kernels = _inputs(4, 2, 6, 6, 3, 1)
    (gx,) = torch.autograd.grad(involve(x, kernels.detach(), 3, method=method).sum(), x)
    (gk,) = torch.autograd.grad(involve(x.detach(), kernels, 3, method=method).sum(), kernels)
    assert gx.shape == x.shape and gk.shape == kernels.shape and gx.abs().sum() > 0 and gk.abs().sum() > 0
    xb = x.detach().bfloat16().requires_grad_()
    kf = kernels.detach().float().requires_grad_()
    out = involve(xb, kf, 3, method=method)
    out.sum().backward()
    assert out.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16 and kf.grad.dtype == torch.float32


def test_involve_rejects_kernels_of_the_wrong_shape():
    x, kernels = _inputs(4, 2, 6, 6, 3, 2)
    with pytest.raises(ValueError, match=r"must be \(3, 3\) pixels for a 6 x 6 input at stride 2; got \(6, 6\)"):
        involve(x, torch.randn(2, 2, 9, 6, 6, dtype=torch.float64), 3, stride=2)
    with pytest.raises(ValueError, match=r"G dividing C=4, k\*k=49"):
        involve(x, kernels, 7, stride=2)
    with pytest.raises(ValueError, match="method must be 'auto', 'loop' or 'unfold'; got 'fast'"):
        involve(x, kernels, 3, stride=2, method="fast")


def test_involve_loop_accumulates_bf16_in_float32():
    x, kernels = _inputs(16, 1, 20, 20, 7, 1, seed=2)
    ref = _unfold_involution(x.detach(), kernels.detach(), 7, 1, 1)
    xb, kb = x.detach().bfloat16(), kernels.detach().bfloat16()
    exact = _unfold_involution(xb.double(), kb.double(), 7, 1, 1)  # the bf16-rounded inputs, exact sum
    out = involve(xb, kb, 7, method="loop")
    assert out.dtype == torch.bfloat16
    # one final rounding to bf16 (relative 2**-8), not 49 of them
    torch.testing.assert_close(out.double(), exact, rtol=2**-8, atol=1e-6)
    assert (out.double() - ref).abs().max() < 0.1 * ref.abs().max()


def test_involution_module_methods_agree_and_bad_method_is_rejected():
    torch.manual_seed(0)
    inv = Involution2d(32, kernel_size=7, stride=2).double().eval()
    x = torch.randn(2, 32, 30, 26, dtype=torch.float64)
    with torch.no_grad():
        outs = {}
        for method in ("auto", "loop", "unfold"):
            inv.method = method
            outs[method] = inv(x)
    torch.testing.assert_close(outs["loop"], outs["unfold"])
    torch.testing.assert_close(outs["auto"], outs["unfold"])
    with pytest.raises(ValueError, match="involution method: expected 'auto', 'loop' or 'unfold', got 'fast'"):
        Involution2d(32, method="fast")
