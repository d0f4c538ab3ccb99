"""One capture as ``python -m sharding.pack`` reads it from a layout's files: the views aligned
to the model's crop, the masks, the 2D landmarks (from files, or found by the face mesh / dlib),
the 3D landmarks and the scan (read in its units, converted to decimetres; a point cloud meshed
by :func:`delaunay_mesh`). Every problem is an :class:`~sharding.layouts.InputError` naming the
file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dfmvr.data.shards import Sample
from dfmvr.data.align import AlignmentTemplate, align_view
from sharding.layouts import (
    VIEWS,
    CaptureSource,
    InputError,
    read_rows,
    read_bnt,
    read_image,
    read_landmarks,
    read_lm3d,
    read_mask,
    yaw_sign_check,
)


if TYPE_CHECKING:
    from sharding.pack import PackConfig

_logger = logging.getLogger(__name__)

_detectors: dict = {}
"""The face detector of this process, loaded at the first capture that needs it."""

DM_PER_UNIT = {"mm": 0.01, "cm": 0.1, "dm": 1.0, "m": 10.0}
"""Factor from a file's length unit to face-model units (decimetres)."""

DELAUNAY_MAX_EDGE_FACTOR = 6.0
"""Triangles of a Delaunay-meshed point cloud with an edge longer than this many times the
median edge are dropped: they bridge holes and the concave outline, not the surface."""

"""Under the output root: the shards a run has published so far, so a rerun of the same command
after an interruption packs only the rest (as ``sharding.synth`` does)."""


# ---------------------------------------------------------------------------------------------
# meshes


