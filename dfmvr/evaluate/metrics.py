"""The field's 3D face reconstruction metrics, in mm (docs/evaluation.md "Metrics").

- :func:`now_error`: NoW's scan-to-mesh error (Sanyal et al. 2019): crop the scan around the
  face, align the prediction by 7-landmark Procrustes, refine by ICP with scale, report the
  distance of every cropped scan vertex to the predicted surface (mean, median, std).
- :func:`p2p_rmse` / :func:`point_to_plane`: the point-to-plane RMSE of Deep3DFace / MGCNet (the
  paper's "RMSE" row): crop 95 mm around the nose tip, ICP with scale, RMSE of the distances of
  the cropped scan points to the tangent planes of the predicted surface.
- :func:`region_errors`: per-region errors on REALY's four regions (forehead, nose, mouth,
  cheeks) between meshes of the same topology; :func:`vertex_regions` labels a face model.

Conventions: ``pred_*`` is the reconstruction, ``scan_*`` the ground truth (any topology).
Inputs are numpy arrays in one common unit, ``mm_per_unit`` mm each (default 100: the face
model's decimetres); everything is computed in float64 millimetres and reported in mm.
Shapes: ``N`` predicted vertices, ``F`` predicted faces, ``M`` scan vertices, ``K`` scan points
kept by a crop.

One job: the metrics (each protocol's crop, alignment and distances, with the checks that name a bad
scan); scoring a whole split is :mod:`dfmvr.evaluate.run`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from dfmvr.evaluate.surface import MeshSurface
from dfmvr.facemodel.model import FaceModel
from dfmvr.facemodel.regions import L_LIP, MOUTH, NOSE, SKIN, U_LIP
from dfmvr.train.metrics import similarity_transform

_logger = logging.getLogger(__name__)

NOW_LANDMARKS_IBUG: tuple[int, ...] = (36, 39, 42, 45, 33, 48, 54)
"""The iBUG-68 indices of NoW's 7 scan landmarks, in NoW's order: the subject's right eye outer
and inner corners, left eye inner and outer corners, nose bottom (subnasale), right and left mouth
corners (as DECA/MICA take them from the 68: ``lmk68[17:][[19, 22, 25, 28, 16, 31, 37]]``)."""

REALY_REGIONS: tuple[str, ...] = ("forehead", "nose", "mouth", "cheeks")
"""REALY's four evaluation regions, in its order."""
REGION_NAMES: tuple[str, ...] = REALY_REGIONS + ("other",)
"""Names of region ids 0..4 (``other``: eyes, brows, chin, jaw, temples, sides)."""


class ScanError(ValueError):
    """One sample cannot be evaluated: a scan (or a prediction) without faces, with non-finite
    vertices or with degenerate landmarks. The message names the sample (``source``) and the
    problem, so a job can skip the sample and list it."""


@dataclass(kw_only=True, slots=True)
class IcpConfig:
    """ICP with scale: closest points on the predicted surface -> Umeyama similarity, repeated.

    Args:
        max_iters: most iterations.
        tol_mm: stop when an iteration moves no aligned scan point by more than this (mm).
        rel_tol: stop when an iteration lowers the mean squared distance by less than this
            fraction of it (converged: near the minimum the closest-point assignment flips between
            neighbouring faces and the steps zigzag by about 1e-3 mm while the error stays put to
            7 digits, so ``tol_mm`` alone would run every iteration).
        trim_fraction: share of the pairs with the largest distances left out of each similarity
            estimate (trimmed ICP; 0 keeps all, as NoW's least squares over all cropped points).
        max_points: at most this many scan points (evenly spread through the cropped list) drive
            the alignment; 0 uses all. The reported distances always use all cropped points.
        candidates: ``k`` of :class:`~dfmvr.evaluate.surface.MeshSurface` (speed only).
    """

    max_iters: int = 60
    tol_mm: float = 1e-5
    rel_tol: float = 1e-6
    trim_fraction: float = 0.0
    max_points: int = 5000
    candidates: int = 16

    def __post_init__(self) -> None:
        if self.max_iters < 0:
            raise ValueError(f"IcpConfig.max_iters must be >= 0; got {self.max_iters}")
        if not self.tol_mm > 0:
            raise ValueError(f"IcpConfig.tol_mm must be > 0; got {self.tol_mm}")
        if not 0.0 <= self.rel_tol < 1.0:
            raise ValueError(f"IcpConfig.rel_tol must be in [0, 1); got {self.rel_tol}")
        if not 0.0 <= self.trim_fraction < 1.0:
            raise ValueError(f"IcpConfig.trim_fraction must be in [0, 1); got {self.trim_fraction}")
        if self.max_points < 0 or 0 < self.max_points < 3:
            raise ValueError(f"IcpConfig.max_points must be 0 (all) or >= 3; got {self.max_points}")
        if self.candidates < 1:
            raise ValueError(f"IcpConfig.candidates must be >= 1; got {self.candidates}")


