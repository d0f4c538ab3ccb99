"""Real learning checks: the tiny model fits one fixed batch of synthetic triplets, and with the
default pipeline (a parse net trained first, the network reading its masks, every loss term) it
learns identity per triplet on held-out subjects.

On the fixed batch, 200 Adam steps must cut the total loss by at least half and bring the mesh
closer to the ground truth than the mean face is (aligned vertex RMSE, the same metric training
validates with).
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
    # the network's fit to one batch: its own masks, no parse net
    cfg = apply_overrides(cfg, {"model.backbone": backbone, "loss.mask_loss": False, "render.backend": "torch",
                                "model.input_masks": "given"})
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
"""Triplets the tiny model trains on in the learning test (600 steps of 8 at one thread)."""
LEARN_FLOOR_PCT = 1.5
"""The least validation gain over the mean face the tiny model must reach after
:data:`LEARN_TRIPLETS` triplets with the default pipeline: the network reads the parse net's
masks (the builtin parse net's, from the mask cache) and trains every loss term, the mask loss
through that parse net. How it was chosen (2026-12-07, one EPYC, ``benchmarks/learning_floor.py``,
docs/benchmarks.md): the test's setting at seeds 0-3 and one thread ended at
3.98, 7.05, 9.15 and 3.99%; two threads (another summation order) 5.97 and 8.73% (seeds 0, 1);
float32 masks (a CPU without native bf16 makes the cache so) 3.72 and 6.67%. The floor sits at
40% of the lowest of the eight (3.72%), 2.2 points under it, so a machine whose float rounding
differs keeps it; a model that stops reading identity (the mean-face collapse of issue #11) ends
near 0 and fails it."""
LEARN_EARLY_TRIPLETS = 2400
"""Where the test also validates: half way."""
LEARN_EARLY_FLOOR_PCT = -3.0
"""Half way the same eight runs stood at 2.10, 2.42, 3.90, 3.39, 1.51, 3.31, -0.62 and 3.80%; a
model far above the mean face half way fails here (the BatchNorm-in-eval-mode blow-up of issue
#11 stood 35% above it)."""


def identity_setup(root, *, seed: int = 0):
    """The test's data, parse net and mask cache: 600 subjects (480 in training, 960 triplets:
    the test's 4800 triplets are five passes), the tiny preset's parse net (the builtin one), its
    masks of the views made into the mask cache, and the splits held in memory with them."""
    from dfmvr.data.synth import generate
    from dfmvr.nets import read_parsenet_file
    from dfmvr.train.parsing import score_parse_net
    from dfmvr.train.curve import load_split
    from dfmvr.train.masks import ensure_mask_cache

    generate(str(root), n_subjects=600, n_captures=2, size=64, seed=5, workers=1, n_vertices=2500,
             splits=(0.8, 0.2, 0.0))
    # batch 8: one optimiser step of `make train` (2 workers x the preset's 8 would be 16; one
    # process at 8 per step is what the curves of docs/notes/training-readings.md measure)
    cfg = apply_overrides(tiny(), {"data.url": str(root), "data.num_workers": 0, "data.batch_size": 8,
                                   "seed": seed, "parsenet.val_samples": 100, "parsenet.robustness": False})
    bundle = read_parsenet_file(cfg.model.parse_net)
    cache, _ = ensure_mask_cache(cfg, bundle, device="cpu")
    return (cfg, load_split(cfg, "train", mask_cache=cache),
            load_split(cfg, "val", limit=200, with_gt=True, mask_cache=cache), score_parse_net(cfg, bundle))


@pytest.fixture(scope="module")
def identity_data(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return identity_setup(tmp_path_factory.mktemp("identity"))
    finally:
        torch.set_num_threads(threads)


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

    cfg, train, val, parse = identity_data
    assert cfg.model.input_masks == "parse_net" and train.mask_source.startswith("parse_net:")
    assert parse["miou"] > 0.7, parse  # a parse net that sees the parts (of subjects it never saw)
    points = learning_curve(cfg, train, val, triplets=LEARN_TRIPLETS, every=LEARN_EARLY_TRIPLETS, seed=0)
    assert [p.triplets for p in points] == [LEARN_EARLY_TRIPLETS, LEARN_TRIPLETS]
    assert [p.nonfinite for p in points] == [0, 0]
    assert "mask" in points[-1].loss  # the mask loss trained through the parse net
    early, last = points
    assert early.gain_pct >= LEARN_EARLY_FLOOR_PCT, (
        f"after {early.triplets} triplets the tiny model is {-early.gain_pct:.1f}% above the mean face's error "
        f"({early.rmse_mm:.3f} vs {early.mean_face_rmse_mm:.3f} mm); the floor is {LEARN_EARLY_FLOOR_PCT}%")
    assert last.gain_pct >= LEARN_FLOOR_PCT, (
        f"after {last.triplets} triplets the tiny model is {last.gain_pct:.1f}% below the mean face's error "
        f"({last.rmse_mm:.3f} vs {last.mean_face_rmse_mm:.3f} mm); the floor is {LEARN_FLOOR_PCT}%")
