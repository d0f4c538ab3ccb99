import dataclasses
import math

import numpy as np
import pytest
import torch

from dfmvr.config import RenderConfig
from dfmvr.facemodel import geometry
from dfmvr.facemodel.procedural import make_procedural_model
from dfmvr.facemodel.regions import L_EYE, NOSE, R_EYE
from dfmvr.render import Camera, Renderer, create_renderer, pytorch3d_backend, resolve_backend
from dfmvr.render.rasterize import rasterize

YAWS = (-45.0, 0.0, 45.0)


def face_like_mesh(n: int = 40) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The front of an ellipsoid (head-sized, decimetres) with a nose bump.

    Returns vertices [N, 3], faces [F, 3], per-vertex labels [N] (1 skin, 6 nose, 4/5 "eyes"
    on the upper cheeks) and the nose-tip vertex index.
    """
    t = torch.linspace(-75, 75, n, dtype=torch.float64) * math.pi / 180
    ph, th = torch.meshgrid(t, t, indexing="ij")  # latitude (rows), longitude (cols)
    nose = 0.25 * torch.exp(-(th.square() + ph.square()) / 0.04)
    v = torch.stack([0.78 * ph.cos() * th.sin(), 1.0 * ph.sin(), 0.65 * ph.cos() * th.cos() + nose], -1)
    v = v.reshape(-1, 3).float()
    idx = torch.arange(n * n).view(n, n)
    q0, q1, q2, q3 = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    tri = torch.cat([torch.stack([q0, q2, q1], -1).view(-1, 3), torch.stack([q0, q3, q2], -1).view(-1, 3)])
    labels = torch.ones(n * n, dtype=torch.int64)
    labels[(nose > 0.08).view(-1)] = 6
    eye = ((ph - 0.35).square() + (th.abs() - 0.45).square() < 0.02).view(-1)
    labels[eye & (th > 0).view(-1)] = 4
    labels[eye & (th < 0).view(-1)] = 5
    tip = int(nose.view(-1).argmax())
    return v, tri, labels, tip


def posed_views(v: torch.Tensor, yaws=YAWS) -> torch.Tensor:
    angles = torch.tensor([[0.0, math.radians(y), 0.0] for y in yaws], dtype=v.dtype)
    return geometry.rigid_transform(v.expand(len(yaws), -1, -1), angles, torch.zeros(len(yaws), 3, dtype=v.dtype))


def smooth_colors(v: torch.Tensor) -> torch.Tensor:
    """Colours that vary smoothly over the surface, in [0.1, 0.9]."""
    return 0.5 + 0.4 * torch.stack([(3 * v[..., 0]).sin(), (2 * v[..., 1]).cos(), (4 * v[..., 2]).sin()], -1)


def boundary(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of a [B, 1, H, W] 0/1 mask that touch a pixel with the other value (8-neighbourhood)."""
    grow = torch.nn.functional.max_pool2d(mask, 3, stride=1, padding=1)
    shrink = -torch.nn.functional.max_pool2d(-mask, 3, stride=1, padding=1)
    return (grow != shrink)[:, 0]


# ---------------------------------------------------------------- both backends agree


@pytest.fixture(scope="module")
def face_model():
    return make_procedural_model(n_vertices=4000)


