"""Pack real multi-view captures into dfmvr shards.

    python -m sharding.pack --input DIR --out ROOT [--layout generic|pixelface|multipie|bosphorus]
        [--size 224] [--splits 0.8,0.1,0.1] [--seed 0] [--workers 2]

Every capture (three views of one subject) is read through a layout (:mod:`sharding.layouts`),
each view is cropped and aligned to the model's input size by a 5-point similarity to the
face model's template at that view's yaw (:mod:`dfmvr.data.align`), and the landmarks and masks
go through the same warp. Optional 3D landmarks and scans are converted to decimetres; point
clouds are meshed by Delaunay triangulation in the frontal x-y plane. Captures that cannot be
read (a missing view, an unreadable landmark file) are refused with a message naming the file
and listed at the end; the rest are packed. ``--out`` may be ``s3://bucket/prefix``. An
interrupted run publishes nothing partial, and the same command again resumes from the shards
it did publish (``pack-progress.json``).

Landmarks come from files beside the images (``--landmarks files``, the default), from the
detector for every view (``--landmarks detect``), or from files where they exist and the detector
elsewhere (``--landmarks auto``). The detector (the ``detect`` extra, :mod:`dfmvr.detect`) finds
the face with dlib and its 68 points with a landmarker (``--landmarker``): MediaPipe's face mesh
(Apache 2.0, the 68 points taken from its 468, :mod:`dfmvr.facemesh`), or dlib's iBUG-68
predictor, which is trained on non-commercial data and needs ``--accept-ibug-68``. Without
``--landmarker`` it is the iBUG predictor when ``--accept-ibug-68`` is given (as before the face
mesh came) and the face mesh otherwise. A view where no face is found (or several, without
``--largest-face``) refuses its capture, named. See docs/packing.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import logging
import os
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from dfmvr.config import FaceModelConfig
from dfmvr.data import storage
from dfmvr.data.shards import Sample, ShardInfo, ShardWriter, write_manifest
from dfmvr.data.splits import SPLIT_NAMES, assign_splits, parse_fractions
from dfmvr.data.align import AlignmentTemplate, align_view
from sharding.layouts import (
    DEFAULT_YAW_DEG,
    LAYOUTS,
    PIXELFACE_LM3D_DROP,
    VIEWS,
    CaptureSource,
    InputError,
    read_rows,
    discover,
    parse_view_map,
    read_bnt,
    read_image,
    read_landmarks,
    read_lm3d,
    read_mask,
    yaw_sign_check,
)

_logger = logging.getLogger(__name__)

DM_PER_UNIT = {"mm": 0.01, "cm": 0.1, "dm": 1.0, "m": 10.0}
"""Factor from a file's length unit to face-model units (decimetres)."""

DELAUNAY_MAX_EDGE_FACTOR = 6.0
"""Triangles of a Delaunay-meshed point cloud with an edge longer than this many times the
median edge are dropped: they bridge holes and the concave outline, not the surface."""

PROGRESS_NAME = "pack-progress.json"
"""Under the output root: the shards a run has published so far, so a rerun of the same command
after an interruption packs only the rest (as ``sharding.synth`` does)."""

MASKLESS_HINT = ("run the parse-net job to fill them in "
                 "(python -m sharding.fill_masks --input ROOT --out ROOT2 --parse-net CKPT)")


