"""5-point similarity alignment of face images to the model's input crop.

Each view is warped by a similarity (rotation, uniform scale, translation) that maps its five
alignment points (eye centres, nose tip, mouth corners, taken from the iBUG-68 landmarks) onto
a template of the same five points at the output size, as Deep3DFaceRecon does. The template
is not a hand-picked constant: it is where the face model's mean face lands when it is posed at
the view's nominal yaw with zero translation and projected by the shared camera
(:class:`dfmvr.render.camera.Camera`). That is exactly where the synthetic generator puts its
faces (up to the pose jitter), so real and synthetic crops share one framing, and the network's
pose head sees real side views where it expects side views. A frontal template for a 45 degree
view would be wrong: the far eye and the nose tip move towards each other in projection, and
forcing them apart to frontal spacing would shear the crop's scale and centre.

Coordinates are pixels, x right, y down, pixel ``(i, j)`` centred at ``(j + 0.5, i + 0.5)``
(the renderer's convention); the warp helpers account for OpenCV's integer-centred pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from dfmvr.facemodel.geometry import rigid_transform
from dfmvr.facemodel.model import FaceModel
from dfmvr.render.camera import Camera

FIVE_POINT_NAMES = ("right_eye", "left_eye", "nose_tip", "mouth_right", "mouth_left")
"""The five alignment points, in order; left/right are the subject's own (iBUG 36-41 is the
subject's right eye, which is image-left in a frontal view)."""

CORNER_POINT_NAMES = ("left_eye_outer", "left_eye_inner", "right_eye_outer", "right_eye_inner", "nose_base")
"""dlib's 5-point scheme (its ``shape_predictor_5_face_landmarks``), in dlib's order: the eye
corners and the base of the nose, subject's left eye first (image right in a frontal view)."""

CORNER_POINT_IBUG = (45, 42, 36, 39, 33)
"""The iBUG-68 landmark at each of :data:`CORNER_POINT_NAMES` (dlib trained its 5-point model on
these positions; on a real photo the two agree within 2% of the face box, see
tests/integration/test_detect.py)."""

_RIGHT_EYE = slice(36, 42)
_LEFT_EYE = slice(42, 48)
_NOSE_TIP = 30
_MOUTH_RIGHT = 48
_MOUTH_LEFT = 54


def five_points(lmk68: np.ndarray) -> np.ndarray:
    """The five alignment points from iBUG-68 landmarks.

    Args:
        lmk68: ``[68, D]`` landmarks (D = 2 for pixels, 3 for model-frame points).

    Returns:
        ``[5, D]`` float64: right-eye centre (mean of 36-41), left-eye centre (mean of 42-47),
        nose tip (30), mouth corners (48, 54).
    """
    lmk68 = np.asarray(lmk68, dtype=np.float64)
    if lmk68.ndim != 2 or lmk68.shape[0] != 68:
        raise ValueError(f"landmarks must have shape (68, D); got {lmk68.shape}")
    return np.stack([
        lmk68[_RIGHT_EYE].mean(axis=0),
        lmk68[_LEFT_EYE].mean(axis=0),
        lmk68[_NOSE_TIP],
        lmk68[_MOUTH_RIGHT],
        lmk68[_MOUTH_LEFT],
    ])


