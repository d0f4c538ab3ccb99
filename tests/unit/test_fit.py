"""Test-time fitting (dfmvr/fit.py) on synthetic captures whose true coefficients are known: the
fit lowers every data term and moves the face toward the truth, from the mean face and from a
network's prediction."""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def batch(synth_root):
    from dfmvr.config import DataConfig
    from dfmvr.data.loader import make_loader

    cfg = DataConfig(url=str(synth_root), image_size=64, color_jitter=0.0)
    return next(iter(make_loader(cfg, "train", rank=0, world_size=1, resampled=False, shuffle=False,
                                 batch_size=4, num_workers=0, with_gt=True)))


@pytest.fixture(scope="module")
def model():
    from dfmvr.facemodel import build_face_model
    from dfmvr.model import DFMVR, frozen_parse_net
    from dfmvr.nets import BUILTIN, read_parsenet_file
    from dfmvr.presets import tiny

    cfg = tiny()
    torch.manual_seed(0)
    m = DFMVR(cfg.model, cfg.render, build_face_model(cfg.facemodel)).eval()
    m.set_input_parse_net(frozen_parse_net(read_parsenet_file(BUILTIN), "builtin", "cpu", amp=False))
    return m


def _vertex_rmse(model, coeffs, truth):
    from dfmvr.facemodel import geometry

    parts = model.layout.split(coeffs)
    shape = geometry.compute_shape(model.face.model, parts.id, parts.exp)
    return ((shape - truth) ** 2).sum(-1).mean(-1).sqrt()


def test_fitting_from_the_mean_face_lowers_every_data_term_and_moves_toward_the_truth(model, batch):
    from dfmvr.facemodel import geometry
    from dfmvr.fit import FitConfig, fit

    torch.manual_seed(0)
    res = fit(model, batch.images, lmk2d=batch.lmk2d, cfg=FitConfig(steps=80, start="mean"))
    true_parts = model.layout.split(batch.coeffs)
    truth = geometry.compute_shape(model.face.model, true_parts.id, true_parts.exp)
    for before, after in zip(res.before, res.after):
        for term in ("lm2d", "photo", "mask", "total"):
            assert after[term] < before[term], (term, before[term], after[term])
        assert all(math.isfinite(v) for v in after.values())
    # the shape: closer to the truth than the mean face is, for every capture
    start, fitted = _vertex_rmse(model, res.start, truth), _vertex_rmse(model, res.coeffs, truth)
    assert bool((fitted < 0.85 * start).all()), (start.tolist(), fitted.tolist())
    # and so the coefficients: identity nearer the true one
    start_id = (model.layout.split(res.start).id - true_parts.id).norm(dim=1)
    fitted_id = (model.layout.split(res.coeffs).id - true_parts.id).norm(dim=1)
    assert bool((fitted_id < start_id).all()), (start_id.tolist(), fitted_id.tolist())
    # the output is the fitted faces rendered, and the network's weights did not move
    assert res.output.image.shape == batch.images.shape and res.output.coeffs.shape == (4, 269)
    assert res.exp_views.shape == (4, 3, model.layout.n_exp) and res.gamma_views.shape == (4, 3, 27)


def test_fitting_from_the_network_keeps_its_weights_and_lowers_the_total(model, batch):
    from dfmvr.fit import FitConfig, fit

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    res = fit(model, batch.images, lmk2d=batch.lmk2d, cfg=FitConfig(steps=30, per_view=False))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert not model.training and res.exp_views is None and res.gamma_views is None
    with torch.no_grad():  # the network reads its parse net's masks
        net = model(batch.images, None, render=False).coeffs
    torch.testing.assert_close(res.start, net)
    for before, after in zip(res.before, res.after):
        assert after["total"] < before["total"] and after["lm2d"] < before["lm2d"]


def test_fitting_without_landmarks_still_runs_on_the_pictures(model, batch):
    from dfmvr.fit import FitConfig, fit

    lmk = torch.full_like(batch.lmk2d, math.nan)
    res = fit(model, batch.images[:2], lmk2d=lmk[:2], cfg=FitConfig(steps=8, start="mean"))
    assert all(math.isfinite(v) for t in res.after for v in t.values())
    assert all(a["photo"] < b["photo"] for b, a in zip(res.before, res.after))


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "fit steps"), ({"lr": 0.0}, "fit lr"), ({"start": "zero"}, "fit start"),
    ({"picture_every": 0}, "picture_every"), ({"photo": -1.0}, "fit photo weight"),
])
def test_bad_fit_settings_are_named(kwargs, message):
    from dfmvr.fit import FitConfig

    with pytest.raises(ValueError, match=message):
        FitConfig(**kwargs)


def test_fitting_without_masks_or_parse_net_says_what_it_needs(batch):
    from dfmvr.facemodel import build_face_model
    from dfmvr.fit import fit
    from dfmvr.model import DFMVR
    from dfmvr.presets import tiny

    cfg = tiny()
    bare = DFMVR(cfg.model, cfg.render, build_face_model(cfg.facemodel)).eval()
    with pytest.raises(ValueError, match="masks"):
        fit(bare, batch.images[:1], lmk2d=batch.lmk2d[:1])