@dataclass(kw_only=True, slots=True)
class PackConfig:
    """What to pack and how."""

    input: str
    """Dataset folder."""
    out: str
    """Shard root: a local directory or ``s3://bucket/prefix``."""
    layout: Literal["generic", "pixelface", "multipie", "bosphorus"] = "generic"
    """Folder layout of ``input`` (docs/packing.md)."""
    size: int = 224
    """Output crop side in pixels."""
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/val/test fractions by subject (layouts with split folders keep theirs)."""
    seed: int = 0
    """Seed of the subject shuffle before the split."""
    yaw_deg: tuple[float, float, float] = DEFAULT_YAW_DEG
    """Nominal yaw of the left, front and right views (selects each view's template)."""
    max_count: int = 200
    """Samples per shard."""
    image_format: Literal["png", "jpg"] = "png"
    """Encoding of the aligned views in the shards."""
    scan_units: Literal["mm", "cm", "dm", "m"] = "mm"
    """Length unit of scans and meshes in the input (converted to decimetres)."""
    lm3d_units: Literal["mm", "cm", "dm", "m"] = "mm"
    """Length unit of 3D-landmark files in the input (converted to decimetres)."""
    workers: int = 1
    """Processes reading and aligning captures (1: in this process)."""
    facemodel: FaceModelConfig = field(default_factory=lambda: FaceModelConfig(n_vertices=4000))
    """Face model whose mean face defines the alignment templates."""
    layout_options: dict = field(default_factory=dict)
    """Layout-specific options (``view_dirs``, ``cameras``, ``poses``, ``lm3d_drop``, ``transpose``)."""
    endpoint: str | None = None
    """S3 endpoint (else ``AWS_ENDPOINT_URL``)."""
    landmarks: Literal["files", "detect", "auto"] = "files"
    """Where 68-point landmarks come from: files beside the images, the detector for every view,
    or files where present and the detector elsewhere."""
    accept_ibug_68: bool = False
    """Accept the non-commercial terms of dlib's iBUG-68 model (needed by ``landmarker="ibug68"``)."""
    landmarker: Literal["mesh", "ibug68"] | None = None
    """What finds the 68 points of a detected face: the face mesh or dlib's iBUG-68 predictor.
    None: ``"ibug68"`` when ``accept_ibug_68``, else ``"mesh"`` (set in ``__post_init__``)."""
    largest_face: bool = False
    """Views with several faces: take the largest instead of refusing the capture."""

    def fingerprint(self) -> str:
        """Hash of every setting that decides what the shards hold (not ``workers``, ``endpoint``)."""
        doc = {k: v for k, v in asdict(self).items() if k not in ("workers", "endpoint")}
        if self.landmarks == "files" or self.landmarker == "ibug68":
            del doc["landmarker"]  # as packs made before the face mesh came: their fingerprints stay
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        if self.landmarks not in ("files", "detect", "auto"):
            raise ValueError(f"landmarks: expected 'files', 'detect' or 'auto', got {self.landmarks!r}")
        if self.landmarker is None:
            self.landmarker = "ibug68" if self.accept_ibug_68 else "mesh"
        if self.landmarker not in ("mesh", "ibug68"):
            raise ValueError(f"landmarker: expected 'mesh' or 'ibug68', got {self.landmarker!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {self.layout!r}")
        if self.size < 16:
            raise ValueError(f"size: expected >= 16 px, got {self.size}")
        if len(self.yaw_deg) != 3:
            raise ValueError(f"yaw_deg: expected 3 angles (left, front, right), got {self.yaw_deg!r}")
        if self.max_count < 1:
            raise ValueError(f"max_count: expected >= 1, got {self.max_count}")
        for name in ("scan_units", "lm3d_units"):
            if getattr(self, name) not in DM_PER_UNIT:
                raise ValueError(f"{name}: expected one of {sorted(DM_PER_UNIT)}, got {getattr(self, name)!r}")
        self.splits = parse_fractions(self.splits)


@dataclass(kw_only=True, slots=True)
class PackSummary:
    """What a pack run did."""

    packed: int
    """Captures written."""
    per_split: dict[str, int]
    """Captures per split."""
    skipped: list[tuple[str, str]]
    """``(folder, reason)`` of every refused capture."""
    without_masks: int
    """Captures packed with no masks."""
    manifest: str | None
    """URL of the written manifest (None when nothing was packed)."""
    shards: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"packed {self.packed} captures: " + ", ".join(f"{k} {v}" for k, v in sorted(self.per_split.items()))]
        if self.without_masks:
            out.append(f"{self.without_masks} captures packed without masks: {MASKLESS_HINT}")
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} captures:")
            out.extend(f"  {folder}: {reason}" for folder, reason in self.skipped)
        if self.manifest:
            out.append(f"manifest: {self.manifest}")
        return out


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

    if "detector" not in _worker_state:
        _worker_state["detector"] = FaceDetector(landmarker=cfg.landmarker, accept_noncommercial=cfg.accept_ibug_68)
    try:
        face = _worker_state["detector"].one_face(image, str(img_path), largest=cfg.largest_face)
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


# ---------------------------------------------------------------------------------------------
# workers

_worker_state: dict = {}


def _init_worker(template: AlignmentTemplate, cfg: PackConfig) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker_state["template"] = template
    _worker_state["cfg"] = cfg


def _load_one(src: CaptureSource) -> tuple[Sample | None, list[str], str | None]:
    try:
        sample, notes = load_capture(src, _worker_state["template"], _worker_state["cfg"])
        return sample, notes, None
    except (InputError, ValueError) as e:
        return None, [], str(e)


