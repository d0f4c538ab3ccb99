"""A real learning check: the tiny model fits one fixed batch of synthetic triplets.

200 Adam steps must cut the total loss by at least half and bring the mesh closer to the ground
truth than the mean face is (aligned vertex RMSE, the same metric training validates with).
"""

from __future__ import annotations

import pytest
import torch

from dfmvr.config import apply_overrides
from dfmvr.data.loader import make_loader
from dfmvr.facemodel import build_face_model
from dfmvr.model import DFMVR
from dfmvr.presets import tiny
from dfmvr.train.metrics import aligned_vertex_rmse_mm
from dfmvr.train.objective import reconstruction_losses

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fixed_batch(tmp_path_factory):
    from sharding.synth import generate

    root = tmp_path_factory.mktemp("learn")
    generate(str(root), n_subjects=6, n_captures=2, size=64, seed=11, workers=1, n_vertices=2500,
             splits=(1.0, 0.0, 0.0))
    cfg = apply_overrides(tiny(), {"data.url": str(root), "data.num_workers": 0, "data.batch_size": 8})
    loader = make_loader(cfg.data, "train", rank=0, world_size=1, resampled=False, with_gt=True, shuffle=False)
    return cfg, next(iter(loader))


@pytest.mark.parametrize("backbone", ["fusion"])
def test_tiny_model_fits_a_fixed_batch(fixed_batch, backbone):
    cfg, batch = fixed_batch
    cfg = apply_overrides(cfg, {"model.backbone": backbone, "loss.mask_loss": False, "render.backend": "torch"})
    torch.manual_seed(0)
    model = DFMVR(cfg.model, cfg.render, build_face_model(cfg.facemodel))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gt = torch.stack(batch.gt_vertices)
    fm = model.face.model
    mean_face_err = float(aligned_vertex_rmse_mm(fm.mean_shape.expand_as(gt), gt).mean())

    losses = []
    for step in range(200):
        out = model(batch.images, batch.masks)
        total, _ = reconstruction_losses(model, out, batch, cfg.loss, step)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(float(total))
    model.eval()
    with torch.no_grad():
        out = model(batch.images, batch.masks, render=False)
    err = float(aligned_vertex_rmse_mm(out.shape, gt).mean())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.5 * first, (first, last)
    assert err < mean_face_err, (err, mean_face_err)
