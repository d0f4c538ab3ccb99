import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from dfmvr.facemodel import geometry
from dfmvr.render.camera import Camera


def test_rotation_is_rz_ry_rx():
    angles = torch.tensor([[0.3, -0.7, 1.1], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rot = geometry.rotation_matrix(angles)
    # extrinsic x, then y, then z == Rz @ Ry @ Rx
    ref = Rotation.from_euler("xyz", angles[0].numpy()).as_matrix()
    np.testing.assert_allclose(rot[0].numpy(), ref, atol=1e-12)
    assert torch.allclose(rot[1], torch.eye(3, dtype=torch.float64))


def test_positive_yaw_turns_the_nose_to_image_right():
    nose = torch.tensor([[[0.0, 0.0, 1.0]]])
    posed = geometry.rigid_transform(nose, torch.tensor([[0.0, math.radians(45), 0.0]]), torch.zeros(1, 3))
    assert posed[0, 0, 0] > 0.7
    px = Camera.at_size(224).project(posed)
    assert px[0, 0, 0] > 112


def test_vertex_normals_of_a_sphere_point_outwards():
    # icosphere-ish: a UV sphere grid
    n = 24
    th, ph = torch.meshgrid(torch.linspace(0.1, math.pi - 0.1, n), torch.linspace(0, 2 * math.pi, n + 1)[:-1], indexing="ij")
    v = torch.stack([th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()], -1).reshape(-1, 3)
    tri = []
    for i in range(n - 1):
        for j in range(n):
            a, b = i * n + j, i * n + (j + 1) % n
            c, d = a + n, b + n
            tri += [(a, c, b), (b, c, d)]
    tri = torch.tensor(tri)
    normals = geometry.vertex_normals(v[None], tri)[0]
    assert (normals * v).sum(-1).min() > 0.95


def test_shading_with_zero_gamma_is_ambient_dc():
    albedo = torch.rand(2, 5, 3)
    normals = torch.nn.functional.normalize(torch.randn(2, 5, 3), dim=-1)
    out = geometry.sh_shading(albedo, normals, torch.zeros(2, 27))
    ambient = 0.8 * math.pi / math.sqrt(4 * math.pi)
    assert torch.allclose(out, albedo * ambient, atol=1e-6)


def test_shading_matches_independent_sh_formula():
    rng = np.random.default_rng(1)
    n = rng.normal(size=(7, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    gamma = rng.normal(size=27) * 0.2
    albedo = rng.uniform(size=(7, 3))
    x, y, z = n.T
    # Ramamoorthi & Hanrahan irradiance constants, written out independently
    c0, c1, c2 = 1 / math.sqrt(4 * math.pi), math.sqrt(3 / (4 * math.pi)), 3 * math.sqrt(5 / (12 * math.pi))
    a0, a1, a2 = math.pi, 2 * math.pi / math.sqrt(3), 2 * math.pi / math.sqrt(8)
    basis = np.stack([np.full_like(x, a0 * c0), -a1 * c1 * y, a1 * c1 * z, -a1 * c1 * x, a2 * c2 * x * y,
                      -a2 * c2 * y * z, 0.5 * a2 * c2 / math.sqrt(3) * (3 * z**2 - 1), -a2 * c2 * x * z,
                      0.5 * a2 * c2 * (x**2 - y**2)], 1)
    g = gamma.reshape(3, 9).copy()
    g[:, 0] += 0.8
    expect = albedo * (basis @ g.T)
    got = geometry.sh_shading(torch.tensor(albedo)[None], torch.tensor(n)[None], torch.tensor(gamma)[None])
    np.testing.assert_allclose(got[0].numpy(), expect, rtol=1e-10)


def test_shape_formation_is_linear_and_checks_sizes():
    from tests.unit.test_bfm import _write_mat  # reuse the synthetic BFM writer
    import tempfile
    from pathlib import Path
    from dfmvr.facemodel import load_bfm

    with tempfile.TemporaryDirectory() as d:
        _write_mat(Path(d) / "m.mat")
        model = load_bfm(Path(d) / "m.mat")
    a, b = torch.randn(1, 80), torch.randn(1, 80)
    e = torch.zeros(1, 64)
    s = lambda i: geometry.compute_shape(model, i, e)  # noqa: E731
    assert torch.allclose(s(a + b) - s(b), s(a) - s(torch.zeros(1, 80)), atol=1e-5)
    assert torch.allclose(s(torch.zeros(1, 80))[0], model.mean_shape)
    with pytest.raises(ValueError, match=r"identity coefficients must have shape \(B, 80\); got \(1, 79\)"):
        geometry.compute_shape(model, torch.zeros(1, 79), e)
    with pytest.raises(ValueError, match="texture"):
        geometry.compute_albedo(model, torch.zeros(3))


def test_camera_scales_with_image_size_and_projects_y_down():
    cam = Camera.at_size(64)
    assert cam.focal == pytest.approx(1015 * 64 / 224) and cam.center == pytest.approx(32.0)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.1, 0.0]])
    px = cam.project(pts)
    assert px[0].tolist() == [32.0, 32.0]
    assert px[1, 0] == pytest.approx(32 + cam.focal * 0.1 / 10)
    assert px[2, 1] < 32  # y up in the world is up in the image (smaller row)
    assert cam.depth(pts)[0] == 10.0
