"""5-point similarity alignment: exact recovery, image/landmark consistency, templates per yaw."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from dfmvr.data.align import (
    AlignmentTemplate,
    align_view,
    estimate_similarity,
    five_points,
    transform_points,
    warp_image,
    warp_mask,
)
from sharding.layouts import yaw_sign_check


def _similarity(scale: float, theta: float, tx: float, ty: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


@pytest.mark.parametrize("scale,theta,tx,ty",
                         [(0.37, 0.4, 12.0, -5.0), (2.5, -2.9, -100.0, 40.0), (1.0, 0.0, 0.0, 0.0)])
def test_similarity_recovers_known_transform(scale, theta, tx, ty):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 300, size=(5, 2))
    m_true = _similarity(scale, theta, tx, ty)
    dst = transform_points(m_true, src)
    m = estimate_similarity(src, dst)
    np.testing.assert_allclose(m, m_true, atol=1e-9)


def test_similarity_never_reflects():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, size=(5, 2))
    dst = src * np.array([-1.0, 1.0])  # a mirror image: the best similarity is a rotation, not a flip
    m = estimate_similarity(src, dst)
    assert np.linalg.det(m[:, :2]) > 0


def test_similarity_rejects_degenerate_and_nan():
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), np.zeros((5, 2)))
    pts = np.zeros((5, 2))
    pts[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        estimate_similarity(pts, np.zeros((5, 2)))


def _blob_centroid(img: np.ndarray) -> np.ndarray:
    """Intensity centroid in the pixel-centre convention (pixel (i, j) at (j + .5, i + .5))."""
    w = img.astype(np.float64)
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return np.array([(w * (xs + 0.5)).sum() / w.sum(), (w * (ys + 0.5)).sum() / w.sum()])


@pytest.mark.parametrize("scale", [0.35, 0.8, 1.6])
def test_landmark_follows_image_through_the_warp(scale):
    # a smooth blob centred exactly at a sub-pixel landmark
    h, w = 300, 260
    lmk = np.array([[143.3, 97.8]])
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    sigma = 3.0 / scale  # keep the warped blob about 3 px wide so its centroid is well sampled
    blob = np.exp(-((xs - lmk[0, 0]) ** 2 + (ys - lmk[0, 1]) ** 2) / (2 * sigma ** 2))
    img = (blob * 255).round().astype(np.uint8)
    size = 128
    target = np.array([70.4, 55.7])
    m = _similarity(scale, 0.6, 0.0, 0.0)
    m[:, 2] = target - m[:, :2] @ lmk[0]
    warped = warp_image(img, m, size)
    np.testing.assert_allclose(_blob_centroid(warped), target, atol=0.15)


def test_mask_warp_is_nearest_and_aligned():
    h = w = 200
    mask = np.zeros((h, w), np.uint8)
    cv2.rectangle(mask, (50, 60), (89, 99), 4, thickness=-1)  # pixels 50..89 x 60..99: centre (70, 80)
    cv2.circle(mask, (150, 150), 10, 7, thickness=-1)
    m = _similarity(0.5, 0.3, 20.0, 5.0)
    out = warp_mask(mask, m, 128)
    assert set(np.unique(out)) <= {0, 4, 7}
    cy, cx = np.argwhere(out == 4).mean(axis=0) + 0.5
    np.testing.assert_allclose([cx, cy], transform_points(m, np.array([[70.0, 80.0]]))[0], atol=0.5)


def test_align_view_maps_five_points_onto_template():
    rng = np.random.default_rng(3)
    template = np.array([[40.0, 50.0], [88.0, 50.0], [64.0, 75.0], [45.0, 96.0], [83.0, 96.0]])
    lmk = rng.uniform(0, 1, size=(68, 2))
    # place the alignment landmarks at a known similarity of the template
    m_true = _similarity(3.0, 0.25, 100.0, 60.0)
    inv = np.linalg.inv(np.vstack([m_true, [0, 0, 1]]))[:2]
    src5 = transform_points(inv, template)
    lmk[36:42] = src5[0]
    lmk[42:48] = src5[1]
    lmk[30], lmk[48], lmk[54] = src5[2], src5[3], src5[4]
    img = np.zeros((400, 400, 3), np.uint8)
    out_img, out_lmk, out_mask, m = align_view(img, lmk, template, 128)
    assert out_img.shape == (128, 128, 3) and out_mask is None
    np.testing.assert_allclose(five_points(out_lmk), template, atol=1e-3)
    np.testing.assert_allclose(m, m_true, atol=1e-9)


@pytest.fixture(scope="module")
def face_model():
    from dfmvr.facemodel.procedural import make_procedural_model

    return make_procedural_model(n_vertices=2000, seed=0)


def test_templates_per_yaw(face_model):
    tpl = AlignmentTemplate.from_face_model(face_model, (-45.0, 0.0, 45.0), 224)
    front, left, right = tpl.points(0.0), tpl.points(-45.0), tpl.points(45.0)
    # frontal: eyes level and mirror-symmetric about the image centre column
    assert abs(front[0, 1] - front[1, 1]) < 1.0
    assert abs((front[0, 0] + front[1, 0]) / 2 - 112.0) < 2.0
    assert front[0, 0] < front[2, 0] < front[1, 0]  # right eye, nose, left eye from image left to right
    # side views are mirror images of each other and have the nose on the turned side
    mirror = right.copy()
    mirror[:, 0] = 224.0 - mirror[:, 0]
    np.testing.assert_allclose(left[[1, 0, 2, 4, 3]], mirror, atol=0.5)
    eye_gap_front = front[1, 0] - front[0, 0]
    assert right[1, 0] - right[0, 0] < 0.85 * eye_gap_front  # foreshortened
    # the templates scale linearly with the output size
    np.testing.assert_allclose(AlignmentTemplate.from_face_model(face_model, (45.0,), 64).points(45.0),
                               right * 64 / 224, atol=1e-9)


def test_yaw_sign_check_on_projected_mean_face(face_model):
    from dfmvr.render.camera import Camera
    from dfmvr.data.align import project_mean_landmarks

    cam = Camera.at_size(224)
    for yaw in (-45.0, 45.0):
        lmk = project_mean_landmarks(face_model, yaw, cam)
        assert yaw_sign_check(lmk, yaw)
        assert not yaw_sign_check(lmk, -yaw)
