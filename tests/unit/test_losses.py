"""Each loss is zero (or at its minimum) when prediction equals target and grows as they part."""

import pytest
import torch

from dfmvr import losses
from dfmvr.config import LossConfig


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(6, 3, 16, 16, generator=g)
    cover = torch.zeros(6, 1, 16, 16)
    cover[..., 2:14, 3:13] = 1
    face = torch.zeros(6, 1, 16, 16)
    face[..., 4:16, 2:12] = 1
    weight = torch.full((6, 1, 16, 16), 128 / 255)
    return img, cover, face, weight


def test_photo_zero_at_target_and_grows():
    img, cover, face, weight = _images()
    assert losses.photo_loss(img, img, cover, face, weight) < 1e-3
    prev = 0.0
    for eps in (0.05, 0.1, 0.3):
        val = float(losses.photo_loss((img + eps).clamp(0, 1), img, cover, face, weight))
        assert val > prev
        prev = val


def test_photo_counts_only_render_and_face_intersection():
    img, cover, face, weight = _images()
    other = img.clone()
    outside = (cover * face) == 0
    other[outside.expand_as(other)] = 1 - other[outside.expand_as(other)]  # differs only outside
    assert losses.photo_loss(other, img, cover, face, weight) < 1e-3
    inside = ~outside
    other = img.clone()
    other[inside.expand_as(other)] += 0.5
    assert losses.photo_loss(other, img, cover, face, weight) > 0.4


def test_photo_weight_map_scales_regions():
    img, cover, face, weight = _images()
    other = img.clone()
    other[:, :, 4:8] += 0.4  # error in rows 4..7 only
    heavy = weight.clone()
    heavy[:, :, 4:8] = 254 / 255
    assert losses.photo_loss(other, img, cover, face, heavy) > losses.photo_loss(other, img, cover, face, weight)


def test_mask_loss_minimal_at_confident_correct_prediction():
    target = torch.randint(0, 10, (2, 8, 8))
    region = torch.ones(2, 8, 8, dtype=torch.bool)
    good = torch.nn.functional.one_hot(target, 10).permute(0, 3, 1, 2).float() * 20
    assert losses.mask_loss(good, target, region) < 1e-6
    wrong = torch.nn.functional.one_hot((target + 1) % 10, 10).permute(0, 3, 1, 2).float() * 20
    assert losses.mask_loss(wrong, target, region) > 10
    assert losses.mask_loss(wrong, target, torch.zeros_like(region)) == 0


def test_lm2d_zero_weighted_and_resolution_free():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(3, 68, 2, generator=g) * 64
    assert losses.lm2d_loss(t, t, 64) == 0
    off = t.clone()
    off[:, 0, 0] += 1.0  # 1 px at 64 -> 3.5 px at 224, weight 1
    heavy = t.clone()
    heavy[:, 30, 0] += 1.0  # nose tip, weight 20
    a, b = float(losses.lm2d_loss(off, t, 64)), float(losses.lm2d_loss(heavy, t, 64))
    assert a == pytest.approx(3.5**2 / 68, rel=1e-5)
    assert b == pytest.approx(20 * a, rel=1e-5)
    # the same error at 224 px in 224-px units is the same loss
    assert float(losses.lm2d_loss(off * 3.5, t * 3.5, 224)) == pytest.approx(a, rel=1e-5)
    # missing (NaN) landmarks are left out
    nan = t.clone()
    nan[:, 0] = float("nan")
    assert losses.lm2d_loss(t, nan, 64) == 0


def test_lm3d_in_mm_and_presence():
    t = torch.randn(2, 10, 3)
    assert losses.lm3d_loss(t, t) == 0
    moved = t + torch.tensor([0.01, 0.0, 0.0])  # 1 mm
    assert float(losses.lm3d_loss(moved, t)) == pytest.approx(1.0, rel=1e-5)
    present = torch.tensor([True, False])
    moved[1] += 5
    assert float(losses.lm3d_loss(moved, t, present)) == pytest.approx(1.0, rel=1e-5)


def test_regularisers_minimal_at_zero_and_white_flat():
    z = torch.zeros(2, 80)
    assert losses.reg_loss(z, torch.zeros(2, 64), z) == 0
    assert losses.reg_loss(torch.ones(2, 80), torch.zeros(2, 64), z) == 80
    assert float(losses.reg_loss(z, torch.ones(2, 64), z)) == pytest.approx(0.8 * 64)
    white = torch.randn(2, 9).repeat(1, 3)  # same SH for R, G, B
    assert losses.gamma_loss(white) < 1e-12
    assert losses.gamma_loss(white + torch.randn(2, 27)) > 0
    flat = torch.full((2, 50, 3), 0.6)
    skin = torch.zeros(50, dtype=torch.bool)
    skin[:30] = True
    assert losses.reflect_loss(flat, skin) == 0
    spotty = flat.clone()
    spotty[:, 31:] = 0  # not skin: does not count
    assert losses.reflect_loss(spotty, skin) == 0
    spotty[:, :5] = 0.1
    assert losses.reflect_loss(spotty, skin) > 0


def test_active_terms_and_combine_follow_switches():
    cfg = LossConfig(mask_loss_start_step=100)
    assert "mask" not in losses.active_terms(cfg, 10)
    assert "mask" in losses.active_terms(cfg, 100)
    assert "lm3d" not in losses.active_terms(cfg, 0, has_lm3d=False)
    off = LossConfig(lm3d_loss=False, mask_loss=False, photo=0)
    assert set(losses.active_terms(off, 10**6)) == {"lm2d", "reg", "gamma", "reflect"}
    total, vals = losses.combine({"photo": torch.tensor(2.0), "reg": torch.tensor(1.0)}, cfg)
    assert float(total) == pytest.approx(24 * 2 + 3e-4)
    assert vals["total"] is total
    with pytest.raises(KeyError, match="bogus"):
        losses.combine({"bogus": torch.tensor(1.0)}, cfg)


def test_picture_terms_follow_picture_every():
    cfg = LossConfig(picture_every=3)
    with_pictures = [step for step in range(7) if {"photo", "mask"} <= set(losses.active_terms(cfg, step))]
    assert with_pictures == [0, 3, 6]
    assert [s for s in range(7) if losses.picture_step(cfg, s)] == [0, 3, 6]
    assert "lm2d" in losses.active_terms(cfg, 1) and "photo" in losses.active_terms(cfg, 1, lazy=False)
    values = {"photo": torch.tensor(2.0), "mask": torch.tensor(0.5), "reg": torch.tensor(1.0)}
    assert float(losses.combine(values, cfg)[0]) == pytest.approx(3 * (24 * 2 + 0.5) + 3e-4)
    assert float(losses.combine(values, cfg, lazy=False)[0]) == pytest.approx(24 * 2 + 0.5 + 3e-4)


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_bad_picture_every_names_the_key(value):
    with pytest.raises(ValueError, match="loss.picture_every: expected an integer >= 1"):
        LossConfig(picture_every=value)