@dataclass(kw_only=True, slots=True)
class Similarity:
    """``x -> scale * rot @ x + trans`` (``rot [3, 3]`` proper rotation, ``trans [3]``)."""

    scale: float = 1.0
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    trans: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``[P, 3] -> [P, 3]``."""
        return self.scale * x @ self.rot.T + self.trans

    def inverse_apply(self, y: np.ndarray) -> np.ndarray:
        """The inverse map, ``[P, 3] -> [P, 3]``."""
        return (y - self.trans) @ self.rot / self.scale

    def then(self, other: "Similarity") -> "Similarity":
        """``other`` after ``self``."""
        return Similarity(scale=other.scale * self.scale, rot=other.rot @ self.rot,
                          trans=other.scale * other.rot @ self.trans + other.trans)

    def matrix(self, unit_scale: float = 1.0) -> np.ndarray:
        """``[4, 4]`` homogeneous matrix; ``unit_scale`` divides the translation (mm -> input unit)."""
        m = np.eye(4)
        m[:3, :3] = self.scale * self.rot
        m[:3, 3] = self.trans / unit_scale
        return m


@dataclass(kw_only=True, slots=True)
class NowResult:
    """NoW's scan-to-mesh error of one sample.

    Args:
        distances_mm: ``[K]`` distance of every cropped scan vertex to the aligned predicted surface.
        mean_mm, median_mm, std_mm: their statistics.
        transform: ``[4, 4]`` similarity applied to the prediction (``scale * R | t``, ``t`` in
            the input unit), mapping it onto the scan.
        n_scan_points: ``K``, scan vertices kept by the crop.
        icp_iterations: ICP iterations run.
    """

    distances_mm: np.ndarray
    mean_mm: float
    median_mm: float
    std_mm: float
    transform: np.ndarray
    n_scan_points: int
    icp_iterations: int = 0


@dataclass(kw_only=True, slots=True)
class P2PResult:
    """Point-to-plane error of one sample.

    Args:
        distances_mm: ``[K]`` unsigned point-to-plane distance of every cropped scan point.
        rmse_mm: ``sqrt(mean(distances_mm ** 2))``.
        transform: ``[4, 4]`` similarity applied to the prediction (``t`` in the input unit).
        n_scan_points: ``K``, scan points within the crop.
        icp_iterations: ICP iterations run.
    """

    distances_mm: np.ndarray
    rmse_mm: float
    transform: np.ndarray
    n_scan_points: int
    icp_iterations: int = 0


# ----------------------------------------------------------------------------------------------
# Input checks


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _check_mesh(vertices, faces, *, what: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices [M, 3] float64, faces [F, 3] int64)`` or :class:`ScanError`."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ScanError(f"{_where(source)}{what} vertices must have shape (M, 3) with M > 0; got {v.shape}")
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise ScanError(f"{_where(source)}{what} has {int(bad.sum())} of {len(v)} vertices with NaN or "
                        f"infinite coordinates (first at index {int(np.flatnonzero(bad)[0])})")
    if f.size == 0:
        raise ScanError(f"{_where(source)}{what} has no faces (a mesh is needed, got a point cloud)")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ScanError(f"{_where(source)}{what} faces must have shape (F, 3); got {f.shape}")
    if not np.issubdtype(f.dtype, np.integer):
        raise ScanError(f"{_where(source)}{what} faces must be integer vertex indices; got dtype {f.dtype}")
    if f.min() < 0 or f.max() >= len(v):
        raise ScanError(f"{_where(source)}{what} faces index vertices {f.min()}..{f.max()}, but it has "
                        f"{len(v)} vertices")
    return v, f.astype(np.int64)


def _check_points(points, *, n: int | None, what: str, source: str) -> np.ndarray:
    """Landmarks ``[n, 3]`` (or one point when ``n`` is None), finite, as float64."""
    p = np.asarray(points, dtype=np.float64)
    want = (3,) if n is None else (n, 3)
    if n is None and p.shape != want or n is not None and (p.ndim != 2 or p.shape[1] != 3 or (n and len(p) != n)):
        raise ScanError(f"{_where(source)}{what} must have shape {want}; got {p.shape}")
    if not np.isfinite(p).all():
        raise ScanError(f"{_where(source)}{what} has NaN or infinite coordinates")
    return p


def _check_spread(lmk: np.ndarray, *, what: str, source: str) -> None:
    """Landmarks a similarity can be fitted to: not coincident, not all on one line."""
    sv = np.linalg.svd(lmk - lmk.mean(0), compute_uv=False)
    if len(lmk) < 3 or sv[0] <= 1e-9 * max(1.0, float(np.abs(lmk).max())) or sv[1] <= 1e-6 * sv[0]:
        raise ScanError(f"{_where(source)}{what} are degenerate (coincident or collinear; singular values "
                        f"{np.array2string(sv, precision=3)}): no similarity can be fitted to them")


# ----------------------------------------------------------------------------------------------
# Alignment


def procrustes(src: np.ndarray, dst: np.ndarray) -> Similarity:
    """The least-squares similarity taking points ``src [P, 3]`` onto ``dst [P, 3]`` (Umeyama,
    no reflection; :func:`dfmvr.train.metrics.similarity_transform`)."""
    scale, rot, trans = similarity_transform(torch.from_numpy(np.asarray(src, np.float64))[None],
                                             torch.from_numpy(np.asarray(dst, np.float64))[None])
    return Similarity(scale=float(scale[0]), rot=rot[0].numpy(), trans=trans[0].numpy())


def _spread(n: int, m: int) -> np.ndarray:
    """``m`` indices evenly through ``0..n-1`` (all when ``m`` is 0 or ``m >= n``)."""
    if m == 0 or m >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))


def _rotation(omega: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by ``|omega|`` radians about ``omega``."""
    angle = float(np.linalg.norm(omega))
    if angle < 1e-15:
        return np.eye(3)
    k = omega / angle
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle) * kx + (1.0 - np.cos(angle)) * kx @ kx


