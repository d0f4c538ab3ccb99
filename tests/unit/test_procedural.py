"""The procedural face model: determinism, fields, scale, labels, landmarks, bases, expressions."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from dfmvr.facemodel import geometry
from dfmvr.facemodel.model import MM_PER_UNIT, N_PARSE_CLASSES
from dfmvr.facemodel.procedural import (
    expression_coefficients, expression_names, make_procedural_model,
)
from dfmvr.facemodel.regions import L_BROW, L_EYE, MOUTH, R_BROW, R_EYE, SKIN
from dfmvr.facemodel.surface import grid_shape_of_mesh, make_grid
from dfmvr.render.camera import Camera

N = 2500  # the tiny preset's size


@pytest.fixture(scope="module")
def model():
    return make_procedural_model(N, 0)


def _mm(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy() * MM_PER_UNIT


def test_same_seed_same_model_other_seed_other_bases():
    build = make_procedural_model.__wrapped__  # bypass the cache: really build twice
    a, b, c = build(1200, 3), build(1200, 3), build(1200, 4)
    for key in ("mean_shape", "id_base", "exp_base", "tex_base", "mean_tex", "tri", "keypoints", "region"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.name == f"procedural:seed=3:n={a.n_vertices}"
    assert not torch.allclose(a.id_base, c.id_base)
    assert not torch.allclose(a.exp_base, c.exp_base)
    assert not torch.allclose(a.tex_base, c.tex_base)
    assert a.name != c.name


def test_cached():
    assert make_procedural_model(N, 0) is make_procedural_model(N, 0)


@pytest.mark.parametrize("n", [200, 241, 777, 2500, 5000, 35709, 60000])
def test_vertex_count_roughly_honoured(n):
    grid = make_grid(n)
    assert abs(grid.n_vertices - n) <= 0.2 * n
    assert grid.tri.shape == (2 * (grid.n_rows - 1) * (grid.n_cols - 1), 3)
    # the grid can be recovered from the mesh sizes (expression_coefficients relies on it)
    assert grid_shape_of_mesh(grid.n_vertices, grid.tri.shape[0]) == (grid.n_rows, grid.n_cols)


def test_fields_and_sizes(model):
    n = model.n_vertices
    assert abs(n - N) <= 0.2 * N
    assert model.name == f"procedural:seed=0:n={n}"
    assert (model.id_base.shape, model.exp_base.shape, model.tex_base.shape) == ((3 * n, 80), (3 * n, 64), (3 * n, 80))
    lay = model.layout()
    assert (lay.n_id, lay.n_exp, lay.n_tex) == (80, 64, 80)
    assert model.point_buf.shape == (n, 8)
    assert model.keypoints.shape == (68,)
    assert torch.allclose(model.mean_shape.mean(0), torch.zeros(3), atol=1e-6)
    assert float(model.mean_tex.min()) >= 0.0 and float(model.mean_tex.max()) <= 1.0
    assert torch.equal(model.skinmask, model.region == SKIN)
    assert 90 <= model.lm3d_index.numel() <= 110
    assert set(model.keypoints.tolist()) <= set(model.lm3d_index.tolist())


def test_point_buf_lists_each_vertex_faces(model):
    f = model.n_faces
    for v in (0, model.n_vertices // 2, model.n_vertices - 1):
        faces = [int(i) for i in model.point_buf[v] if int(i) < f]
        assert faces and all(v in model.tri[i].tolist() for i in faces)


def test_basis_columns_all_move_and_identity_is_orthogonal(model):
    for base in (model.id_base, model.exp_base, model.tex_base):
        norms = base.norm(dim=0)
        assert bool((norms > 1e-4 * norms.max()).all())
        assert bool((norms[:-1] >= norms[1:] * 0.999).all())  # ordered by variance
    unit = model.id_base.double() / model.id_base.double().norm(dim=0)
    gram = unit.T @ unit
    assert float((gram - torch.eye(80, dtype=torch.float64)).abs().max()) < 1e-3


def test_real_world_scale(model):
    assert 55.0 <= model.interocular_mm() <= 70.0
    v = _mm(model.mean_shape)
    height = v[:, 1].max() - v[:, 1].min()
    width = v[:, 0].max() - v[:, 0].min()
    assert 180.0 <= height <= 210.0
    assert 130.0 <= width <= 155.0


def test_mean_face_fills_a_face_crop(model):
    px = Camera.at_size(224).project(model.mean_shape)
    fraction = float(px[:, 0].max() - px[:, 0].min()) / 224
    assert 0.6 <= fraction <= 0.8


def test_all_parsing_classes_on_the_mesh_left_is_plus_x(model):
    counts = torch.bincount(model.region, minlength=N_PARSE_CLASSES)
    assert counts[0] == 0
    assert bool((counts[1:] > 0).all())
    x = model.mean_shape[:, 0]
    for left, right in ((L_BROW, R_BROW), (L_EYE, R_EYE)):
        assert bool((x[model.region == left] > 0).all())
        assert bool((x[model.region == right] < 0).all())


def test_landmarks_follow_ibug_order(model):
    lm = _mm(model.mean_shape[model.keypoints])
    x, y, z = lm[:, 0], lm[:, 1], lm[:, 2]
    assert x[36] < x[39] < x[42] < x[45]  # right eye outer/inner, left eye inner/outer
    # jaw from -x round the chin to +x (the first points run almost straight down the side)
    assert np.all(np.diff(x[0:17]) > -1.0) and x[0] < x[4] < x[8] < x[12] < x[16]
    assert np.all(np.diff(y[0:9]) < 0) and np.all(np.diff(y[8:17]) > 0)
    assert abs(y[0] - y[36]) < 20.0 and abs(y[16] - y[45]) < 20.0  # the contour starts near eye level
    assert int(np.argmin(y)) == 8  # chin
    assert np.all(x[17:22] < 0) and np.all(x[22:27] > 0)
    assert np.all(np.diff(x[17:27]) > 0)
    assert int(np.argmax(z)) == 30  # nose tip sticks out furthest
    assert y[27] > y[28] > y[29] > y[30] > y[33]
    assert x[31] < x[32] < x[33] < x[34] < x[35]
    assert x[48] < x[51] < x[54] and x[60] < x[62] < x[64]
    assert y[51] > y[62] >= y[66] > y[57]
    for eye in (range(36, 42), range(42, 48)):
        e = list(eye)
        assert y[e[1]] > y[e[5]] and y[e[2]] > y[e[4]]  # upper lid above lower lid
    assert y[19] > y[37] and y[24] > y[44]  # brows above the eyes
    assert y[30] > y[51] and y[8] < y[57]


def test_labels_agree_with_the_landmark_polygons(model):
    # the labels come from the layout, the landmarks from its curves: BFM's landmark-polygon
    # labelling of the same mesh must find the same features in the same places
    from dfmvr.facemodel.regions import regions_from_landmarks

    derived = torch.from_numpy(regions_from_landmarks(model.mean_shape.numpy(), model.keypoints.numpy()))
    for cls in range(2, N_PARSE_CLASSES):
        a, b = model.region == cls, derived == cls
        assert float((a & b).sum()) / float((a | b).sum()) > 0.4, cls


def test_normals_point_to_the_viewer(model):
    normals = geometry.vertex_normals(model.mean_shape[None], model.tri)[0]
    assert float(normals[:, 2].mean()) > 0.5
    fn = geometry.face_normals(model.mean_shape[None], model.tri)[0]
    centre = model.mean_shape[model.tri].mean(1)
    front = (centre[:, 0].abs() < 0.3) & (centre[:, 1].abs() < 0.5)
    assert float((fn[front, 2] > 0).float().mean()) > 0.97


def test_random_faces_stay_plausible(model):
    gen = torch.Generator().manual_seed(0)
    for base in (model.id_base, model.exp_base):
        k = base.shape[1]
        single = 3.0 * base.view(-1, 3, k).norm(dim=1).max(0).values * MM_PER_UNIT
        assert float(single.max()) < 30.0  # one coefficient at +-3 moves no vertex 30 mm
        c = torch.randn(64, k, generator=gen)
        offsets = (c @ base.T).view(64, -1, 3).norm(dim=-1) * MM_PER_UNIT
        assert float(offsets.max()) < 40.0
        assert float(offsets.max(1).values.median()) < 20.0
    tex = geometry.compute_albedo(model, torch.randn(64, 80, generator=gen))
    assert float(((tex > -0.05) & (tex < 1.05)).float().mean()) > 0.99


def _class_area_mm2(shape: torch.Tensor, tri: torch.Tensor, region: torch.Tensor, cls: int) -> float:
    """Frontal (x, y) area of the triangles whose three vertices carry ``cls``."""
    t = tri[(region[tri] == cls).all(1)]
    p = shape[t][..., :2].double() * MM_PER_UNIT
    a, b = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return float(cross.abs().sum() / 2)


def _face(model, **expression: float) -> torch.Tensor:
    exp = expression_coefficients(model, **expression)[None] if expression else torch.zeros(1, 64)
    return geometry.compute_shape(model, torch.zeros(1, 80), exp)[0]


def test_opening_the_mouth_shows_the_inner_mouth(model):
    neutral, opened = _face(model), _face(model, jaw_open=1.0)
    lm_n, lm_o = _mm(neutral[model.keypoints]), _mm(opened[model.keypoints])
    assert lm_n[62, 1] - lm_n[66, 1] < 2.0  # lips closed on the neutral face
    assert lm_o[62, 1] - lm_o[66, 1] > 10.0  # and well apart when open
    assert lm_o[8, 1] < lm_n[8, 1] - 10.0  # the chin drops
    area_n = _class_area_mm2(neutral, model.tri, model.region, MOUTH)
    area_o = _class_area_mm2(opened, model.tri, model.region, MOUTH)
    assert area_n < 30.0 and area_o > 300.0
    # the cavity is recessed behind the lips
    inner = model.region == MOUTH
    lips_z = opened[(model.region == 8) | (model.region == 9), 2].max()
    assert float(opened[inner, 2].mean()) < float(lips_z) - 0.03


def test_expressions_close_eyes_and_move_brows(model):
    neutral = _face(model)
    closed = _face(model, eye_close_L=1.0, eye_close_R=1.0)
    for cls in (L_EYE, R_EYE):
        area = _class_area_mm2(neutral, model.tri, model.region, cls)
        assert _class_area_mm2(closed, model.tri, model.region, cls) < 0.2 * area
    raised = _face(model, brow_raise_inner=1.0)
    brows = (model.region == L_BROW) | (model.region == R_BROW)
    lift = (raised[brows, 1] - neutral[brows, 1]) * MM_PER_UNIT
    assert float(lift.max()) > 3.0 and float(lift.min()) > -0.1


def test_expression_coefficients_rejects_bad_input(model):
    assert "jaw_open" in expression_names()
    with pytest.raises(ValueError, match="unknown expression"):
        expression_coefficients(model, yawn=1.0)
    with pytest.raises(ValueError, match="procedural"):
        expression_coefficients(dataclasses.replace(model, name="bfm:BFM_model_front.mat"), jaw_open=1.0)


def test_too_small_is_rejected():
    with pytest.raises(ValueError, match="n_vertices"):
        make_procedural_model(50, 0)


def test_renders_as_a_face_with_an_open_mouth(model):
    from dfmvr.render import Renderer

    renderer = Renderer(Camera.at_size(64), backend="torch")
    zero = torch.zeros(1, 80)
    shapes = torch.cat([
        geometry.compute_shape(model, zero, torch.zeros(1, 64)),
        geometry.compute_shape(model, zero, expression_coefficients(model, jaw_open=1.0)[None]),
    ])
    out = renderer(shapes, model.tri, torch.ones_like(shapes), model.region)
    coverage = out.mask.mean(dim=(1, 2, 3))
    assert bool(((coverage > 0.3) & (coverage < 0.7)).all())
    mouth_px = (out.region == MOUTH).sum(dim=(1, 2))
    assert int(mouth_px[1]) > 4 * max(int(mouth_px[0]), 1)
    for cls in range(1, N_PARSE_CLASSES):
        assert bool((out.region[0] == cls).any()), cls
    nearest = float(out.depth[0][out.mask[0, 0] > 0].min())
    assert math.isclose(nearest, 10.0 - float(shapes[0, :, 2].max()), abs_tol=0.05)  # the nose tip