def _iter_loaded(sources: list[CaptureSource], template: AlignmentTemplate, cfg: PackConfig
                 ) -> Iterator[tuple[CaptureSource, Sample | None, list[str], str | None]]:
    if cfg.workers <= 1:
        _init_worker(template, cfg)
        for src in sources:
            yield (src, *_load_one(src))
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(template, cfg)) as pool:
        # map keeps input order, so the shards do not depend on the worker count
        for src, result in zip(sources, pool.map(_load_one, sources, chunksize=4)):
            yield (src, *result)


# ---------------------------------------------------------------------------------------------
# the run


def build_template(cfg: PackConfig) -> AlignmentTemplate:
    """The alignment templates for ``cfg.yaw_deg`` at ``cfg.size`` from ``cfg.facemodel``'s mean face."""
    from dfmvr.facemodel import build_face_model

    model = build_face_model(cfg.facemodel)
    return AlignmentTemplate.from_face_model(model, cfg.yaw_deg, cfg.size)


LOCK_NAME = ".dfmvr-packing.lock"
"""Held in the output root while a packer writes there: a second packer on the same root fails fast."""


class RootBusyError(RuntimeError):
    """Another packer is writing the same root."""


@contextmanager
def root_lock(out: str, endpoint: str | None):
    """Hold ``out/LOCK_NAME`` for the block: created only if absent (a local exclusive create, or an
    S3 conditional put), removed at the end; a stale lock after a crash is named in the error."""
    from dfmvr.data import storage

    url = storage.join(out, LOCK_NAME)
    note = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode()
    try:
        if storage.is_s3(url):
            bucket, key = storage.split_s3(url)
            storage.s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=note, IfNoneMatch="*")
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
            fd = os.open(url, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "wb") as f:
                f.write(note)
    except FileExistsError:
        raise RootBusyError(_busy_message(url, Path(url).read_text(errors="replace"))) from None
    except Exception as exn:
        if "PreconditionFailed" in str(exn) or "412" in str(exn):
            raise RootBusyError(_busy_message(url, "")) from None
        raise
    try:
        yield
    finally:
        storage.delete(url, endpoint=endpoint)


def _busy_message(url: str, holder: str) -> str:
    return (f"{url}: another packer is writing this root ({holder.strip() or 'holder unknown'}); wait for it, "
            "or delete the lock if no packer is running (a crashed one leaves it)")


def pack(cfg: PackConfig, *, progress: bool = False) -> PackSummary:
    """Pack every capture under ``cfg.input`` into shards under ``cfg.out`` and write the manifest.

    Refused captures are logged with the reason (naming the file) and listed in the summary;
    the rest are packed. No manifest is written when nothing could be packed. Two packers on one
    root: the second fails fast with :class:`RootBusyError`.
    """
    with root_lock(cfg.out, cfg.endpoint):
        return _pack(cfg, progress=progress)


def _sample_key(src: CaptureSource) -> str:
    return f"{safe_name(src.subject)}-{safe_name(src.capture)}"


def load_progress(cfg: PackConfig) -> tuple[list[ShardInfo], set[str]]:
    """Shards an interrupted run with the same settings published and that are still intact
    (size and sha256 as recorded), and the keys of their captures packed without masks;
    nothing when there is no record, or one of other settings."""
    url = storage.join(cfg.out, PROGRESS_NAME)
    try:
        doc = json.loads(storage.read_bytes(url, endpoint=cfg.endpoint))
    except FileNotFoundError:
        return [], set()
    except (ValueError, UnicodeDecodeError) as e:
        _logger.warning("%s: unreadable (%s); packing everything again", url, e)
        return [], set()
    if not isinstance(doc, dict) or doc.get("fingerprint") != cfg.fingerprint():
        _logger.warning("%s: left by a pack with other settings; packing everything again", url)
        return [], set()
    kept = []
    for rec in doc.get("shards", []):
        try:
            info = ShardInfo(**rec)
            intact = storage.sha256_and_size(info.url, endpoint=cfg.endpoint) == (info.sha256, info.size)
        except (TypeError, FileNotFoundError, storage.StorageError):
            intact = False
        if intact:
            kept.append(info)
        else:
            _logger.warning("%s: recorded shard missing or changed; its captures are packed again", rec.get("url"))
    kept_keys = {k for i in kept for k in i.keys}
    return kept, {k for k in doc.get("without_masks", []) if k in kept_keys}


def save_progress(cfg: PackConfig, infos: list[ShardInfo], without_masks: set[str]) -> None:
    doc = {"fingerprint": cfg.fingerprint(), "shards": [asdict(i) for i in infos],
           "without_masks": sorted(without_masks)}
    storage.write_bytes(storage.join(cfg.out, PROGRESS_NAME), json.dumps(doc, indent=1).encode(),
                        endpoint=cfg.endpoint)