def _gauss_newton_step(on_surface: np.ndarray, pts: np.ndarray, dist: np.ndarray,
                       normals: np.ndarray) -> Similarity:
    """One Gauss-Newton step on the sum of squared point-to-surface distances.

    Moving the surface by a small similarity ``x -> x + s x + w x x + t`` (about the points'
    centroid) changes each distance by ``-u . (s x + w x x + t)`` to first order, with ``u`` the
    unit vector from the surface point to the scan point (the face normal when they coincide).
    For a surface point inside a face ``u`` is the normal, so the surface may slide along itself
    at no cost (point-to-plane ICP); on a border edge or corner it is the full direction
    (point-to-point). The 7 parameters come from linear least squares.
    """
    centre = pts.mean(axis=0)
    x = on_surface - centre
    diff = pts - on_surface
    u = np.where((dist > 1e-12)[:, None], diff / np.maximum(dist, 1e-12)[:, None], normals)
    jac = np.concatenate([np.einsum("ij,ij->i", u, x)[:, None], np.cross(x, u), u], axis=1)  # [K, 7]
    # normal equations with the columns scaled to unit norm (7 x 7): LAPACK's least squares on the
    # [K, 7] system took 10-40 ms per call here, about all of ICP's time beside the closest points
    norm = np.linalg.norm(jac, axis=0)
    norm = np.where(norm > 0, norm, 1.0)
    j = jac / norm
    # pseudo-inverse of the 7 x 7 system: directions the pairs do not constrain (sliding along a
    # flat patch) get no step instead of an arbitrary one
    w, vec = np.linalg.eigh(j.T @ j)
    inv = np.where(w > 1e-12 * max(float(w[-1]), 1e-300), 1.0 / np.where(w > 0, w, 1.0), 0.0)
    theta = (vec @ (inv * (vec.T @ (j.T @ dist)))) / norm
    scale, rot = float(np.exp(theta[0])), _rotation(theta[1:4])
    return Similarity(scale=scale, rot=rot, trans=centre - scale * rot @ centre + theta[4:])


