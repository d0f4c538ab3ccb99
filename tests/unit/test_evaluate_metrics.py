"""Evaluation metrics: exact closest points, NoW error, point-to-plane RMSE, REALY regions.

References are independent: trimesh's point-triangle closest point (``trimesh.triangles``,
brute force over all triangles: ``trimesh.proximity`` needs rtree, which is not installed),
a plain-numpy Umeyama least-squares similarity (trimesh's and scipy's Procrustes scale both
point sets to unit size, a different estimator), and known answers (a mesh against itself, a similarity-moved copy, a copy
offset 1 mm along its normals).
"""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from dfmvr.evaluate import metrics as em
from dfmvr.evaluate.surface import MeshSurface, closest_points_on_triangles
from dfmvr.facemodel.procedural import make_procedural_model

MM = 100.0  # mm per face-model unit


def reference_closest(vertices: np.ndarray, faces: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest points and distances by trimesh, trying every triangle for every point."""
    tri = vertices[faces]
    out_q, out_d = np.empty_like(points), np.empty(len(points))
    for i, p in enumerate(points):
        q = trimesh.triangles.closest_point(tri, np.repeat(p[None], len(tri), axis=0))
        d = np.linalg.norm(q - p, axis=1)
        out_q[i], out_d[i] = q[d.argmin()], d.min()
    return out_q, out_d


@pytest.fixture(scope="module")
def face():
    m = make_procedural_model(2500, 0)
    return {
        "v": m.mean_shape.double().numpy(), "f": m.tri.numpy(), "kp": m.keypoints.numpy(), "model": m,
    }


@pytest.fixture(scope="module")
def other_face(face):
    """A different identity of the same model (a reconstruction with real shape errors)."""
    m = face["model"]
    coeff = np.random.default_rng(3).normal(0, 1.0, m.id_base.shape[1])
    return face["v"] + (m.id_base.double().numpy() @ coeff).reshape(-1, 3)


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``src`` moved by the least-squares similarity onto ``dst`` (Umeyama 1991, eqs. 38-42)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    sign = np.diag([1.0, 1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / (a ** 2).sum(1).mean()
    return scale * a @ rot.T + mu_d


def similarity(v: np.ndarray, angles_deg=(6.0, -14.0, 4.0), scale=1.08, trans=(0.12, -0.3, 0.05)) -> np.ndarray:
    rot = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    return scale * v @ rot.T + np.asarray(trans)


def lmk7(v: np.ndarray, kp: np.ndarray) -> np.ndarray:
    return v[kp[list(em.NOW_LANDMARKS_IBUG)]]


def grid_mesh(n: int, size: float) -> tuple[np.ndarray, np.ndarray]:
    """A flat ``n x n``-vertex square grid of side ``size`` in the z = 0 plane, centred."""
    xs = np.linspace(-size / 2, size / 2, n)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    v = np.stack([x.ravel(), y.ravel(), np.zeros(n * n)], axis=1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    return v, np.concatenate([np.stack([a, b, c], 1), np.stack([a, c, d], 1)])


def offset_along_normals(v: np.ndarray, f: np.ndarray, amount: float) -> np.ndarray:
    normals = trimesh.Trimesh(v, f, process=False).vertex_normals
    return v + amount * normals


# ----------------------------------------------------------------------------------------------
# closest points


def test_triangle_regions_match_trimesh():
    """Points around one triangle fall in every Voronoi region (3 corners, 3 edges, the face)."""
    rng = np.random.default_rng(0)
    a, b, c = np.array([0.0, 0, 0]), np.array([3.0, 0.5, 0.2]), np.array([0.8, 2.5, -0.4])
    p = rng.uniform(-3, 5, size=(4000, 3))
    tri = np.repeat(np.stack([a, b, c])[None], len(p), axis=0)
    ours = closest_points_on_triangles(p, tri[:, 0], tri[:, 1], tri[:, 2])
    np.testing.assert_allclose(ours, trimesh.triangles.closest_point(tri, p), atol=1e-9)


def test_degenerate_triangle_is_its_edges():
    p = np.array([[1.0, 1.0, 0.0], [-1.0, 0.2, 0.3], [5.0, -1.0, 0.0]])
    a, b, c = np.array([0.0, 0, 0]), np.array([2.0, 0, 0]), np.array([4.0, 0, 0])  # collinear
    n = len(p)
    q = closest_points_on_triangles(p, np.tile(a, (n, 1)), np.tile(b, (n, 1)), np.tile(c, (n, 1)))
    np.testing.assert_allclose(q, [[1.0, 0, 0], [0.0, 0, 0], [4.0, 0, 0]], atol=1e-12)


@pytest.mark.parametrize("mesh", ["icosphere", "face"])
def test_closest_points_match_trimesh(mesh, face):
    rng = np.random.default_rng(1)
    if mesh == "icosphere":
        ico = trimesh.creation.icosphere(subdivisions=2, radius=50.0)
        v, f = np.asarray(ico.vertices), np.asarray(ico.faces)
    else:
        v, f = face["v"] * MM, face["f"]
    near = v[rng.choice(len(v), 150)] + rng.normal(0, 2.0, (150, 3))
    far = rng.uniform(v.min(0) - 40, v.max(0) + 40, (50, 3))
    on = v[rng.choice(len(v), 20)]
    points = np.concatenate([near, far, on])
    surface = MeshSurface(v, f, k=8)
    hit = surface.closest(points)
    ref_q, ref_d = reference_closest(v, f, points)
    np.testing.assert_allclose(hit.distances, ref_d, atol=1e-6)
    np.testing.assert_allclose(hit.points, ref_q, atol=1e-6)
    # the reported face holds the reported point
    again = closest_points_on_triangles(points, *(v[f[hit.faces]][:, i] for i in range(3)))
    np.testing.assert_allclose(np.linalg.norm(again - points, axis=1), hit.distances, atol=1e-9)
    assert surface.n_retried > 0, "far points must have needed the wider query"


def test_closest_points_exact_with_one_huge_triangle():
    """A big triangle among small ones loosens the candidate bound; results stay exact."""
    gv, gf = grid_mesh(12, 20.0)
    v = np.concatenate([gv, [[-200.0, -200, 30], [200.0, -200, 30], [0.0, 250, 30]]])
    f = np.concatenate([gf, [[len(v) - 3, len(v) - 2, len(v) - 1]]])
    rng = np.random.default_rng(2)
    points = rng.uniform([-60, -60, -20], [60, 60, 45], (120, 3))
    hit = MeshSurface(v, f, k=4).closest(points)
    _, ref_d = reference_closest(v, f, points)
    np.testing.assert_allclose(hit.distances, ref_d, atol=1e-6)


def test_surface_rejects_bad_meshes():
    with pytest.raises(ValueError, match="F > 0"):
        MeshSurface(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="finite"):
        MeshSurface(np.array([[0, 0, 0], [1, 0, 0], [np.nan, 1, 0]]), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="index vertices"):
        MeshSurface(np.zeros((3, 3)), np.array([[0, 1, 3]]))


# ----------------------------------------------------------------------------------------------
# NoW


def test_now_crop_sphere_matches_hand_computation():
    lmk = np.array([
        [-45.0, 0, 0], [-15.0, 0, 0], [15.0, 0, 0], [45.0, 0, 0],  # eye corners R out, R in, L in, L out
        [0.0, -40, 10],  # nose bottom
        [-25.0, -60, 5], [25.0, -60, 5],  # mouth corners
    ])
    centre, radius = em.now_crop_sphere(lmk)
    # inner-eye midpoint (0, 0, 0): centre = (0,-40,10) + 0.3 * (0,40,-10); nose length sqrt(1700)
    np.testing.assert_allclose(centre, [0.0, -28.0, 7.0])
    assert radius == pytest.approx(1.4 * (90.0 + np.sqrt(1700.0)) / 2)
    direction = np.array([0.6, 0.0, 0.8])
    pts = centre + np.outer([0.0, radius - 1e-6, radius + 1e-6, 2 * radius], direction)
    assert em.now_crop(pts, lmk).tolist() == [True, True, False, False]


def test_now_landmark_indices_are_noWs_points(face):
    """Eye corners left to right in the image, nose bottom on the midline under the eyes, mouth corners."""
    p = lmk7(face["v"], face["kp"]) * MM
    assert list(np.argsort(p[:4, 0])) == [0, 1, 2, 3]  # image left to right: subject's right eye first
    assert abs(p[4, 0]) < 1.0 and p[4, 1] < p[:4, 1].min()
    assert p[5, 0] < 0 < p[6, 0] and p[5:, 1].max() < p[4, 1]


@pytest.mark.parametrize("moved", ["self", "pred_moved", "scan_moved"])
def test_now_error_is_zero_for_the_same_surface(face, moved):
    v, f, kp = face["v"], face["f"], face["kp"]
    pred = similarity(v) if moved == "pred_moved" else v
    scan = similarity(v, (-3.0, 20.0, -5.0), 0.93, (0.2, 0.1, -0.4)) if moved == "scan_moved" else v
    res = em.now_error(pred, f, lmk7(pred, kp), scan, f, lmk7(scan, kp), source="s")
    assert res.n_scan_points == int(em.now_crop(scan, lmk7(scan, kp)).sum()) > 1000
    assert res.distances_mm.shape == (res.n_scan_points,)
    assert res.mean_mm < 1e-6 and res.distances_mm.max() < 1e-5
    aligned = pred @ res.transform[:3, :3].T + res.transform[:3, 3]  # input units
    np.testing.assert_allclose(aligned, scan, atol=1e-8)


def test_now_icp_recovers_from_a_poor_landmark_start(face):
    v, f, kp = face["v"], face["f"], face["kp"]
    scan = similarity(v)
    rng = np.random.default_rng(4)
    noisy = lmk7(v, kp) + rng.normal(0, 0.03, (7, 3))  # 3 mm landmark noise
    start = em.now_error(v, f, noisy, scan, f, lmk7(scan, kp), icp_iters=0)
    res = em.now_error(v, f, noisy, scan, f, lmk7(scan, kp))
    assert start.mean_mm > 0.5
    assert res.mean_mm < 1e-4
    assert res.icp_iterations > 1


def test_now_offset_copy_is_one_mm_without_alignment(face):
    v, f, kp = face["v"], face["f"], face["kp"]
    pred = offset_along_normals(v * MM, f, 1.0) / MM
    # same landmarks on both sides: the Procrustes start is the identity; no ICP
    res = em.now_error(pred, f, lmk7(v, kp), v, f, lmk7(v, kp), icp=em.IcpConfig(max_iters=0))
    # each scan vertex is 1 mm under its own offset vertex, and no nearer point where the surface
    # is smooth at the 1 mm scale
    assert res.distances_mm.max() <= 1.0 + 1e-9
    assert np.median(res.distances_mm) > 0.98
    aligned = em.now_error(pred, f, lmk7(v, kp), v, f, lmk7(v, kp))
    # ICP may only lower the scan-to-mesh error from its start (it absorbs part of the offset in scale)
    assert np.mean(aligned.distances_mm ** 2) <= np.mean(res.distances_mm ** 2) + 1e-12


def test_now_offset_plane_is_exactly_one_mm():
    v, faces = grid_mesh(11, 100.0)
    scan = v / MM
    pred = scan + np.array([0.0, 0.0, 0.01])  # 1 mm along the plane's normal
    lmk = np.array([[-40.0, 20, 0], [-10, 20, 0], [10, 20, 0], [40, 20, 0], [0, -10, 0], [-20, -30, 0],
                    [20, -30, 0]]) / MM
    res = em.now_error(pred, faces, lmk, scan, faces, lmk, icp=em.IcpConfig(max_iters=0))
    np.testing.assert_allclose(res.distances_mm, 1.0, atol=1e-9)
    p2p = em.point_to_plane(pred, faces, scan, faces, scan_nose_tip=np.zeros(3), pred_nose_tip=np.zeros(3),
                            icp=em.IcpConfig(max_iters=0))
    np.testing.assert_allclose(p2p.distances_mm, 1.0, atol=1e-9)


def test_now_distances_match_an_independent_computation(face, other_face):
    v, f, kp = face["v"], face["f"], face["kp"]
    scan = similarity(v)
    res = em.now_error(other_face, f, lmk7(other_face, kp), scan, f, lmk7(scan, kp))
    assert 0.3 < res.mean_mm < 20
    aligned = (other_face @ res.transform[:3, :3].T + res.transform[:3, 3]) * MM
    cropped = scan[em.now_crop(scan, lmk7(scan, kp))] * MM
    pick = np.random.default_rng(5).choice(len(cropped), 60, replace=False)
    _, ref = reference_closest(aligned, f, cropped[pick])
    np.testing.assert_allclose(res.distances_mm[pick], ref, atol=1e-6)
    assert res.mean_mm == pytest.approx(res.distances_mm.mean())
    assert res.median_mm == pytest.approx(np.median(res.distances_mm))
    assert res.std_mm == pytest.approx(res.distances_mm.std())


def test_now_icp_ends_at_a_minimum(face, other_face):
    """No small similarity change of the result lowers the mean squared scan-to-mesh distance."""
    v, f, kp = face["v"], face["f"], face["kp"]
    scan = similarity(v)
    res = em.now_error(other_face, f, lmk7(other_face, kp), scan, f, lmk7(scan, kp),
                       icp=em.IcpConfig(max_iters=100, tol_mm=1e-7, max_points=0))
    cropped = scan[em.now_crop(scan, lmk7(scan, kp))] * MM
    base = em.Similarity(scale=float(np.cbrt(np.linalg.det(res.transform[:3, :3]))), trans=res.transform[:3, 3] * MM)
    base.rot = res.transform[:3, :3] / base.scale
    surface = MeshSurface(other_face * MM, f)

    def energy(tf: em.Similarity) -> float:
        return float(np.mean((surface.closest(tf.inverse_apply(cropped)).distances * tf.scale) ** 2))

    e0 = energy(base)
    assert e0 == pytest.approx(np.mean(res.distances_mm ** 2), rel=1e-9)
    centre = cropped.mean(0)
    for axis in range(3):
        for sign in (-1, 1):
            rot = Rotation.from_rotvec(sign * 2e-3 * np.eye(3)[axis]).as_matrix()
            turn = em.Similarity(rot=rot, trans=centre - rot @ centre)
            shift = em.Similarity(trans=sign * 0.05 * np.eye(3)[axis])
            for step in (turn, shift):
                assert energy(base.then(step)) >= e0 - 1e-9
    for s in (0.995, 1.005):
        grow = em.Similarity(scale=s, trans=centre - s * centre)
        assert energy(base.then(grow)) >= e0 - 1e-9


# ----------------------------------------------------------------------------------------------
# point-to-plane RMSE


@pytest.mark.parametrize("start", ["nose_tip", "landmarks"])
def test_p2p_is_zero_for_a_moved_copy(face, start):
    v, f, kp = face["v"], face["f"], face["kp"]
    pred = similarity(v)
    extra = {"scan_landmarks": lmk7(v, kp), "pred_landmarks": lmk7(pred, kp)} if start == "landmarks" else {}
    res = em.point_to_plane(pred, f, v, f, scan_nose_tip=v[kp[30]], pred_nose_tip=pred[kp[30]], **extra)
    assert res.n_scan_points == int((np.linalg.norm(v - v[kp[30]], axis=1) * MM <= 95.0).sum())
    assert res.rmse_mm < 1e-5
    assert em.p2p_rmse(v, f, v, f, scan_nose_tip=v[kp[30]], pred_nose_tip=v[kp[30]]) < 1e-9


def test_p2p_offset_copy_is_one_mm_without_alignment(face):
    v, f, kp = face["v"], face["f"], face["kp"]
    pred = offset_along_normals(v * MM, f, 1.0) / MM
    res = em.point_to_plane(pred, f, v, f, scan_nose_tip=v[kp[30]], pred_nose_tip=v[kp[30]],
                            icp=em.IcpConfig(max_iters=0))
    assert res.distances_mm.max() <= 1.0 + 1e-9
    assert np.median(res.distances_mm) > 0.98
    assert res.rmse_mm == pytest.approx(np.sqrt(np.mean(res.distances_mm ** 2)))


def test_p2p_distances_match_an_independent_computation(face, other_face):
    """Reference: trimesh's brute-force closest point, its barycentric coordinates and its
    (angle-weighted) vertex normals, interpolated; any face holding the closest point gives the
    same normal, so ties between faces sharing an edge or corner cannot change the answer."""
    v, f, kp = face["v"], face["f"], face["kp"]
    res = em.point_to_plane(other_face, f, v, f, scan_nose_tip=v[kp[30]], pred_nose_tip=other_face[kp[30]])
    aligned = (other_face @ res.transform[:3, :3].T + res.transform[:3, 3]) * MM
    cropped = v[np.linalg.norm(v - v[kp[30]], axis=1) * MM <= 95.0] * MM
    pick = np.random.default_rng(6).choice(len(cropped), 60, replace=False)
    q, d = reference_closest(aligned, f, cropped[pick])
    mesh = trimesh.Trimesh(aligned, f, process=False)
    tri = aligned[f]
    expected = []
    for p, qi, di in zip(cropped[pick], q, d):
        on = np.linalg.norm(trimesh.triangles.closest_point(tri, np.repeat(p[None], len(tri), 0)) - p, axis=1)
        holders = np.flatnonzero(on <= di + 1e-9)  # one face, or those sharing an edge or corner
        normals = []
        for j in holders:
            bary = trimesh.triangles.points_to_barycentric(tri[j][None], qi[None])[0]
            n = bary @ mesh.vertex_normals[f[j]]
            normals.append(n / np.linalg.norm(n))
        for n in normals[1:]:
            np.testing.assert_allclose(n, normals[0], atol=1e-6)
        expected.append(abs(np.dot(p - qi, normals[0])))
    np.testing.assert_allclose(res.distances_mm[pick], expected, atol=1e-6)
    assert (res.distances_mm[pick] <= d + 1e-9).all()  # never more than the scan-to-mesh distance
    assert 0.3 < res.rmse_mm < 20


def test_vertex_normals_and_barycentrics_match_trimesh(face):
    v, f = face["v"] * MM, face["f"]
    surface = MeshSurface(v, f)
    mesh = trimesh.Trimesh(v, f, process=False)
    np.testing.assert_allclose(surface.vertex_normals, mesh.vertex_normals, atol=1e-9)
    rng = np.random.default_rng(7)
    faces = rng.choice(len(f), 200)
    bary = rng.dirichlet(np.ones(3), 200)
    points = np.einsum("pk,pkj->pj", bary, v[f[faces]])
    np.testing.assert_allclose(surface.barycentric(points, faces), bary, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("problem, match", [
    ("nan_vertex", "NaN"), ("no_faces", "no faces"), ("coincident_landmarks", "degenerate"),
    ("collinear_landmarks", "degenerate"), ("nan_landmark", "NaN"), ("landmarks_off_scan", "crop keeps 0"),
])
def test_now_bad_scans_raise_scan_error_naming_the_source(face, problem, match):
    v, f, kp = face["v"], face["f"], face["kp"]
    scan, faces, lmk = v.copy(), f, lmk7(v, kp)
    if problem == "nan_vertex":
        scan[17] = np.nan
    elif problem == "no_faces":
        faces = np.zeros((0, 3), dtype=np.int64)
    elif problem == "coincident_landmarks":
        lmk = np.repeat(lmk[:1], 7, axis=0)
    elif problem == "collinear_landmarks":
        lmk = np.outer(np.linspace(0, 1, 7), [1.0, 0.5, 0.0])
    elif problem == "nan_landmark":
        lmk = lmk.copy()
        lmk[4, 1] = np.nan
    elif problem == "landmarks_off_scan":
        lmk = lmk + 50.0
    with pytest.raises(em.ScanError, match=match) as err:
        em.now_error(v, f, lmk7(v, kp), scan, faces, lmk, source="subject_07/scan.obj")
    assert "subject_07/scan.obj" in str(err.value)


def test_bad_predictions_and_nose_tips_raise_scan_error(face):
    v, f, kp = face["v"], face["f"], face["kp"]
    bad = v.copy()
    bad[3] = np.inf
    with pytest.raises(em.ScanError, match="sample-9: prediction has 1 of"):
        em.now_error(bad, f, lmk7(v, kp), v, f, lmk7(v, kp), source="sample-9")
    with pytest.raises(em.ScanError, match="sample-9: scan has no faces"):
        em.p2p_rmse(v, f, v, np.zeros((0, 3), np.int64), scan_nose_tip=v[kp[30]], pred_nose_tip=v[kp[30]],
                    source="sample-9")
    with pytest.raises(em.ScanError, match="sample-9: scan nose tip"):
        em.p2p_rmse(v, f, v, f, scan_nose_tip=np.array([np.nan, 0, 0]), pred_nose_tip=v[kp[30]], source="sample-9")
    with pytest.raises(em.ScanError, match="keeps 0"):
        em.p2p_rmse(v, f, v, f, scan_nose_tip=v[kp[30]] + 10.0, pred_nose_tip=v[kp[30]], source="sample-9")


def test_icp_config_rejects_bad_values():
    with pytest.raises(ValueError, match="trim_fraction"):
        em.IcpConfig(trim_fraction=1.0)
    with pytest.raises(ValueError, match="max_points"):
        em.IcpConfig(max_points=2)


def test_trimmed_icp_still_aligns_a_moved_copy(face):
    v, f, kp = face["v"], face["f"], face["kp"]
    pred = similarity(v)
    res = em.now_error(pred, f, lmk7(pred, kp), v, f, lmk7(v, kp), icp=em.IcpConfig(trim_fraction=0.2))
    assert res.mean_mm < 1e-6


# ----------------------------------------------------------------------------------------------
# REALY regions


def test_vertex_regions_sit_where_expected(face):
    m, v, kp = face["model"], face["v"] * MM, face["kp"]
    regions = em.vertex_regions(m)
    assert regions.shape == (m.n_vertices,)
    assert set(regions) == set(em.REGION_NAMES)
    mean_y = {r: v[regions == r, 1].mean() for r in em.REALY_REGIONS}
    eyes_y, corners_y = v[kp[36:48], 1].mean(), v[kp[[48, 54]], 1].mean()
    assert mean_y["forehead"] > v[kp[17:27], 1].max() > eyes_y > mean_y["cheeks"] > corners_y
    assert v[kp[33], 1] > mean_y["mouth"] > v[kp[8], 1]
    nose = v[regions == "nose"]
    assert abs(nose[:, 0].mean()) < 1.0 and nose[:, 2].mean() > v[regions == "cheeks", 2].mean()
    cheeks_x = v[regions == "cheeks", 0]
    assert abs((cheeks_x < 0).sum() - (cheeks_x > 0).sum()) < 0.05 * len(cheeks_x)
    assert (np.abs(cheeks_x) > np.abs(v[kp[39], 0]) - 1e-9).all()
    lips = np.isin(m.region.numpy(), (7, 8, 9))
    assert (regions[lips] == "mouth").all()
    assert (regions[m.region.numpy() == 6] == "nose").all()


def test_region_errors_known_answers(face):
    m, v = face["model"], face["v"]
    regions = em.vertex_regions(m)
    zero = em.region_errors(similarity(v), v, regions)
    assert list(zero) == list(em.REALY_REGIONS)
    assert max(zero.values()) < 1e-9
    # push the nose out by 1 mm: the nose error is about 1 mm, the others small; exact values
    # from a plain-numpy Umeyama similarity as the independent alignment
    pred = v.copy()
    pred[regions == "nose", 2] += 1.0 / MM
    errs = em.region_errors(similarity(pred), v, regions)
    aligned = umeyama(similarity(pred), v)
    dist = np.linalg.norm(aligned - v, axis=1) * MM
    for name in em.REALY_REGIONS:
        assert errs[name] == pytest.approx(dist[regions == name].mean(), abs=1e-9)
    assert 0.9 < errs["nose"] < 1.0 and max(errs["forehead"], errs["mouth"], errs["cheeks"]) < 0.1
    ids = np.array([em.REGION_NAMES.index(r) for r in regions])
    assert em.region_errors(similarity(pred), v, ids) == pytest.approx(errs)


def test_region_errors_reject_bad_input(face):
    m, v = face["model"], face["v"]
    regions = em.vertex_regions(m)
    bad = v.copy()
    bad[0, 0] = np.nan
    with pytest.raises(em.ScanError, match="sample-3: ground truth has 1 of"):
        em.region_errors(v, bad, regions, source="sample-3")
    with pytest.raises(ValueError, match="unknown region names"):
        em.region_errors(v, v, np.where(regions == "nose", "nostril", regions))
    with pytest.raises(ValueError, match="region 'nose' has no vertices"):
        em.region_errors(v, v, np.where(regions == "nose", "other", regions))
