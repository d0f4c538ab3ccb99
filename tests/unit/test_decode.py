"""The one decoder: a synthetic sample's stored coefficients, decoded by the model's own
``DFMVR.decode``, reproduce the sample's stored images, masks and landmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def batch(synth_root):
    from dfmvr.config import DataConfig
    from dfmvr.data.loader import make_loader

    cfg = DataConfig(url=str(synth_root), image_size=64, color_jitter=0.0)
    return next(iter(make_loader(cfg, "train", rank=0, world_size=1, resampled=False, shuffle=False,
                                 batch_size=4, num_workers=0)))


def _model():
    from dfmvr.facemodel import build_face_model
    from dfmvr.model import DFMVR
    from dfmvr.presets import tiny

    cfg = tiny()
    return DFMVR(cfg.model, cfg.render, build_face_model(cfg.facemodel)).eval()


def test_model_decoder_reproduces_the_synthetic_images(batch):
    assert bool(batch.has_coeffs.all())
    model = _model()
    with torch.no_grad():
        out = model.decode(batch.coeffs)
    stored = (batch.images + 1) / 2  # [B, V, 3, S, S] in [0, 1]
    cover = out.render_mask[:, :, 0] > 0.5  # [B, V, S, S]
    face = batch.masks > 0
    # the same pixels are face in both: coverage agrees except along the silhouette's edge
    assert (cover ^ face).float().mean() < 0.01
    inside = (cover & face).unsqueeze(2).expand_as(stored)
    diff = (out.image.clamp(0, 1) - stored).abs()[inside]
    # stored images are 8-bit: rounding alone is up to half a level
    assert diff.mean() < 1.0 / 255, float(diff.mean())
    assert torch.quantile(diff, 0.99) < 3.0 / 255, float(torch.quantile(diff, 0.99))
    # parsing classes of the render are the stored masks, and the landmarks are the stored ones
    assert (out.region[cover & face] == batch.masks[cover & face]).float().mean() > 0.99
    np.testing.assert_allclose(out.lm2d.numpy(), batch.lmk2d.numpy(), atol=1e-3)


def test_other_coefficients_do_not_reproduce_them(batch):
    """The comparison above can fail: another sample's coefficients are far off."""
    model = _model()
    with torch.no_grad():
        out = model.decode(batch.coeffs.roll(1, 0))
    stored = (batch.images + 1) / 2
    both = ((out.render_mask[:, :, 0] > 0.5) & (batch.masks > 0)).unsqueeze(2).expand_as(stored)
    assert (out.image.clamp(0, 1) - stored).abs()[both].mean() > 3.0 / 255


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_shape_grad_2d_scales_only_the_picture_terms_gradient_into_the_shape(batch, scale):
    """``loss.shape_grad_2d``: values unchanged; the 2D landmarks' gradient on the identity
    coefficients scaled, the 3D landmarks' and the pose's untouched."""
    model = _model()
    coeffs = batch.coeffs.clone().requires_grad_(True)
    plain = model.decode(coeffs, render=False)
    scaled = model.decode(coeffs, render=False, shape_grad_2d=scale)
    assert torch.equal(plain.lm2d, scaled.lm2d) and torch.equal(plain.lm3d, scaled.lm3d)
    ids, pose = model.layout.id, slice(model.layout.n_shared, None)

    def grad(value):
        (g,) = torch.autograd.grad(value.square().sum(), coeffs, retain_graph=True)
        return g

    g_plain, g_scaled = grad(plain.lm2d), grad(scaled.lm2d)
    assert g_plain[:, ids].abs().max() > 0
    torch.testing.assert_close(g_scaled[:, ids], scale * g_plain[:, ids])
    torch.testing.assert_close(g_scaled[:, pose], g_plain[:, pose])
    torch.testing.assert_close(grad(scaled.lm3d), grad(plain.lm3d))


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_backbone_grad_2d_scales_only_the_non_shape_rows_gradient_into_the_network(batch, scale):
    """``loss.backbone_grad_2d``: the coefficients are the same; what the pose rows send into the
    network below the head is scaled, what the identity rows send is not, and the head's own
    weights get their whole gradient either way."""
    model = _model()
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking head: a zero weight sends nothing down
        model.regressor.head.weight.normal_(0, 0.05)
    images, masks = batch.images, batch.masks
    ids, pose = model.layout.id, slice(model.layout.n_shared, None)
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = model.regressor.head.weight

    def grads(loss):
        return torch.autograd.grad(loss, [head, *backbone], retain_graph=True, allow_unused=True)

    plain = model.encode(images, masks)
    scaled = model.encode(images, masks, backbone_grad_2d=scale)
    torch.testing.assert_close(scaled, plain, rtol=0, atol=0)
    for rows, factor in ((pose, scale), (ids, 1.0)):
        g_plain = grads(plain[:, rows].square().sum())
        g_scaled = grads(scaled[:, rows].square().sum())
        torch.testing.assert_close(g_scaled[0], g_plain[0])
        flat_plain = torch.cat([g.flatten() for g in g_plain[1:] if g is not None])
        flat_scaled = torch.cat([g.flatten() for g in g_scaled[1:] if g is not None])
        assert flat_plain.abs().max() > 0
        torch.testing.assert_close(flat_scaled, factor * flat_plain)