def icp_similarity(surface: MeshSurface, points: np.ndarray, init: Similarity,
                   cfg: IcpConfig | None = None) -> tuple[Similarity, int]:
    """Refine ``init`` (prediction -> scan) to minimise the sum of squared distances of ``points``
    to the transformed ``surface``.

    Each iteration takes the closest point on the predicted surface of every scan point (queries
    run in the prediction's own frame, so the surface's search tree is built once), drops the
    ``trim_fraction`` farthest pairs and composes a similarity step onto the current transform
    (until the error stops falling, ``rel_tol``, or the step stops moving points, ``tol_mm``):
    a Gauss-Newton step on the squared distances (:func:`_gauss_newton_step`; converges in a few
    iterations where plain point-to-point ICP needs hundreds to slide a face along itself). A
    step that raises the mean squared distance of the pairs is undone and replaced by the
    Umeyama similarity of the pairs (surface point -> scan point), the classic ICP step that can
    never raise it.

    Args:
        surface: the prediction (any unit; ``points`` and ``init`` in the same).
        points: ``[K, 3]`` scan points.
        init: initial prediction -> scan similarity.

    Returns:
        ``(transform, iterations)``.
    """
    cfg = cfg or IcpConfig()
    pts = points[_spread(len(points), cfg.max_points)]
    n_keep = len(pts) if cfg.trim_fraction == 0 else max(3, int(np.ceil(len(pts) * (1.0 - cfg.trim_fraction))))
    tf = init
    best: tuple[float, Similarity, np.ndarray, np.ndarray] | None = None
    it, moved, reverted = 0, np.inf, False
    for it in range(1, cfg.max_iters + 1):
        hit = surface.closest(tf.inverse_apply(pts))
        dist = hit.distances * tf.scale
        keep = np.arange(len(pts)) if n_keep == len(pts) else np.argpartition(dist, n_keep - 1)[:n_keep]
        err = float(np.mean(dist[keep] ** 2))
        if best is not None and err > best[0]:
            tf, on_surface, keep = best[1], best[2], best[3]
            if reverted:
                break  # the safe step did not help either (trimming changed the pairs): keep the best
            # the last Gauss-Newton step overshot: back to where it started, take a safe step
            reverted = True
            step = procrustes(on_surface[keep], pts[keep])
        else:
            reverted = False
            converged = best is not None and best[0] - err <= cfg.rel_tol * best[0]
            on_surface = tf.apply(hit.points)
            normals = surface.face_normals[hit.faces] @ tf.rot.T
            best = (err, tf, on_surface, keep)
            if converged:
                break  # tf is the transform just measured, the best one
            step = _gauss_newton_step(on_surface[keep], pts[keep], dist[keep], normals[keep])
        tf = tf.then(step)
        moved = float(np.linalg.norm(step.apply(on_surface) - on_surface, axis=1).max())
        if moved < cfg.tol_mm:
            break
    else:
        if cfg.max_iters:
            _logger.debug("ICP stopped after %d iterations (last step moved points by up to %.2g mm)",
                          cfg.max_iters, moved)
    return tf, it


# ----------------------------------------------------------------------------------------------
# NoW