def delaunay_mesh(points: np.ndarray, max_edge_factor: float = DELAUNAY_MAX_EDGE_FACTOR) -> np.ndarray:
    """Triangulate a frontal point cloud in its x-y plane.

    Args:
        points: ``[P, 3]`` scan points, the face looking down +z (towards the camera).
        max_edge_factor: drop triangles with an edge longer than this times the median edge.

    Returns:
        ``[F, 3]`` int32 faces, counter-clockwise seen from +z.
    """
    from scipy.spatial import Delaunay

    if len(points) < 3:
        raise ValueError(f"cannot mesh {len(points)} points: need at least 3")
    faces = Delaunay(points[:, :2]).simplices.astype(np.int64)
    xy = points[:, :2]
    a, b, c = xy[faces[:, 0]], xy[faces[:, 1]], xy[faces[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    faces[cross < 0] = faces[cross < 0][:, [0, 2, 1]]
    v = points[faces]
    edges = np.stack([np.linalg.norm(v[:, i] - v[:, (i + 1) % 3], axis=1) for i in range(3)], axis=1)
    longest = edges.max(axis=1)
    keep = longest <= max_edge_factor * np.median(edges)
    return faces[keep].astype(np.int32)


def read_scan(path: Path, units: str) -> dict:
    """Ground-truth mesh or point cloud -> ``{"vertices": float32 [N, 3] dm, "faces": int32 [F, 3], "units": "dm"}``.

    ``.obj``/``.ply`` are read with trimesh (a file without faces counts as a point cloud);
    ``.bnt`` (Bosphorus), ``.xyz``/``.txt`` (``x y z`` per line) and ``.npy`` are point clouds.
    Point clouds are meshed with :func:`delaunay_mesh`.
    """
    path = Path(path)
    ext = path.suffix.lower()
    faces = None
    try:
        if ext in (".obj", ".ply"):
            import trimesh

            loaded = trimesh.load(str(path), process=False)
            if isinstance(loaded, trimesh.Scene):
                loaded = loaded.to_mesh() if hasattr(loaded, "to_mesh") else loaded.dump(concatenate=True)
            verts = np.asarray(loaded.vertices, dtype=np.float64)
            if getattr(loaded, "faces", None) is not None and len(loaded.faces):
                faces = np.asarray(loaded.faces, dtype=np.int32)
        elif ext == ".bnt":
            verts = read_bnt(path)
        elif ext in (".xyz", ".txt"):
            verts = read_rows(path, 3)
        elif ext == ".npy":
            verts = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        else:
            raise InputError(f"{path}: unknown scan format {ext!r}; expected .obj, .ply, .bnt, .xyz, .txt or .npy")
    except InputError:
        raise
    except Exception as e:  # trimesh and numpy raise many types for a broken file
        raise InputError(f"{path}: unreadable scan ({type(e).__name__}: {e})") from e
    if verts.ndim != 2 or verts.shape[1] != 3 or len(verts) < 3 or not np.isfinite(verts).all():
        raise InputError(f"{path}: expected finite scan points [N >= 3, 3], got {list(verts.shape)}")
    if faces is None:
        faces = delaunay_mesh(verts)
    return {"vertices": (verts * DM_PER_UNIT[units]).astype(np.float32), "faces": faces.astype(np.int32), "units": "dm"}


# ---------------------------------------------------------------------------------------------
# one capture


def _require(src: CaptureSource, view: str, mode: str) -> tuple[Path, Path | None]:
    """The view's image and landmark file (None: the detector finds the landmarks)."""
    files = src.views[view]
    if files.image is None:
        raise InputError(f"{src.folder}: missing view {view!r}: no image found (expected {files.expected})")
    if mode == "detect":
        return files.image, None
    if files.landmarks is None and mode == "files":
        raise InputError(
            f"{src.folder}: view {view!r} has no 68-point landmark file beside {files.image.name} "
            f"(expected {files.image.with_suffix('')}.{{pts,txt,npy}}; or let the detector find them: "
            "--landmarks auto)"
        )
    return files.image, files.landmarks


LANDMARK_SOURCES = {
    "mesh": "MediaPipe face mesh (face_landmark.tflite, Apache 2.0), iBUG-68 from its 468 points",
    "ibug68": "dlib shape_predictor_68_face_landmarks (iBUG 300-W, non-commercial)",
}
"""``meta["landmarks"][view]["source"]`` of detected landmarks, by landmarker."""


def _detected_landmarks(image: np.ndarray, img_path: Path, cfg: PackConfig) -> tuple[np.ndarray, dict]:
    """68 landmarks of the face in ``image`` from the detector, and what to record about them."""
    from dfmvr.detect import FaceDetector, ManyFacesError, NoFaceError

    if "detector" not in _detectors:  # one per process (each packing worker loads its own)
        _detectors["detector"] = FaceDetector(landmarker=cfg.landmarker, accept_noncommercial=cfg.accept_ibug_68)
    try:
        face = _detectors["detector"].one_face(image, str(img_path), largest=cfg.largest_face)
    except (NoFaceError, ManyFacesError) as e:
        raise InputError(str(e)) from None
    record = {"source": LANDMARK_SOURCES[face.landmarker],
              "detector": face.detector, "score": round(face.score, 4), "box": [round(v, 1) for v in face.box],
              "landmark_confidence": round(face.landmark_confidence, 4)}
    if face.mesh_score is not None:
        record["mesh_score"] = round(face.mesh_score, 4)
    return face.points68.astype(np.float32), record


def load_capture(src: CaptureSource, template: AlignmentTemplate, cfg: PackConfig) -> tuple[Sample, list[str]]:
    """Read, align and assemble one capture.

    Returns:
        ``(sample, warnings)``; the sample's ``masks`` is None when any view has no mask.

    Raises:
        InputError: naming the file that is missing or unreadable.
    """
    notes: list[str] = []
    # check every view's files before decoding anything so the message names the first gap
    paths = {v: _require(src, v, cfg.landmarks) for v in VIEWS}
    landmark_sources: dict[str, object] = {}
    images, masks, lmks, matrices = {}, {}, [], {}
    have_masks = all(src.views[v].mask is not None for v in VIEWS)
    if not have_masks and any(src.views[v].mask is not None for v in VIEWS):
        notes.append(f"{src.folder}: masks for only some views; packing this capture without masks")
    for view, yaw in zip(VIEWS, src.yaw_deg):
        img_path, lmk_path = paths[view]
        image = read_image(img_path)
        if src.transpose and lmk_path is None:  # detect on the upright image, then store as the files are
            upright = np.ascontiguousarray(image.transpose(1, 0, 2))
            lmk, landmark_sources[view] = _detected_landmarks(upright, img_path, cfg)
            lmk = lmk[:, ::-1].copy()
        elif lmk_path is None:
            lmk, landmark_sources[view] = _detected_landmarks(image, img_path, cfg)
        else:
            lmk = read_landmarks(lmk_path)
            landmark_sources[view] = {"source": "file", "file": lmk_path.name}
        mask = read_mask(src.views[view].mask, image.shape[:2]) if have_masks else None
        if src.transpose:
            image = np.ascontiguousarray(image.transpose(1, 0, 2))
            lmk = lmk[:, ::-1].copy()
            mask = None if mask is None else np.ascontiguousarray(mask.T)
        if not yaw_sign_check(lmk, yaw):
            notes.append(f"{lmk_path or img_path}: landmarks look like yaw {-yaw:+.0f} deg, not {yaw:+.0f} deg ({view} view): "
                         "check the layout's view map")
        try:
            out_img, out_lmk, out_mask, matrix = align_view(image, lmk, template.points(yaw), cfg.size, mask)
        except ValueError as e:
            raise InputError(f"{lmk_path or img_path}: cannot align with these landmarks ({e})") from e
        images[view] = out_img
        lmks.append(out_lmk)
        if out_mask is not None:
            masks[view] = out_mask
        matrices[view] = np.round(matrix, 6).tolist()
    lm3d = None
    if src.lm3d is not None:
        lm3d = (read_lm3d(src.lm3d, src.lm3d_drop) * DM_PER_UNIT[cfg.lm3d_units]).astype(np.float32)
    gt = read_scan(src.scan, cfg.scan_units) if src.scan is not None else None
    meta = {
        "yaw_deg": [float(y) for y in src.yaw_deg],
        "source": src.source,
        "input": str(src.folder),
        "has_masks": have_masks,
        "align": {"matrices": matrices, "transposed": src.transpose},
        "landmarks": landmark_sources,
    }
    if lm3d is not None:
        meta["lm3d"] = {"file": src.lm3d.name, "frame": "input (scan) frame", "dropped": list(src.lm3d_drop)}
    if gt is not None:
        meta["gt_file"] = src.scan.name
    if src.extra:
        meta.update(src.extra)
    sample = Sample(
        subject=safe_name(src.subject), capture=safe_name(src.capture),
        images=images, masks=masks if have_masks else None,
        lmk2d=np.stack(lmks).astype(np.float32), lmk3d=lm3d, gt=gt, meta=meta,
        image_format=cfg.image_format,
    )
    sample.validate()
    return sample, notes


def safe_name(name: str) -> str:
    """Sample keys allow letters, digits, '_' and '-': map anything else (dots, spaces) to '_'."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
