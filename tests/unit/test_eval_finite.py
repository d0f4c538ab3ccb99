"""Eval mode never emits a non-finite prediction: every registered regressor, fresh and after a
few training steps, at any input scale.

RedNet's involution makes each pixel's kernel from that pixel's features. With BatchNorm in the
kernel generator (the involution paper's) the layer is quadratic in its input's scale; in eval
mode, where BatchNorm's running statistics lag weights that move fast early in training, every
block squares any excess scale and a stack of them overflowed to inf (the tiny preset at step
25: 44 of 200 validation triplets). The default generator normalises per sample
(``model.involution_norm=group``), so eval mode is linear in the input's scale.
"""

from __future__ import annotations

import pytest
import torch

from dfmvr.config import apply_overrides
from dfmvr.facemodel import build_face_model
from dfmvr.model import DFMVR
from dfmvr.nets import list_regressors
from dfmvr.presets import tiny

SCALES = (1.0, 10.0, 1000.0)
"""Input scales tried in eval mode (images in [-1, 1] times this)."""


def _model(regressor: str, **extra) -> DFMVR:
    cfg = apply_overrides(tiny(), {"facemodel.n_vertices": 800, "render.backend": "torch",
                                   "model.regressor": regressor, **extra})
    torch.manual_seed(0)
    return DFMVR(cfg.model, cfg.render, build_face_model(cfg.facemodel))


def _inputs(b: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 3, 64, 64, generator=g) * 2 - 1
    masks = torch.randint(0, 10, (b, 3, 64, 64), generator=g)
    return images, masks


def _train(model: DFMVR, steps: int) -> None:
    """A few large Adam steps pulling the coefficients towards random targets: the weights move
    fast, BatchNorm's running statistics lag them (as early in real training)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        images, masks = _inputs(seed=step + 1)
        target = torch.randn(images.shape[0], model.layout.size, generator=torch.Generator().manual_seed(step))
        loss = (model.encode(images, masks) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _eval_coefficients(model: DFMVR, scale: float) -> torch.Tensor:
    model.eval()
    images, masks = _inputs(seed=99)
    with torch.no_grad():
        return model.encode(images * scale, masks)


@pytest.mark.parametrize("regressor", list_regressors())
def test_fresh_model_gives_finite_coefficients_in_eval_mode(regressor):
    model = _model(regressor)
    for scale in SCALES:
        assert torch.isfinite(_eval_coefficients(model, scale)).all(), (regressor, scale)


@pytest.mark.parametrize("regressor", list_regressors())
def test_trained_model_gives_finite_coefficients_in_eval_mode(regressor):
    model = _model(regressor)
    _train(model, steps=12)
    for scale in SCALES:
        coeffs = _eval_coefficients(model, scale)
        assert torch.isfinite(coeffs).all(), (regressor, scale, int((~torch.isfinite(coeffs)).sum()))


def test_batchnorm_kernel_generator_overflows_where_the_default_does_not():
    """Why the default changed: the same training, the paper's BatchNorm kernel generator."""
    model = _model("rednet50", **{"model.involution_norm": "batch"})
    _train(model, steps=12)
    assert not torch.isfinite(_eval_coefficients(model, 1000.0)).all()