def now_crop_sphere(scan_lmk7: np.ndarray, *, source: str = "") -> tuple[np.ndarray, float]:
    """NoW's face sphere from its 7 scan landmarks (order :data:`NOW_LANDMARKS_IBUG`).

    ``centre = nose_bottom + 0.3 * (inner_eye_midpoint - nose_bottom)``;
    ``radius = 1.4 * (|outer_eye_R - outer_eye_L| + |inner_eye_midpoint - nose_bottom|) / 2``.

    Returns:
        ``(centre [3], radius)`` in the landmarks' unit.

    Raises:
        ScanError: wrong shape, non-finite or degenerate landmarks.
    """
    lmk = _check_points(scan_lmk7, n=7, what="scan landmarks (7, NoW order)", source=source)
    nose_bottom = lmk[4]
    bridge = (lmk[1] + lmk[2]) / 2
    outer = float(np.linalg.norm(lmk[0] - lmk[3]))
    nose = float(np.linalg.norm(bridge - nose_bottom))
    if outer <= 0 or nose <= 0:
        raise ScanError(f"{_where(source)}scan landmarks are degenerate: outer eye corners {outer:.3g} "
                        f"apart and inner-eye midpoint {nose:.3g} from the nose bottom (both must be > 0)")
    return nose_bottom + 0.3 * (bridge - nose_bottom), 1.4 * (outer + nose) / 2


def now_crop(scan_vertices: np.ndarray, scan_lmk7: np.ndarray, *, source: str = "") -> np.ndarray:
    """``[M]`` bool: the scan vertices within NoW's face sphere (:func:`now_crop_sphere`)."""
    centre, radius = now_crop_sphere(scan_lmk7, source=source)
    v = np.asarray(scan_vertices, dtype=np.float64)
    return np.linalg.norm(v - centre, axis=1) <= radius


def now_error(pred_vertices: np.ndarray, pred_faces: np.ndarray, pred_lmk7: np.ndarray,
              scan_vertices: np.ndarray, scan_faces: np.ndarray, scan_lmk7: np.ndarray, *,
              mm_per_unit: float = 100.0, icp_iters: int = 60, icp: IcpConfig | None = None,
              source: str = "") -> NowResult:
    """NoW's scan-to-mesh error of one reconstruction.

    Steps: crop the scan to NoW's face sphere (:func:`now_crop`); align the prediction onto the
    scan by the similarity of its 7 landmarks onto the scan's (Procrustes with scale); refine by
    ICP with scale on the cropped scan vertices (:func:`icp_similarity`); report the distance of
    every cropped scan vertex to the closest point of the aligned predicted surface.

    Args:
        pred_vertices, pred_faces: ``[N, 3]``, ``[F, 3]`` the reconstruction.
        pred_lmk7: ``[7, 3]`` its points matching the scan landmarks (e.g. the vertices at
            ``keypoints[NOW_LANDMARKS_IBUG]``).
        scan_vertices, scan_faces: ``[M, 3]``, ``[Fs, 3]`` the ground-truth scan.
        scan_lmk7: ``[7, 3]`` its landmarks in NoW's order (:data:`NOW_LANDMARKS_IBUG`).
        mm_per_unit: mm per unit of all coordinates.
        icp_iters: most ICP iterations (``icp.max_iters`` wins when ``icp`` is given).
        icp: ICP settings (default :class:`IcpConfig` with ``max_iters=icp_iters``).
        source: the sample's name for error messages.

    Raises:
        ScanError: bad meshes or landmarks, or a crop that keeps fewer than 3 scan vertices.
    """
    cfg = icp or IcpConfig(max_iters=icp_iters)
    sv, _ = _check_mesh(scan_vertices, scan_faces, what="scan", source=source)
    pv, pf = _check_mesh(pred_vertices, pred_faces, what="prediction", source=source)
    slmk = _check_points(scan_lmk7, n=7, what="scan landmarks (7, NoW order)", source=source)
    plmk = _check_points(pred_lmk7, n=7, what="prediction landmarks (7, NoW order)", source=source)
    _check_spread(slmk, what="scan landmarks", source=source)
    _check_spread(plmk, what="prediction landmarks", source=source)
    mask = now_crop(sv, slmk, source=source)
    if mask.sum() < 3:
        raise ScanError(f"{_where(source)}NoW's crop keeps {int(mask.sum())} of {len(sv)} scan vertices "
                        "(need >= 3): are the landmarks on the scan, in the same unit?")
    m = float(mm_per_unit)
    scan_pts = sv[mask] * m
    surface = MeshSurface(pv * m, pf, k=cfg.candidates)
    tf, iters = icp_similarity(surface, scan_pts, procrustes(plmk * m, slmk * m), cfg)
    d = surface.closest(tf.inverse_apply(scan_pts)).distances * tf.scale
    return NowResult(distances_mm=d, mean_mm=float(d.mean()), median_mm=float(np.median(d)),
                     std_mm=float(d.std()), transform=tf.matrix(m), n_scan_points=len(d),
                     icp_iterations=iters)