def corner_points(lmk68: np.ndarray) -> np.ndarray:
    """The :data:`CORNER_POINT_NAMES` points of iBUG-68 landmarks: ``[5, D]`` float64."""
    lmk68 = np.asarray(lmk68, dtype=np.float64)
    if lmk68.ndim != 2 or lmk68.shape[0] != 68:
        raise ValueError(f"landmarks must have shape (68, D); got {lmk68.shape}")
    return lmk68[list(CORNER_POINT_IBUG)]


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``dst ~ s R src + t`` (Umeyama 1991, no reflection).

    Args:
        src: ``[K, 2]`` points, K >= 2, not all equal.
        dst: ``[K, 2]`` target points.

    Returns:
        ``[2, 3]`` float64 affine matrix ``[s R | t]`` (apply with :func:`transform_points`).

    Raises:
        ValueError: on mismatched shapes, non-finite values or degenerate (coincident) points.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise ValueError(f"src and dst must both have shape (K>=2, 2); got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("similarity estimate: points contain NaN or infinity")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = (xs ** 2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("similarity estimate: source points coincide (no scale can be found)")
    cov = xd.T @ xs / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / var_s
    trans = mu_d - scale * rot @ mu_s
    return np.concatenate([scale * rot, trans[:, None]], axis=1)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a ``[2, 3]`` affine matrix to ``[..., 2]`` points (same pixel convention in and out)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def _cv2_matrix(matrix: np.ndarray) -> np.ndarray:
    """The same warp for OpenCV, whose pixel (i, j) is centred at (j, i), not (j + .5, i + .5)."""
    # x_cv = x - 0.5 on both sides: x'_cv = A (x_cv + 0.5) + t - 0.5
    out = matrix.astype(np.float64).copy()
    out[:, 2] = matrix[:, 2] + matrix[:, :2] @ np.array([0.5, 0.5]) - 0.5
    return out


def warp_image(image: np.ndarray, matrix: np.ndarray, size: int, *, border_value: int = 0,
               replicate_edges: bool = False) -> np.ndarray:
    """Warp an image into the ``size x size`` crop (bilinear, with area filtering when shrinking a lot).

    Args:
        image: ``[H, W, 3]`` or ``[H, W]`` uint8.
        matrix: ``[2, 3]`` from :func:`estimate_similarity` (input pixels -> crop pixels).
        size: crop side in pixels.
        border_value: fill outside the source image.
        replicate_edges: fill outside with the nearest edge pixel instead.

    Returns:
        ``[size, size, ...]`` same dtype.
    """
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    src = image
    m = matrix
    # Bilinear sampling from a much larger image aliases: pre-shrink by a power of two first.
    while scale < 0.5 and min(src.shape[:2]) >= 4:
        h, w = src.shape[:2]
        src = cv2.resize(src, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)
        fx, fy = w / src.shape[1], h / src.shape[0]
        m = m @ np.array([[fx, 0.0, 0.0], [0.0, fy, 0.0], [0.0, 0.0, 1.0]])
        scale *= 2.0
    return cv2.warpAffine(src, _cv2_matrix(m), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE if replicate_edges else cv2.BORDER_CONSTANT,
                          borderValue=border_value)


def invert_similarity(matrix: np.ndarray) -> np.ndarray:
    """The inverse ``[2, 3]`` map (crop pixels -> input pixels)."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def warp_back(crop: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A crop-space image (``[S, S, C]`` or ``[S, S]``, float or uint8) warped back into the
    input image's frame (``shape[:2]``; bilinear, zero outside the crop): the inverse of
    :func:`warp_image` for ``matrix``."""
    h, w = shape[:2]
    return cv2.warpAffine(crop, _cv2_matrix(invert_similarity(matrix)), (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def warp_mask(mask: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Warp a class map with nearest-neighbour sampling (classes never blend); outside is 0 (background)."""
    return cv2.warpAffine(mask, _cv2_matrix(matrix), (size, size), flags=cv2.INTER_NEAREST,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def project_mean_landmarks(model: FaceModel, yaw_deg: float, camera: Camera) -> np.ndarray:
    """The mean face's 68 landmarks posed at ``yaw_deg`` (no translation), projected: ``[68, 2]`` pixels."""
    lmk = model.mean_shape[model.keypoints].to(torch.float64).unsqueeze(0)  # [1, 68, 3]
    angles = torch.tensor([[0.0, math.radians(yaw_deg), 0.0]], dtype=torch.float64)
    posed = rigid_transform(lmk, angles, torch.zeros(1, 3, dtype=torch.float64))
    return camera.project(posed)[0].numpy()


@dataclass(kw_only=True, slots=True)
class AlignmentTemplate:
    """Five-point templates per yaw at one output size.

    Args:
        size: output crop side in pixels.
        points_224: ``{yaw_deg: [5, 2]}`` template at 224 px (scaled linearly to ``size``, as
            the camera's focal length and centre are).
        source: what the template was derived from (face model name), for the manifest.
    """

    size: int
    points_224: dict[float, np.ndarray]
    source: str = ""
    corners_224: dict[float, np.ndarray] | None = None
    """``{yaw_deg: [5, 2]}`` the same mean face's :data:`CORNER_POINT_NAMES` points at 224 px,
    for views whose landmarks come from a 5-point detector (:mod:`dfmvr.detect`)."""

    @classmethod
    def from_face_model(cls, model: FaceModel, yaw_deg: tuple[float, ...] | list[float], size: int,
                        *, focal_224: float = 1015.0) -> "AlignmentTemplate":
        """Project the mean face of ``model`` at each yaw with the camera of docs/design.md ("Camera")."""
        cam = Camera.at_size(224, focal_224=focal_224)
        projected = {float(y): project_mean_landmarks(model, float(y), cam) for y in yaw_deg}
        return cls(size=size, points_224={y: five_points(p) for y, p in projected.items()},
                   corners_224={y: corner_points(p) for y, p in projected.items()}, source=model.name)

    def points(self, yaw_deg: float, scheme: str = "ibug") -> np.ndarray:
        """``[5, 2]`` template for ``yaw_deg`` at :attr:`size` pixels: the :data:`FIVE_POINT_NAMES`
        points (``scheme="ibug"``, from 68 landmarks) or :data:`CORNER_POINT_NAMES` (``"corners"``)."""
        table = self.points_224 if scheme == "ibug" else self.corners_224
        if scheme not in ("ibug", "corners") or table is None:
            raise ValueError(f"alignment scheme {scheme!r}: expected 'ibug' or 'corners' (templates from a face model)")
        key = float(yaw_deg)
        if key not in table:
            raise KeyError(f"no alignment template for yaw {yaw_deg} deg; have {sorted(table)}")
        return table[key] * (self.size / 224.0)

    def to_dict(self) -> dict:
        """JSON-friendly record for the manifest (pixels at :attr:`size`)."""
        return {
            "size": self.size,
            "source": self.source,
            "points": FIVE_POINT_NAMES,
            "yaw_deg": {str(y): np.round(self.points(y), 3).tolist() for y in sorted(self.points_224)},
        }


def align_view(image: np.ndarray, lmk68: np.ndarray, template: np.ndarray, size: int,
               mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Crop and align one view: image, landmarks and (optional) mask go through one warp.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        lmk68: ``[68, 2]`` pixels in ``image``.
        template: ``[5, 2]`` target five points at ``size``.
        size: output side in pixels.
        mask: optional ``[H, W]`` uint8 class map aligned with ``image``.

    Returns:
        ``(image [size, size, 3] uint8, lmk68 [68, 2] float32, mask [size, size] uint8 or None,
        matrix [2, 3])``.
    """
    matrix = estimate_similarity(five_points(lmk68), template)
    out_img = warp_image(image, matrix, size)
    out_lmk = transform_points(matrix, lmk68).astype(np.float32)
    out_mask = None if mask is None else warp_mask(mask, matrix, size)
    return out_img, out_lmk, out_mask, matrix