@pytest.mark.pytorch3d
def test_backends_agree_on_a_face(face_model):
    pytest.importorskip("pytorch3d.renderer")
    v, tri, labels = face_model.mean_shape, face_model.tri, face_model.region
    verts = posed_views(v)
    # a fourth face pushed back so that part of it lies beyond zfar: those faces are dropped
    far = v.unsqueeze(0) + torch.tensor([0.0, 0.0, -4.6])
    verts = torch.cat([verts, far])
    colors = face_model.mean_tex.view(1, -1, 3).expand(4, -1, -1)
    cam = Camera.at_size(64)
    outs = {}
    for backend in ("torch", "pytorch3d"):
        vv, cc = verts.clone().requires_grad_(), colors.clone().requires_grad_()
        out = Renderer(cam, backend=backend)(vv, tri, cc, labels)
        weights = torch.linspace(0.5, 1.5, 64 * 64).view(1, 1, 64, 64)
        (out.image * weights).square().sum().backward()
        outs[backend] = out, vv.grad, cc.grad
    (a, a_gv, a_gc), (b, b_gv, b_gc) = outs["torch"], outs["pytorch3d"]
    assert a.mask[:3].sum() > 3000
    assert 0 < a.mask[3].sum() < 0.9 * a.mask[1].sum()  # the far face is partly clipped, not gone

    differ = (a.mask != b.mask)[:, 0]
    edges = boundary(a.mask) | boundary(b.mask)
    assert not (differ & ~edges).any(), "coverage differs away from silhouette edges"
    assert differ.sum() <= 0.005 * a.mask.sum()

    both = (a.mask * b.mask)[:, 0].bool()
    colour_err = (a.image - b.image).abs().amax(1)[both]
    assert (colour_err > 1 / 255).float().mean() < 0.01
    assert colour_err.median() < 1e-6  # same (perspective-correct) interpolation, not just close
    inner = both & ~edges
    assert torch.allclose(a.depth[inner], b.depth[inner], atol=1e-4)
    assert ((a.region != b.region) & inner).float().sum() <= 0.01 * inner.sum()
    assert len(a.region[inner].unique()) >= 8  # skin and most feature classes are in view
    assert (a.depth[~a.mask[:, 0].bool()] == 0).all() and (b.depth[~b.mask[:, 0].bool()] == 0).all()

    # photometric-loss gradients: the same up to the odd edge pixel
    assert (a_gc - b_gc).norm() < 1e-3 * b_gc.norm()
    assert (a_gv - b_gv).norm() < 1e-2 * b_gv.norm()


@pytest.mark.pytorch3d
def test_pytorch3d_camera_matches_ours():
    pytest.importorskip("pytorch3d.renderer")
    cam = Camera.at_size(96)
    points = torch.tensor([[[0.3, 0.2, 0.5], [-0.4, -0.1, -1.0], [0.0, 0.0, 0.0]]])
    p3d = pytorch3d_backend.cameras(cam, 1, torch.device("cpu"))
    screen = p3d.transform_points_screen(points)
    assert torch.allclose(screen[..., :2], cam.project(points), atol=1e-4)
    view = p3d.get_world_to_view_transform().transform_points(points)
    assert torch.allclose(view[..., 2], cam.depth(points), atol=1e-5)


# ---------------------------------------------------------------- torch backend