# ----------------------------------------------------------------------------------------------
# Point-to-plane RMSE


def point_to_plane(pred_vertices: np.ndarray, pred_faces: np.ndarray, scan_vertices: np.ndarray,
                   scan_faces: np.ndarray, *, scan_nose_tip: np.ndarray, pred_nose_tip: np.ndarray,
                   crop_mm: float = 95.0, mm_per_unit: float = 100.0,
                   scan_landmarks: np.ndarray | None = None, pred_landmarks: np.ndarray | None = None,
                   icp: IcpConfig | None = None, source: str = "") -> P2PResult:
    """Point-to-plane error of one reconstruction (Deep3DFace / MGCNet protocol).

    Steps: keep the scan vertices within ``crop_mm`` of the scan's nose tip; start from the
    translation that puts the predicted nose tip on the scan's (or, when both landmark sets are
    given, from their Procrustes similarity); ICP with scale on the kept points
    (:func:`icp_similarity`); then each kept scan point ``p`` with closest point ``q`` on the
    aligned predicted surface contributes ``|(p - q) . n(q)|``, its distance to the tangent plane
    of the surface at ``q``, with ``n(q)`` the prediction's angle-weighted vertex normals
    interpolated at ``q`` (:meth:`~dfmvr.evaluate.surface.MeshSurface.normals_at`). A face
    normal would leave the plane undefined wherever ``q`` is on an edge or a corner (which of the
    faces sharing it?), and on a face mesh a large share of the closest points are; the
    interpolated normal has one value there. The distance is at most ``|p - q|`` (the
    scan-to-mesh distance) and equals it where ``p - q`` is along ``n(q)``.

    Args:
        pred_vertices, pred_faces: ``[N, 3]``, ``[F, 3]`` the reconstruction.
        scan_vertices, scan_faces: ``[M, 3]``, ``[Fs, 3]`` the ground-truth scan.
        scan_nose_tip, pred_nose_tip: ``[3]`` nose tips (iBUG 30 on the face model).
        crop_mm: crop radius around the scan's nose tip, mm.
        mm_per_unit: mm per unit of all coordinates.
        scan_landmarks, pred_landmarks: optional ``[L, 3]`` corresponding points (``L >= 3``) for
            a Procrustes start.
        icp: ICP settings (default :class:`IcpConfig`).
        source: the sample's name for error messages.

    Raises:
        ScanError: bad meshes, nose tips or landmarks, or a crop keeping fewer than 3 points.
    """
    cfg = icp or IcpConfig()
    sv, _ = _check_mesh(scan_vertices, scan_faces, what="scan", source=source)
    pv, pf = _check_mesh(pred_vertices, pred_faces, what="prediction", source=source)
    m = float(mm_per_unit)
    s_tip = _check_points(scan_nose_tip, n=None, what="scan nose tip", source=source) * m
    p_tip = _check_points(pred_nose_tip, n=None, what="prediction nose tip", source=source) * m
    if (scan_landmarks is None) != (pred_landmarks is None):
        raise ValueError("give both scan_landmarks and pred_landmarks, or neither")
    if scan_landmarks is not None:
        slmk = _check_points(scan_landmarks, n=0, what="scan landmarks", source=source)
        plmk = _check_points(pred_landmarks, n=len(slmk), what="prediction landmarks", source=source)
        _check_spread(slmk, what="scan landmarks", source=source)
        _check_spread(plmk, what="prediction landmarks", source=source)
        init = procrustes(plmk * m, slmk * m)
    else:
        init = Similarity(trans=s_tip - p_tip)
    scan_mm = sv * m
    keep = np.linalg.norm(scan_mm - s_tip, axis=1) <= crop_mm
    if keep.sum() < 3:
        raise ScanError(f"{_where(source)}the {crop_mm:g} mm crop around the nose tip keeps {int(keep.sum())} "
                        f"of {len(sv)} scan vertices (need >= 3): is the nose tip on the scan, and "
                        f"mm_per_unit={mm_per_unit:g} right?")
    pts = scan_mm[keep]
    surface = MeshSurface(pv * m, pf, k=cfg.candidates)
    tf, iters = icp_similarity(surface, pts, init, cfg)
    local = tf.inverse_apply(pts)
    hit = surface.closest(local)
    d = np.abs(np.einsum("ij,ij->i", local - hit.points, surface.normals_at(hit))) * tf.scale
    return P2PResult(distances_mm=d, rmse_mm=float(np.sqrt(np.mean(d ** 2))), transform=tf.matrix(m),
                     n_scan_points=len(d), icp_iterations=iters)


