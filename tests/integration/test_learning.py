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
    from dfmvr.data.synth import generate

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


# --- learning per triplet -----------------------------------------------------------------------

LEARN_TRIPLETS = 4800
"""Triplets the tiny model trains on in the learning test (600 steps of 8 at one thread; about 2
minutes here). 3200 until the preset took one-hot mask channels (``model.mask_encoding``,
2026-12-05), which start slower in this one-process setting: seed 0 stood at 2.9% there."""
LEARN_FLOOR_PCT = 4.0
"""The least validation gain over the mean face the full tiny model (every loss term) must reach
after :data:`LEARN_TRIPLETS` triplets. Measured on this test's data at one thread (an EPYC of the
kind CI runs on, 2026-12-05): 6.30% with seed 0 (the test's; deterministic on one kind of machine),
7.99, 8.79 and 4.86% with seeds 1-3; the one-channel mask encoding ended at 7.83 and 4.57% (seeds
0, 1). The floor sits under every seed measured. (At 3200 triplets, the test's earlier length,
the preset before the training-efficiency work, ``benchmarks/learning_curve.py``'s ``before``,
ended at 1.71 and 2.18% with seeds 0 and 1.) A model that stops reading identity (the mean-face
collapse of issue #11) ends near 0 (docs/training.md, "Learning test")."""
LEARN_EARLY_TRIPLETS = 2400
"""Where the test also validates: half way."""
LEARN_EARLY_FLOOR_PCT = -3.0
"""Half way the preset stood at -1.93, 1.71, 1.99 and 1.92% (seeds 0-3, one thread); the preset
before the training-efficiency work stood 35.3% above the mean face with seed 1 at one thread after
1600 triplets and 34.8% with seed 0 at two (its BatchNorm involution kernels in eval mode, issue
#11's "worse than the mean face at step 250"). A model that far off half way fails here."""


@pytest.fixture(scope="module")
def identity_data(tmp_path_factory):
    from dfmvr.data.synth import generate

    from dfmvr.train.curve import load_split

    root = tmp_path_factory.mktemp("identity")
    # 600 subjects (480 in training, 960 triplets): the test's 4800 triplets are five passes
    generate(str(root), n_subjects=600, n_captures=2, size=64, seed=5, workers=1, n_vertices=2500,
             splits=(0.8, 0.2, 0.0))
    # batch 8: one optimiser step of `make train` (2 workers x the preset's 8 would be 16; one
    # process at 8 per step is what docs/training.md's curves measure)
    cfg = apply_overrides(tiny(), {"data.url": str(root), "data.num_workers": 0, "data.batch_size": 8})
    return cfg, load_split(cfg, "train"), load_split(cfg, "val", limit=200, with_gt=True)


@pytest.fixture
def one_thread():
    """One intra-op thread, as the training workers run: the tiny step is faster so (about 2 minutes
    instead of 3 here) and the floors below were measured so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_model_learns_identity_per_triplet(identity_data, one_thread):
    from dfmvr.train.curve import learning_curve

    cfg, train, val = identity_data
    points = learning_curve(cfg, train, val, triplets=LEARN_TRIPLETS, every=LEARN_EARLY_TRIPLETS, seed=0)
    assert [p.triplets for p in points] == [LEARN_EARLY_TRIPLETS, LEARN_TRIPLETS]
    assert [p.nonfinite for p in points] == [0, 0]
    early, last = points
    assert early.gain_pct >= LEARN_EARLY_FLOOR_PCT, (
        f"after {early.triplets} triplets the tiny model is {-early.gain_pct:.1f}% above the mean face's error "
        f"({early.rmse_mm:.3f} vs {early.mean_face_rmse_mm:.3f} mm); the floor is {LEARN_EARLY_FLOOR_PCT}%")
    assert last.gain_pct >= LEARN_FLOOR_PCT, (
        f"after {last.triplets} triplets the tiny model is {last.gain_pct:.1f}% below the mean face's error "
        f"({last.rmse_mm:.3f} vs {last.mean_face_rmse_mm:.3f} mm); the floor is {LEARN_FLOOR_PCT}%")