def next_index(infos: list[ShardInfo], split: str) -> int:
    indices = [int(m.group(1)) for i in infos if i.split == split
               and (m := re.search(rf"{re.escape(split)}-(\d+)\.tar$", i.url))]
    return max(indices) + 1 if indices else 0


def _pack(cfg: PackConfig, *, progress: bool) -> PackSummary:
    options = dict(cfg.layout_options)
    options.setdefault("yaw_deg", tuple(cfg.yaw_deg))
    sources = discover(cfg.layout, Path(cfg.input), **options)
    template = build_template(cfg)
    fixed = {s.split for s in sources if s.split is not None}
    split_of = assign_splits([s.subject for s in sources if s.split is None], cfg.splits, cfg.seed)
    for s in sources:
        if s.split is not None and s.split not in SPLIT_NAMES:
            _logger.info("%s: split folder %r kept as the split name", s.folder, s.split)
    if fixed:
        _logger.info("layout %s fixes the splits from its folders: %s", cfg.layout, sorted(fixed))

    # an interrupted run of the same command left shards: keep them, pack the rest
    recorded, maskless = load_progress(cfg)
    done_keys = {k for i in recorded for k in i.keys}
    if recorded:
        _logger.info("resuming: %d shards (%d captures) of an interrupted run kept; packing the rest",
                     len(recorded), len(done_keys))
        sources = [s for s in sources if _sample_key(s) not in done_keys]
    writers: dict[str, ShardWriter] = {}
    skipped: list[tuple[str, str]] = []
    per_split: dict[str, int] = {}
    for info in recorded:
        per_split[info.split] = per_split.get(info.split, 0) + info.count
    infos: list[ShardInfo] = list(recorded)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="capture", file=sys.stderr, desc="pack")
    try:
        for src, sample, notes, error in _iter_loaded(sources, template, cfg):
            if bar is not None:
                bar.update(1)
            for note in notes:
                _logger.warning(note)
            if sample is None:
                _logger.error("skipping %s: %s", src.folder, error)
                skipped.append((str(src.folder), str(error)))
                continue
            split = src.split or split_of[src.subject]
            if split not in writers:
                writers[split] = ShardWriter(cfg.out, split, max_count=cfg.max_count, endpoint=cfg.endpoint,
                                             start_index=next_index(recorded, split))
            writer = writers[split]
            before = len(writer.shards)
            if sample.masks is None:  # counted with the captures of an interrupted run's kept shards
                maskless.add(sample.key)
                _logger.info("%s: packed without masks (%s)", src.folder, MASKLESS_HINT)
            writer.write(sample)
            if len(writer.shards) > before:  # this write published the writer's full shard: record it
                published = recorded + [i for w in writers.values() for i in w.shards]
                save_progress(cfg, published, maskless & {k for i in published for k in i.keys})
            per_split[split] = per_split.get(split, 0) + 1
        for writer in writers.values():
            infos.extend(writer.close())
        save_progress(cfg, infos, maskless)
    finally:
        if bar is not None:
            bar.close()
        # on an error or Ctrl-C the unfinished shards are discarded, never published half full;
        # without a manifest the root lists nothing of this run
        for writer in writers.values():
            writer.abort()
    manifest = None
    without_masks = len(maskless)
    packed = sum(per_split.values())
    if packed:
        extra = {
            "source": f"pack:{cfg.layout}",
            "pack": {
                "input": str(cfg.input), "layout": cfg.layout, "seed": cfg.seed, "splits": list(cfg.splits),
                "yaw_deg": list(cfg.yaw_deg), "scan_units": cfg.scan_units, "lm3d_units": cfg.lm3d_units,
                "layout_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.layout_options.items()},
            },
            "alignment_template": template.to_dict(),
            "without_masks": without_masks,
            "skipped": [folder for folder, _ in skipped],
        }
        manifest = write_manifest(cfg.out, infos, image_size=cfg.size, extra=extra, endpoint=cfg.endpoint)
    if without_masks:
        _logger.warning("%d captures packed without masks: %s", without_masks, MASKLESS_HINT)
    if skipped:
        _logger.warning("skipped %d captures: %s", len(skipped), ", ".join(f for f, _ in skipped))
    return PackSummary(packed=packed, per_split=per_split, skipped=skipped, without_masks=without_masks,
                       manifest=manifest, shards=[i.url for i in infos])


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="shard root: a directory or s3://bucket/prefix")
    p.add_argument("--layout", default="generic", choices=sorted(LAYOUTS))
    p.add_argument("--size", type=int, default=224, help="output crop side in pixels")
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions by subject")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject shuffle")
    p.add_argument("--yaw", default="-45,0,45", help="nominal yaw of left,front,right in degrees")
    p.add_argument("--max-count", type=int, default=200, help="samples per shard")
    p.add_argument("--image-format", default="png", choices=("png", "jpg"))
    p.add_argument("--scan-units", default="mm", choices=sorted(DM_PER_UNIT), help="unit of scans/meshes in the input")
    p.add_argument("--lm3d-units", default="mm", choices=sorted(DM_PER_UNIT), help="unit of 3D landmarks in the input")
    p.add_argument("--workers", type=int, default=1, help="processes reading and aligning captures")
    p.add_argument("--facemodel", default="procedural", choices=("procedural", "bfm"),
                   help="face model whose mean face gives the alignment templates")
    p.add_argument("--bfm-path", default="", help="BFM_model_front.mat when --facemodel bfm")
    p.add_argument("--n-vertices", type=int, default=4000, help="procedural model size for the templates")
    p.add_argument("--view-dirs", default=None, help="pixelface: e.g. left=0,front=1,right=2")
    p.add_argument("--lm3d-drop", default=None,
                   help=f"pixelface: 0-based indices dropped from the 106 3D landmarks (default {PIXELFACE_LM3D_DROP})")
    p.add_argument("--no-transpose", action="store_true", help="pixelface: the images are stored upright")
    p.add_argument("--cameras", default=None, help="multipie: e.g. left=08_0,front=05_1,right=19_0")
    p.add_argument("--poses", default=None, help="bosphorus: e.g. left=YR_R45,front=N_N,right=YR_L45")
    p.add_argument("--landmarks", default="files", choices=("files", "detect", "auto"),
                   help="68-point landmarks from files beside the images, the detector (every view), "
                        "or files where present and the detector elsewhere (detector: the 'detect' extra)")
    p.add_argument("--landmarker", default=None, choices=("mesh", "ibug68"),
                   help="the detector's 68 points: from MediaPipe's face mesh (Apache 2.0) or dlib's iBUG-68 "
                        "predictor (non-commercial, needs --accept-ibug-68); default: ibug68 with "
                        "--accept-ibug-68, else mesh")
    p.add_argument("--accept-ibug-68", action="store_true",
                   help="accept the non-commercial terms of dlib's iBUG 300-W 68-point model (--landmarker ibug68)")
    p.add_argument("--largest-face", action="store_true",
                   help="views with several faces: take the largest (default: refuse the capture)")
    p.add_argument("--summary-json", default=None, help="write the summary here as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    options: dict = {}
    if args.view_dirs:
        options["view_dirs"] = parse_view_map(args.view_dirs, "--view-dirs")
    if args.lm3d_drop is not None:
        options["lm3d_drop"] = tuple(int(v) for v in args.lm3d_drop.split(",") if v.strip())
    if args.no_transpose:
        options["transpose"] = False
    if args.cameras:
        options["cameras"] = parse_view_map(args.cameras, "--cameras")
    if args.poses:
        options["poses"] = parse_view_map(args.poses, "--poses")
    facemodel = FaceModelConfig(source=args.facemodel, bfm_path=args.bfm_path, n_vertices=args.n_vertices)
    cfg = PackConfig(
        input=args.input, out=args.out, layout=args.layout, size=args.size,
        splits=parse_fractions(args.splits), seed=args.seed,
        yaw_deg=tuple(float(v) for v in args.yaw.split(",")), max_count=args.max_count,
        image_format=args.image_format, scan_units=args.scan_units, lm3d_units=args.lm3d_units,
        workers=args.workers, facemodel=facemodel, layout_options=options,
        landmarks=args.landmarks, accept_ibug_68=args.accept_ibug_68, landmarker=args.landmarker,
        largest_face=args.largest_face,
    )
    try:
        if cfg.landmarks != "files":  # fail before reading anything: extra missing, terms not accepted
            from dfmvr.detect import require
            require(landmarks68=cfg.landmarker == "ibug68", accept_noncommercial=cfg.accept_ibug_68,
                    mesh=cfg.landmarker == "mesh")
        summary = pack(cfg, progress=not args.no_progress)
    except (RootBusyError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return report(summary, args)


def report(summary, args: argparse.Namespace) -> int:
    """A packer's ending: the summary's lines, its JSON at ``--summary-json``, and the exit code
    (0 when something was packed, 1 when nothing could be)."""
    for line in summary.lines():
        print(line)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(asdict(summary), indent=1))
    if summary.packed == 0:
        print(f"nothing packed from {args.input} (layout {args.layout})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