def small_scene(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two tilted triangles, one partly occluding the other; 1 mesh, 6 vertices."""
    verts = torch.tensor([[
        [-1.1, -0.9, 0.0], [1.2, -1.0, 0.6], [-0.1, 1.1, -0.5],  # back triangle, tilted in depth
        [-0.3, -0.5, 1.0], [0.9, 0.2, 1.4], [0.1, 0.7, 0.9],  # front triangle
    ]], dtype=dtype)
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]])
    colors = torch.tensor([[[1.0, 0.0, 0.2], [0.0, 1.0, 0.5], [0.3, 0.2, 1.0],
                            [0.9, 0.9, 0.1], [0.1, 0.6, 0.8], [0.5, 0.1, 0.4]]], dtype=dtype)
    return verts, tri, colors


def test_gradcheck_torch_backend_float64():
    verts, tri, colors = small_scene()
    cam = Camera.at_size(12)
    renderer = Renderer(cam, backend="torch")
    # precondition: no pixel changes face when any coordinate moves by 1e-4 (gradcheck moves 1e-6)
    base = rasterize(cam.to_screen(verts), tri, 12, znear=cam.znear, zfar=cam.zfar).pix_to_face
    assert (base == 1).sum() > 4 and (base == 0).sum() > 4
    for i in range(verts.numel()):
        for step in (1e-4, -1e-4):
            moved = verts.clone().view(-1)
            moved[i] += step
            moved_p2f = rasterize(cam.to_screen(moved.view_as(verts)), tri, 12, znear=cam.znear,
                                  zfar=cam.zfar).pix_to_face
            assert torch.equal(moved_p2f, base), "scene too close to an edge for a gradient check"

    def render(v, c):
        out = renderer(v, tri, c)
        return out.image, out.depth

    assert torch.autograd.gradcheck(render, (verts.requires_grad_(), colors.requires_grad_()),
                                    eps=1e-6, atol=1e-6)


def test_perspective_correct_interpolation_and_depth():
    """Colour = depth of the surface point: interpolation must reproduce it at every pixel."""
    verts, tri, _ = small_scene(torch.float64)
    cam = Camera.at_size(48)
    colors = cam.depth(verts).unsqueeze(-1).expand(-1, -1, 3).contiguous()
    out = Renderer(cam, backend="torch")(verts, tri, colors)
    covered = out.mask[0, 0].bool()
    assert covered.sum() > 200
    # colour is linear in 3D, so perspective-correct interpolation of it equals the true depth
    assert torch.allclose(out.image[0, 0][covered], out.depth[0][covered], atol=1e-9)
    # the depth of the point seen through each pixel centre: intersect the ray with the plane
    p2f = rasterize(cam.to_screen(verts), tri, 48, znear=cam.znear, zfar=cam.zfar).pix_to_face[0]
    rows, cols = covered.nonzero(as_tuple=True)
    ray = torch.stack([(cols + 0.5 - cam.center) / cam.focal, -(rows + 0.5 - cam.center) / cam.focal,
                       -torch.ones_like(cols, dtype=torch.float64)], -1)  # direction with unit depth
    a, b, c = (verts[0, tri[p2f[rows, cols], k]] for k in range(3))
    normal = torch.cross(b - a, c - a, dim=-1)
    eye = torch.tensor([0.0, 0.0, cam.distance], dtype=torch.float64)
    t = ((a - eye) * normal).sum(-1) / (ray * normal).sum(-1)
    assert torch.allclose(out.depth[0][rows, cols], t, atol=1e-9)


@pytest.mark.parametrize("yaw", YAWS)
def test_face_lands_where_its_landmarks_project(face_model, yaw):
    verts = posed_views(face_model.mean_shape, yaws=(yaw,))
    colors = face_model.mean_tex.view(1, -1, 3)
    cam = Camera.at_size(128)
    out = Renderer(cam, backend="torch")(verts, face_model.tri, colors, face_model.region)
    assert torch.allclose(out.vertices_2d, cam.project(verts))
    lm = out.vertices_2d[0, face_model.keypoints]  # [68, 2]
    j, i = lm.floor().long().clamp(0, 127).unbind(-1)
    on_face = out.mask[0, 0, i, j].bool()
    # at +-45 degrees the far brow, eye and jaw points sit on the silhouette and may fall just
    # outside it; the nose and the near-side features never do
    assert on_face.float().mean() >= 0.9
    near_side = {-45.0: [*range(22, 27), *range(42, 48)], 0.0: range(17, 68),
                 45.0: [*range(17, 22), *range(36, 42)]}[yaw]
    assert on_face[list(range(27, 36))].all() and on_face[list(near_side)].all()

    tip = face_model.keypoints[30]  # iBUG 30: nose tip
    ti, tj = i[30], j[30]
    assert out.region[0, ti, tj] == NOSE
    assert abs(out.depth[0, ti, tj] - cam.depth(verts[0, tip])) < 0.03  # within a pixel's slope
    # eye centres: iBUG 36-41 is the subject's right eye, 42-47 the left; a turned-away eye
    # is foreshortened, so only the eyes facing the camera are checked
    for label, ring in ((R_EYE, slice(36, 42)), (L_EYE, slice(42, 48))):
        if (label == L_EYE and yaw > 0) or (label == R_EYE and yaw < 0):
            continue
        ej, ei = lm[ring].mean(0).floor().long()
        assert out.region[0, ei, ej] == label, (yaw, label)
    # every rendered depth is a real surface depth
    depth = cam.depth(verts[0])
    covered = out.mask[0, 0].bool()
    assert out.depth[0][covered].min() >= depth.min() - 1e-5
    assert out.depth[0][covered].max() <= depth.max() + 1e-5


def test_occluded_points_are_behind_the_visible_surface():
    v, tri, _, tip = face_like_mesh(60)
    verts = posed_views(v, yaws=(60.0,))
    cam = Camera.at_size(128)
    out = Renderer(cam, backend="torch")(verts, tri, smooth_colors(verts))
    depth = cam.depth(verts[0])
    px = cam.project(verts[0]).floor().long().clamp(0, 127)
    rendered = out.depth[0, px[:, 1], px[:, 0]]
    hidden = rendered < depth - 0.05  # something nearer covers these vertices
    assert hidden.sum() > 50  # at 60 degrees the nose hides part of the far cheek
    assert not hidden[tip]


def test_large_triangles_render_exactly():
    cam = Camera.at_size(128)
    # a rotated quad (two triangles) covering most of the image, at depth 10 (z = 0)
    corners_px = torch.tensor([[8.3, 30.7], [97.2, 3.9], [121.6, 99.1], [25.1, 124.4]], dtype=torch.float64)
    xy = (corners_px - cam.center) / cam.focal * cam.distance
    verts = torch.stack([xy[:, 0], -xy[:, 1], torch.zeros(4, dtype=torch.float64)], -1).unsqueeze(0).float()
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    colors = torch.full((1, 4, 3), 0.25)
    out = Renderer(cam, backend="torch")(verts, tri, colors)

    # analytic: pixel centres inside the convex quad (all edge cross products of one sign)
    jj, ii = torch.meshgrid(torch.arange(128.0) + 0.5, torch.arange(128.0) + 0.5, indexing="xy")
    centres = torch.stack([jj, ii], -1).double()
    signs = []
    for k in range(4):
        a, b = corners_px[k], corners_px[(k + 1) % 4]
        signs.append((b[0] - a[0]) * (centres[..., 1] - a[1]) - (b[1] - a[1]) * (centres[..., 0] - a[0]))
    signs = torch.stack(signs)
    inside = (signs > 0).all(0) | (signs < 0).all(0)
    near_edge = torch.zeros_like(inside)
    for k in range(4):
        a, b = corners_px[k], corners_px[(k + 1) % 4]
        near_edge |= signs[k].abs() / (b - a).norm() < 1e-3
    mask = out.mask[0, 0].bool()
    assert torch.equal(mask[~near_edge], inside[~near_edge])
    shoelace = 0.5 * abs(sum(corners_px[k, 0] * corners_px[(k + 1) % 4, 1] - corners_px[(k + 1) % 4, 0]
                             * corners_px[k, 1] for k in range(4)))
    perimeter = sum((corners_px[(k + 1) % 4] - corners_px[k]).norm() for k in range(4))
    assert abs(mask.sum() - shoelace) < perimeter  # 9,000 pixels, within the edge pixels
    assert torch.allclose(out.image[0][:, mask], torch.tensor(0.25))
    assert torch.allclose(out.depth[0][mask], torch.tensor(cam.distance))


def test_chunking_and_tiling_do_not_change_the_result():
    v, tri, _, _ = face_like_mesh(30)
    verts = posed_views(v)
    # plus two big triangles in front, so tiles of large boxes are exercised too
    big = torch.tensor([[[-0.6, -0.6, 1.2], [0.6, -0.5, 1.0], [0.0, 0.7, 1.1]]]).expand(3, -1, -1)
    verts = torch.cat([verts, big], 1)
    big_face = tri.shape[0]
    tri = torch.cat([tri, torch.tensor([[900, 901, 902]])])
    cam = Camera.at_size(80)
    screen = cam.to_screen(verts)
    ref = rasterize(screen, tri, 80, znear=cam.znear, zfar=cam.zfar)
    assert (ref.pix_to_face == big_face).sum() > 200
    for tile, budget in ((1, 1 << 20), (3, 50), (16, 7)):
        other = rasterize(screen, tri, 80, znear=cam.znear, zfar=cam.zfar, tile=tile, max_candidates=budget)
        assert torch.equal(other.pix_to_face, ref.pix_to_face), (tile, budget)


def test_faces_outside_the_clipping_range_are_dropped():
    verts, tri, colors = small_scene(torch.float32)
    cam = Camera.at_size(32)
    full = Renderer(cam, backend="torch")(verts, tri, colors)
    moved = verts.clone()
    moved[0, 3:, 2] = cam.distance - cam.znear + 0.5  # front triangle now nearer than znear
    clipped = Renderer(cam, backend="torch")(moved, tri, colors)
    assert full.mask.sum() > clipped.mask.sum() > 0
    only_back = Renderer(cam, backend="torch")(verts[:, :3], tri[:1], colors[:, :3])
    assert torch.equal(clipped.mask, only_back.mask)
    assert torch.allclose(clipped.image, only_back.image)


def test_batch_renders_each_mesh_independently():
    v, tri, labels, _ = face_like_mesh(30)
    verts = posed_views(v)
    colors = smooth_colors(verts)
    renderer = Renderer(Camera.at_size(48), backend="torch")
    together = renderer(verts, tri, colors, labels)
    for b in range(3):
        alone = renderer(verts[b:b + 1], tri, colors[b:b + 1], labels)
        assert torch.equal(together.mask[b], alone.mask[0])
        assert torch.allclose(together.image[b], alone.image[0])
        assert torch.equal(together.region[b], alone.region[0])
    assert together.image.shape == (3, 3, 48, 48) and together.image.is_contiguous()
    assert together.region.dtype == torch.int64 and together.depth.shape == (3, 48, 48)


def test_photometric_gradients_reach_3dmm_coefficients(face_model):
    """Loss -> image -> vertices / colours -> identity, expression and texture coefficients."""
    f64 = {name: getattr(face_model, name).double() for name in ("mean_shape", "id_base", "exp_base",
                                                                  "mean_tex", "tex_base")}
    model = dataclasses.replace(face_model, **f64)
    renderer = Renderer(Camera.at_size(48), backend="torch")
    angles = torch.tensor([[0.0, math.radians(20.0), 0.0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 48, 48, generator=gen, dtype=torch.float64)

    def loss(id_c, exp_c, tex_c):
        verts = geometry.rigid_transform(geometry.compute_shape(model, id_c, exp_c), angles,
                                         torch.zeros(1, 3, dtype=torch.float64))
        out = renderer(verts, model.tri, geometry.compute_albedo(model, tex_c))
        return ((out.image - target) * out.mask).square().sum()

    coeffs = [(0.3 * torch.randn(1, k, generator=gen, dtype=torch.float64)).requires_grad_() for k in (80, 64, 80)]
    loss(*coeffs).backward()
    for c in coeffs:
        assert c.grad.abs().max() > 0
        for k in (0, 1, 7):  # a few directions against central differences
            step = torch.zeros_like(c)
            step[0, k] = 1e-6
            with torch.no_grad():
                moved = [x + step if x is c else x for x in coeffs]
                back = [x - step if x is c else x for x in coeffs]
                fd = (loss(*moved) - loss(*back)) / 2e-6
            assert abs(fd - c.grad[0, k]) < 1e-4 * c.grad.abs().max() + 1e-6, (c.shape, k)


# ---------------------------------------------------------------- API, selection, errors


def test_create_renderer_from_config():
    renderer = create_renderer(RenderConfig(backend="torch", image_size=32))
    assert renderer.backend == "torch" and renderer.camera.image_size == 32
    assert renderer.camera.focal == pytest.approx(1015 * 32 / 224)


@pytest.mark.parametrize("args, expected", [
    (dict(vertices=torch.zeros(4, 3)), "vertices must have shape (B, N, 3); got (4, 3)"),
    (dict(vertices=torch.zeros(1, 4, 2)), "vertices must have shape (B, N, 3); got (1, 4, 2)"),
    (dict(tri=torch.zeros(2, 4, dtype=torch.int64)), "tri must have shape (F, 3); got (2, 4)"),
    (dict(tri=torch.zeros(2, 3)), "tri must be an int64"),
    (dict(tri=torch.tensor([[0, 1, 4]])), "tri indices must lie in [0, 3]"),
    (dict(colors=torch.zeros(1, 3, 3)), "colors must have shape (B, N, 3) = (1, 4, 3)"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), "labels must have shape (N,) = (4,)"),
    (dict(labels=torch.zeros(4)), "labels must be an integer tensor"),
])
def test_bad_inputs_name_the_expected_shape(args, expected):
    inputs = dict(vertices=torch.zeros(1, 4, 3), tri=torch.tensor([[0, 1, 2], [0, 2, 3]]),
                  colors=torch.zeros(1, 4, 3), labels=None)
    inputs.update(args)
    with pytest.raises((ValueError, TypeError)) as err:
        Renderer(Camera.at_size(16), backend="torch")(**inputs)
    assert expected in str(err.value)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="'auto', 'torch', 'pytorch3d'"):
        Renderer(Camera.at_size(16), backend="opengl")


def test_missing_pytorch3d_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(pytorch3d_backend, "_MODULE", "dfmvr_no_such_module_pytorch3d")
    with pytest.raises(ImportError, match=r'pip install "dfmvr\[pytorch3d\]"') as err:
        Renderer(Camera.at_size(16), backend="pytorch3d")
    assert "torch==2.12.1" in str(err.value)
    # auto quietly falls back to the pure-PyTorch rasteriser, even on CUDA
    assert resolve_backend("auto", "cuda") == "torch"
    assert Renderer(Camera.at_size(16), backend="auto", device="cuda").backend == "torch"


@pytest.mark.pytorch3d
def test_auto_picks_pytorch3d_only_on_cuda():
    pytest.importorskip("pytorch3d.renderer")
    assert resolve_backend("auto", "cuda") == "pytorch3d"
    assert resolve_backend("auto", "cpu") == "torch"
    assert Renderer(Camera.at_size(16), backend="auto", device="cpu").backend == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_cpu():
    v, tri, labels, _ = face_like_mesh(40)
    verts = posed_views(v)
    colors = smooth_colors(verts)
    renderer = Renderer(Camera.at_size(64), backend="torch")
    cpu = renderer(verts, tri, colors, labels)
    gpu = renderer(verts.cuda(), tri.cuda(), colors.cuda(), labels.cuda())
    assert (cpu.mask != gpu.mask.cpu()).sum() <= 3
    assert torch.allclose(cpu.image, gpu.image.cpu(), atol=1e-3)


def test_constant_colour_renders_constant_in_float32():
    v, tri, _, _ = face_like_mesh(20)
    out = Renderer(Camera.at_size(32), backend="torch")(v[None], tri, torch.ones(1, v.shape[0], 3))
    assert out.image.dtype == torch.float32 and out.mask.dtype == torch.float32
    assert np.isclose(out.image[0, 0][out.mask[0, 0].bool()].numpy(), 1.0).all()