def p2p_rmse(pred_vertices: np.ndarray, pred_faces: np.ndarray, scan_vertices: np.ndarray,
             scan_faces: np.ndarray, *, scan_nose_tip: np.ndarray, pred_nose_tip: np.ndarray,
             crop_mm: float = 95.0, mm_per_unit: float = 100.0, source: str = "",
             **kwargs) -> float:
    """Point-to-plane RMSE in mm of one reconstruction (:func:`point_to_plane`'s ``rmse_mm``;
    ``kwargs`` are its optional arguments). Over a test set, report the mean and std of it."""
    return point_to_plane(pred_vertices, pred_faces, scan_vertices, scan_faces, scan_nose_tip=scan_nose_tip,
                          pred_nose_tip=pred_nose_tip, crop_mm=crop_mm, mm_per_unit=mm_per_unit,
                          source=source, **kwargs).rmse_mm


# ----------------------------------------------------------------------------------------------
# REALY's regions


def vertex_regions(face_model: FaceModel) -> np.ndarray:
    """``[N]`` region name (one of :data:`REGION_NAMES`) of every vertex of a face model.

    REALY's four regions, defined on the mean shape's frontal projection (model frame: x to the
    subject's left, y up) from the parsing classes (``face_model.region``) and the 68 keypoints,
    so they follow any model that has both (procedural, BFM):

    - ``nose``: parsing class nose;
    - ``mouth``: the lips and inner mouth (classes 7-9), and the skin in the box from the nose
      bottom (iBUG 33) down to as far under the lower lip (57) as the upper lip (51) is under the
      nose, between the mouth corners (48, 54) widened by a quarter of the mouth's width each side;
    - ``forehead``: skin above the brows (the line through iBUG 17-26, their upper edge, plus 3 %
      of the outer-eye-corner distance) and between the brows' outer ends (17, 26);
    - ``cheeks``: skin from the mouth corners' height up to 8 % of the outer-eye-corner distance
      under the lowest lower-lid point (40, 41, 46, 47), outside the inner eye corners' columns
      (39, 42), inside the outer eye corners' columns (36, 45) widened by 15 % of their distance
      and inside the face contour (iBUG 0-16, held at its top points' x above them), not nose or
      mouth;
    - ``other``: the rest (eyes, brows, chin, jaw line, temples, the sides of the head).
    """
    xy = face_model.mean_shape.detach().cpu().double().numpy()[:, :2]
    parse = face_model.region.detach().cpu().numpy()
    lm = xy[face_model.keypoints.detach().cpu().numpy()]
    x, y = xy[:, 0], xy[:, 1]
    outer_eyes = float(np.linalg.norm(lm[36] - lm[45]))
    skin = parse == SKIN
    labels = np.full(len(xy), "other", dtype=object)

    nose = parse == NOSE
    mouth_w = float(lm[54, 0] - lm[48, 0])
    top = lm[33, 1]
    bottom = lm[57, 1] - (lm[33, 1] - lm[51, 1])
    in_box = ((x >= lm[48, 0] - 0.25 * mouth_w) & (x <= lm[54, 0] + 0.25 * mouth_w)
              & (y <= top) & (y >= bottom))
    mouth = np.isin(parse, (MOUTH, U_LIP, L_LIP)) | (skin & in_box)

    brow = lm[17:27]
    order = np.argsort(brow[:, 0])
    brow_y = np.interp(x, brow[order, 0], brow[order, 1])
    forehead = skin & (y > brow_y + 0.03 * outer_eyes) & (x >= brow[:, 0].min()) & (x <= brow[:, 0].max())

    lid = lm[[40, 41, 46, 47], 1].min()
    corners_y = lm[[48, 54], 1].mean()
    contour = lm[:17]
    right_side, left_side = contour[:9], contour[8:]
    # x of the contour at each height, per side (np.interp needs increasing y: sort each side)
    r_order, l_order = np.argsort(right_side[:, 1]), np.argsort(left_side[:, 1])
    right_x = np.interp(y, right_side[r_order, 1], right_side[r_order, 0])
    left_x = np.interp(y, left_side[l_order, 1], left_side[l_order, 0])
    reach = np.abs(lm[[36, 45], 0]).max() + 0.15 * outer_eyes
    cheeks = (skin & ~mouth & (y >= corners_y) & (y <= lid - 0.08 * outer_eyes)
              & (np.abs(x) >= np.abs(lm[[39, 42], 0]).min()) & (np.abs(x) <= reach)
              & (x >= right_x) & (x <= left_x))

    labels[forehead] = "forehead"
    labels[cheeks] = "cheeks"
    labels[mouth] = "mouth"
    labels[nose] = "nose"
    return labels.astype(str)


