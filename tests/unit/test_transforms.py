"""Weight maps (paper and reference), resizing, colour jitter, the model range and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfmvr.data import transforms as tf
from dfmvr.data.batch import TripletItem, collate


def _square_face(size: int, lo: int, hi: int) -> np.ndarray:
    """Skin square [lo, hi) x [lo, hi) with a nose (class 6) block in its middle."""
    mask = np.zeros((size, size), np.uint8)
    mask[lo:hi, lo:hi] = 1
    mid = (lo + hi) // 2
    mask[mid - 4 : mid + 4, mid - 4 : mid + 4] = 6
    return mask


@pytest.mark.parametrize("size", [224, 448])
def test_paper_weight_map_levels_and_dilation_radius(size):
    scale = size / 224
    lo, hi = int(80 * scale), int(140 * scale)
    mask = _square_face(size, lo, hi)
    weights = tf.weight_map(mask, "paper")
    assert weights.dtype == np.float32 and weights.shape == mask.shape
    row = (lo + hi) // 2
    radius = 20 * scale
    last_face = hi - 1
    # distance from pixel (row, last_face + d) to the face is d
    assert weights[row, last_face + int(radius) - 1] == pytest.approx(128 / 255)  # 19 px at 224
    assert weights[row, last_face + int(radius)] == pytest.approx(128 / 255)  # 20 px: still dilated
    assert weights[row, last_face + int(radius) + 1] == pytest.approx(32 / 255)  # 21 px at 224
    assert weights[row, lo - int(radius) - 1] == pytest.approx(32 / 255)
    assert weights[lo + 2, lo + 2] == pytest.approx(128 / 255)  # skin
    assert weights[row, row] == pytest.approx(254 / 255)  # nose
    assert weights[0, 0] == pytest.approx(32 / 255)
    # diagonal: a pixel 14 px right and 14 px down of the corner is 19.8 px away (Euclidean) ...
    assert weights[last_face + int(14 * scale), last_face + int(14 * scale)] == pytest.approx(128 / 255)
    # ... and one 15 + 15 px away is 21.2 px away, outside although each axis offset is < 20
    assert weights[last_face + int(15 * scale), last_face + int(15 * scale)] == pytest.approx(32 / 255)
    levels = np.unique(weights)
    assert len(levels) == 3 and np.allclose(sorted(levels), sorted(tf.PAPER_LEVELS))


def test_paper_weight_map_all_background():
    weights = tf.weight_map(np.zeros((64, 64), np.uint8), "paper")
    np.testing.assert_allclose(weights, 32 / 255)


def test_reference_weight_map_levels_and_kernel():
    size = 224
    mask = _square_face(size, 40, 180)
    weights = tf.weight_map(mask, "reference")
    nose_rows = np.where((mask == 6).any(axis=1))[0]
    top, bottom = nose_rows[0], nose_rows[-1]
    col = 110
    assert weights[col, col] == pytest.approx(0.99)
    # a 10 x 10 kernel anchored at (5, 5) grows the feature 4 px up/left and 5 px down/right
    assert weights[top - 4, col] == pytest.approx(0.99)
    assert weights[top - 5, col] == pytest.approx(0.5)
    assert weights[bottom + 5, col] == pytest.approx(0.99)
    assert weights[bottom + 6, col] == pytest.approx(0.5)
    assert weights[col, bottom + 5] == pytest.approx(0.99)
    assert weights[col, bottom + 6] == pytest.approx(0.5)
    assert weights[45, 45] == pytest.approx(0.5)  # skin
    assert weights[5, 5] == pytest.approx(0.25)  # background (no face dilation in this variant)
    assert weights[30, 100] == pytest.approx(0.25)


def test_weight_map_over_views_and_bad_input():
    masks = np.stack([_square_face(64, 10, 50), np.zeros((64, 64), np.uint8)])
    weights = tf.weight_map(masks, "paper")
    assert weights.shape == (2, 64, 64)
    np.testing.assert_array_equal(weights[0], tf.weight_map(masks[0], "paper"))
    with pytest.raises(ValueError, match="kind must be one of"):
        tf.weight_map(masks, "fancy")
    with pytest.raises(ValueError, match="integer class ids"):
        tf.weight_map(masks.astype(np.float32))


def test_resize_views_scales_landmarks_and_keeps_classes():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    masks = rng.integers(0, 10, (3, 64, 64), dtype=np.uint8)
    lmk = rng.uniform(0, 64, (3, 68, 2)).astype(np.float32)
    big_images, big_masks, big_lmk = tf.resize_views(images, masks, lmk, 128)
    assert big_images.shape == (3, 128, 128, 3) and big_masks.shape == (3, 128, 128)
    np.testing.assert_allclose(big_lmk, lmk * 2)
    # nearest neighbour: each source pixel becomes a 2 x 2 block of the same class
    np.testing.assert_array_equal(big_masks[:, ::2, ::2], masks)
    small_images, small_masks, small_lmk = tf.resize_views(images, masks, lmk, 32)
    assert small_images.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(small_lmk, lmk / 2)
    assert set(np.unique(small_masks)) <= set(range(10))
    same = tf.resize_views(images, masks, lmk, 64)
    assert same[0] is images and same[2] is lmk


def test_color_jitter_is_one_transform_for_all_views():
    rng = np.random.default_rng(1)
    view = rng.uniform(0.1, 0.9, (16, 16, 3)).astype(np.float32)
    other = rng.uniform(0.1, 0.9, (16, 16, 3)).astype(np.float32)
    images = np.stack([view, other, view])
    out = tf.color_jitter(images, 0.4, np.random.default_rng(7))
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out[0], out[2])  # same colours in, same colours out
    assert np.abs(out - images).mean() > 1e-3
    again = tf.color_jitter(images, 0.4, np.random.default_rng(7))
    np.testing.assert_array_equal(out, again)
    assert tf.color_jitter(images, 0.0, np.random.default_rng(7)) is images


def test_color_jitter_keeps_grey_grey_without_hue_and_saturation_change():
    matrix, offset = tf.color_jitter_matrix(0.0, np.random.default_rng(0), 0.5)
    np.testing.assert_allclose(matrix, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(offset, 0, atol=1e-6)
    grey = np.full((3, 4, 4, 3), 0.5, np.float32)
    out = tf.color_jitter(grey, 0.5, np.random.default_rng(3))
    # every transform part maps grey to grey (hue rotates about the grey axis)
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-5)
    np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-5)


def test_to_model_range():
    images = np.array([0, 255, 128], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=3)
    out = tf.to_model_range(images)
    assert out.shape == (1, 3, 1, 3)
    np.testing.assert_allclose(out[0, 0, 0], [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)


def _item(key: str, *, k3d: int | None, coeffs: bool, size: int = 8) -> TripletItem:
    return TripletItem(
        key=key,
        subject=key.split("-")[0],
        images=np.zeros((3, 3, size, size), np.float32),
        masks=np.ones((3, size, size), np.uint8),
        weights=np.ones((3, 1, size, size), np.float32),
        lmk2d=np.zeros((3, 68, 2), np.float32),
        yaw_deg=np.array([-45, 0, 45], np.float32),
        lmk3d=np.ones((k3d, 3), np.float32) if k3d else None,
        coeffs=np.ones(269, np.float32) if coeffs else None,
        gt_vertices=np.zeros((5, 3), np.float32),
        gt_faces=np.zeros((2, 3), np.int64),
    )


def test_collate_pads_optional_entries_with_flags():
    batch = collate([_item("a-0", k3d=4, coeffs=True), _item("b-0", k3d=None, coeffs=False), _item("c-0", k3d=6, coeffs=True)], skipped=2, with_gt=True)
    assert len(batch) == 3 and batch.keys == ["a-0", "b-0", "c-0"] and batch.skipped == 2
    assert batch.images.shape == (3, 3, 3, 8, 8) and batch.masks.dtype == torch.int64
    assert batch.weights.shape == (3, 3, 1, 8, 8)
    assert batch.lmk3d.shape == (3, 6, 3)
    assert batch.has_lmk3d.tolist() == [True, False, True]
    assert batch.lmk3d_valid.sum(dim=1).tolist() == [4, 0, 6]
    assert batch.coeffs.shape == (3, 269) and batch.has_coeffs.tolist() == [True, False, True]
    assert len(batch.gt_vertices) == 3 and batch.gt_faces[0].dtype == torch.int64
    moved = batch.to("cpu")
    assert moved.keys == batch.keys and torch.equal(moved.images, batch.images)
    assert collate([_item("a-0", k3d=None, coeffs=False)]).coeffs.shape == (1, 0)
    with pytest.raises(ValueError, match="different image shapes"):
        collate([_item("a-0", k3d=None, coeffs=False), _item("b-0", k3d=None, coeffs=False, size=16)])