def region_errors(pred_vertices: np.ndarray, gt_vertices: np.ndarray, region_of_vertex: np.ndarray, *,
                  mm_per_unit: float = 100.0, source: str = "") -> dict[str, float]:
    """Mean vertex distance in mm per REALY region between two meshes of the same topology.

    The prediction is first aligned onto the ground truth by the least-squares similarity over
    all vertices (:func:`dfmvr.train.metrics.similarity_transform`), so pose and global scale do
    not count; then each region's error is the mean Euclidean distance of its vertices.

    Args:
        pred_vertices, gt_vertices: ``[N, 3]``.
        region_of_vertex: ``[N]`` region names (:func:`vertex_regions`) or ids into
            :data:`REGION_NAMES`.
        mm_per_unit: mm per unit of the coordinates.
        source: the sample's name for error messages.

    Returns:
        ``{region: mean distance in mm}`` for each of :data:`REALY_REGIONS`, in that order.

    Raises:
        ScanError: non-finite vertices (names ``source``).
        ValueError: mismatched shapes, unknown region names or a region without vertices.
    """
    pred = np.asarray(pred_vertices, dtype=np.float64)
    gt = np.asarray(gt_vertices, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 2 or pred.shape[1] != 3:
        raise ValueError(f"{_where(source)}prediction and ground truth must both have shape (N, 3); got "
                         f"{pred.shape} and {gt.shape}")
    for what, v in (("ground truth", gt), ("prediction", pred)):
        bad = ~np.isfinite(v).all(axis=1)
        if bad.any():
            raise ScanError(f"{_where(source)}{what} has {int(bad.sum())} of {len(v)} vertices with NaN or "
                            f"infinite coordinates")
    regions = np.asarray(region_of_vertex)
    if regions.shape != (len(gt),):
        raise ValueError(f"{_where(source)}region_of_vertex must have shape ({len(gt)},); got {regions.shape}")
    if np.issubdtype(regions.dtype, np.integer):
        if regions.min() < 0 or regions.max() >= len(REGION_NAMES):
            raise ValueError(f"region ids must be in 0..{len(REGION_NAMES) - 1} ({REGION_NAMES}); got "
                             f"{regions.min()}..{regions.max()}")
        regions = np.asarray(REGION_NAMES)[regions]
    unknown = sorted(set(np.unique(regions).tolist()) - set(REGION_NAMES))
    if unknown:
        raise ValueError(f"unknown region names {unknown}; expected some of {REGION_NAMES}")
    tf = procrustes(pred, gt)
    dist = np.linalg.norm(tf.apply(pred) - gt, axis=1) * mm_per_unit
    out = {}
    for name in REALY_REGIONS:
        sel = regions == name
        if not sel.any():
            raise ValueError(f"region {name!r} has no vertices; every REALY region needs some")
        out[name] = float(dist[sel].mean())
    return out
