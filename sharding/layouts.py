"""Input layouts the real-capture packer understands, and readers for their annotation files.

A layout turns a dataset folder into a list of :class:`CaptureSource` records (one per subject
and capture: three view images, a 68-point landmark file per view, optional masks, optional
3D landmarks, optional scan). Discovery never fails on a bad capture: it records what it found
(``None`` where a file is missing) and the packer refuses that capture with a message naming
the file, then goes on with the rest. docs/packing.md describes every layout.

dfmvr ships no face or landmark detector: the 68 landmarks per view must be given as files
beside the images (iBUG ``.pts``, ``.txt`` with one ``x y`` per line, or ``.npy`` [68, 2]).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from dfmvr.facemodel.model import N_PARSE_CLASSES

_logger = logging.getLogger(__name__)

VIEWS = ("left", "front", "right")
DEFAULT_YAW_DEG = (-45.0, 0.0, 45.0)
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
LANDMARK_EXTS = (".pts", ".txt", ".npy")
LM3D_EXTS = (".txt", ".npy")
MESH_EXTS = (".obj", ".ply")
N_LANDMARKS = 68

PIXELFACE_VIEW_DIRS = {"left": "0", "front": "1", "right": "2"}
"""Pixel-Face ``Images/{0,1,2}`` folders. The reference code only fixes view 1 as the front;
0 = left and 2 = right is our assumption (the packer warns when a view's landmarks look like
the opposite yaw; swap with ``--view-dirs``)."""

PIXELFACE_LM3D_DROP = (101, 102, 103, 104, 105)
"""Indices (0-based) dropped from Pixel-Face's 106 3D landmarks to keep 101, as the reference
does with its ``ignore_index_5.npy``. That file is binary and its contents are not published
in text; these five are OUR PLACEHOLDER (the last five), not the reference's values. Pass the
real ones with ``--lm3d-drop`` when you have the file."""

PIXELFACE_LM3D_FILE = "nicp_106_pts.txt"
"""The reference reads ``{split}/{subject}/{capture}/Images/fusion/nicp_106_pts.txt``."""

MULTIPIE_CAMERAS = {"left": "08_0", "front": "05_1", "right": "19_0"}
"""Multi-PIE camera ids per view (the +-45 degree pair and the frontal camera). Which of 08_0
and 19_0 sits on the subject's left is our assumption; override with ``--cameras``."""

BOSPHORUS_POSES = {"left": "YR_R45", "front": "N_N", "right": "YR_L45"}
"""Bosphorus pose codes per view. ``YR_L45`` ("yaw, left, 45") is read as the subject turning
to their own left, which shows the nose towards image right: our yaw +45, the "right" view.
Override with ``--poses``."""


class InputError(ValueError):
    """A capture's input file is missing or unreadable; the message names the file."""


@dataclass(kw_only=True, slots=True)
class ViewFiles:
    """Files of one view; ``None`` where nothing was found (the packer reports it)."""

    image: Path | None
    landmarks: Path | None
    mask: Path | None = None
    expected: str = ""
    """What was looked for, for the error message (e.g. ``DIR/left.{jpg,png}``)."""


@dataclass(kw_only=True, slots=True)
class CaptureSource:
    """One capture (three views) as found on disk.

    Args:
        subject, capture: sample key parts (``{subject}-{capture}``).
        folder: the capture's folder, named in messages and the skipped list.
        views: view name -> :class:`ViewFiles` for ``left``, ``front``, ``right``.
        yaw_deg: nominal yaw per view (left, front, right).
        split: the split fixed by the layout (Pixel-Face folders), or ``None`` (assigned by subject).
        lm3d: optional 3D-landmark file (``[K, 3]``).
        lm3d_drop: indices removed from the 3D landmarks after reading.
        scan: optional ground-truth mesh or point cloud.
        transpose: the stored images are transposed (x and y swapped) and must be turned back.
        source: layout name, recorded in the sample's meta.
    """

    subject: str
    capture: str
    folder: Path
    views: dict[str, ViewFiles]
    yaw_deg: tuple[float, float, float] = DEFAULT_YAW_DEG
    split: str | None = None
    lm3d: Path | None = None
    lm3d_drop: tuple[int, ...] = ()
    scan: Path | None = None
    transpose: bool = False
    source: str = "generic"
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.subject}-{self.capture}"


# ---------------------------------------------------------------------------------------------
# readers


def read_landmarks(path: Path, n_points: int = N_LANDMARKS) -> np.ndarray:
    """Read 2D landmarks from ``.pts`` (iBUG), ``.txt`` (``x y`` per line) or ``.npy`` (``[n, 2]``).

    Returns:
        ``[n_points, 2]`` float64 pixels.

    Raises:
        InputError: unknown extension, unparsable text, wrong count or non-finite values;
            the message names the file.
    """
    path = Path(path)
    ext = path.suffix.lower()
    try:
        if ext == ".npy":
            pts = np.load(path, allow_pickle=False)
        elif ext == ".pts":
            pts = _parse_pts(path)
        elif ext == ".txt":
            pts = read_rows(path, 2)
        else:
            raise InputError(f"{path}: unknown landmark format {ext!r}; expected one of {list(LANDMARK_EXTS)}")
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable landmark file ({e})") from e
    pts = np.asarray(pts)
    if pts.dtype.kind not in "fiu":
        raise InputError(f"{path}: expected numbers, got dtype {pts.dtype}")
    if pts.shape != (n_points, 2):
        raise InputError(f"{path}: expected {n_points} landmarks of (x, y), got shape {list(pts.shape)}")
    pts = pts.astype(np.float64)
    if not np.isfinite(pts).all():
        bad = np.flatnonzero(~np.isfinite(pts).all(axis=1)).tolist()
        raise InputError(f"{path}: landmarks {bad} are NaN or infinite")
    return pts


def _parse_pts(path: Path) -> np.ndarray:
    text = path.read_text()
    header = re.search(r"n_points\s*:\s*(\d+)", text)
    body = re.search(r"\{(.*?)\}", text, re.S)
    if header is None or body is None:
        raise InputError(f"{path}: not an iBUG .pts file (expected 'n_points: N' and a {{ ... }} block)")
    rows = [ln.split() for ln in body.group(1).strip().splitlines() if ln.strip()]
    try:
        pts = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise InputError(f"{path}: unparsable point ({e})") from e
    n = int(header.group(1))
    if pts.ndim != 2 or len(pts) != n:
        raise InputError(f"{path}: header says n_points {n}, the block holds {len(rows)} rows")
    return pts


def read_rows(path: Path, cols: int) -> np.ndarray:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        vals = line.replace(",", " ").split()
        if len(vals) != cols:
            raise InputError(f"{path}:{i}: expected {cols} numbers per line, got {len(vals)}: {line!r}")
        try:
            rows.append([float(v) for v in vals])
        except ValueError as e:
            raise InputError(f"{path}:{i}: unparsable number in {line!r}") from e
    return np.array(rows, dtype=np.float64).reshape(-1, cols)


def read_lm3d(path: Path, drop: tuple[int, ...] = ()) -> np.ndarray:
    """Read 3D landmarks (``.txt`` with ``x y z`` per line, or ``.npy`` ``[K, 3]``), dropping ``drop``.

    Returns:
        ``[K - len(drop), 3]`` float64, in the file's units.
    """
    path = Path(path)
    try:
        pts = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else read_rows(path, 3)
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable 3D-landmark file ({e})") from e
    pts = np.asarray(pts, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) == 0:
        raise InputError(f"{path}: expected 3D landmarks of shape (K, 3), got {list(pts.shape)}")
    if not np.isfinite(pts).all():
        raise InputError(f"{path}: 3D landmarks contain NaN or infinity")
    if drop:
        if max(drop) >= len(pts):
            raise InputError(f"{path}: cannot drop indices {list(drop)} from {len(pts)} 3D landmarks")
        pts = np.delete(pts, list(drop), axis=0)
    return pts


def read_image(path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB, or :class:`InputError` naming the file."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError(f"{path}: unreadable image (missing, truncated or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` uint8 class map with values 0..9 and the image's size, or :class:`InputError`."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise InputError(f"{path}: unreadable mask image")
    if mask.ndim == 3:
        raise InputError(f"{path}: a mask must be a single-channel class map (0..{N_PARSE_CLASSES - 1}), "
                         f"got {mask.shape[2]} channels")
    if mask.shape != tuple(shape):
        raise InputError(f"{path}: mask size {list(mask.shape)} differs from its image {list(shape)}")
    if mask.dtype != np.uint8 or int(mask.max()) >= N_PARSE_CLASSES:
        raise InputError(f"{path}: mask values must be parse classes 0..{N_PARSE_CLASSES - 1}, "
                         f"got dtype {mask.dtype}, max {int(mask.max())}")
    return mask


def read_bnt(path: Path) -> np.ndarray:
    """Bosphorus ``.bnt`` range scan -> ``[P, 3]`` valid points (mm).

    Format (little endian): uint16 rows, uint16 cols, float64 zmin, uint16 name length, the
    image file name, uint32 count, then ``count`` float64 as five columns x, y, z, u, v stored
    column after column; points whose z equals zmin are background.
    """
    data = Path(path).read_bytes()
    try:
        rows, cols = np.frombuffer(data, "<u2", 2, 0)
        zmin = np.frombuffer(data, "<f8", 1, 4)[0]
        name_len = int(np.frombuffer(data, "<u2", 1, 12)[0])
        off = 14 + name_len
        count = int(np.frombuffer(data, "<u4", 1, off)[0])
        vals = np.frombuffer(data, "<f8", count, off + 4)
    except ValueError as e:
        raise InputError(f"{path}: truncated or not a Bosphorus .bnt file ({e})") from e
    if count % 5 or count // 5 != int(rows) * int(cols):
        raise InputError(f"{path}: .bnt holds {count} values for a {rows} x {cols} grid (expected 5 per point)")
    xyzuv = vals.reshape(5, -1).T
    valid = xyzuv[:, 2] != zmin
    return xyzuv[valid, :3].astype(np.float64)


# ---------------------------------------------------------------------------------------------
# discovery


def _first(folder: Path, stem: str, exts: tuple[str, ...]) -> Path | None:
    for ext in exts:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _view_files(folder: Path, stem: str) -> ViewFiles:
    """``{stem}.{png,jpg}``, ``{stem}.{pts,txt,npy}`` and ``{stem}.mask.png`` inside ``folder``."""
    return ViewFiles(
        image=_first(folder, stem, IMAGE_EXTS),
        landmarks=_first(folder, stem, LANDMARK_EXTS),
        mask=_first(folder, f"{stem}.mask", (".png",)),
        expected=f"{folder / stem}.{{png,jpg}} with {stem}.{{pts,txt,npy}}",
    )


def _sorted_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def discover_generic(root: Path, *, yaw_deg: tuple[float, float, float] = DEFAULT_YAW_DEG,
                     **_: object) -> list[CaptureSource]:
    """``ROOT/{subject}/{capture}/{left,front,right}.{jpg,png}`` plus per-view landmark files,
    optional ``{view}.mask.png``, ``lmk3d.{txt,npy}`` and ``scan.{obj,ply}``."""
    out = []
    for subj in _sorted_dirs(root):
        for cap in _sorted_dirs(subj):
            out.append(CaptureSource(
                subject=subj.name, capture=cap.name, folder=cap,
                views={v: _view_files(cap, v) for v in VIEWS},
                yaw_deg=tuple(yaw_deg),
                lm3d=_first(cap, "lmk3d", LM3D_EXTS),
                scan=_first(cap, "scan", MESH_EXTS),
                source="generic",
            ))
    return out


def discover_pixelface(root: Path, *, yaw_deg: tuple[float, float, float] = DEFAULT_YAW_DEG,
                       view_dirs: dict[str, str] | None = None, lm3d_drop: tuple[int, ...] = PIXELFACE_LM3D_DROP,
                       transpose: bool = True, **_: object) -> list[CaptureSource]:
    """``ROOT/{split}/{subject}/{capture:02d}/Images/{0,1,2}/t.jpg`` (see :data:`PIXELFACE_VIEW_DIRS`).

    Landmarks ``t.{pts,txt,npy}`` and optional ``t.mask.png`` sit beside each ``t.jpg``, in the
    stored image's pixel frame. 3D landmarks: ``Images/fusion/nicp_106_pts.txt`` (or the capture
    folder's ``fusion/``); the ground-truth mesh: the first ``*.obj`` under the capture folder
    outside ``Images/{0,1,2}``. The split is the top folder. ``transpose``: the reference turns
    every image by 90 degrees clockwise and mirrors it (together a transpose) before use.
    """
    view_dirs = dict(PIXELFACE_VIEW_DIRS if view_dirs is None else view_dirs)
    out = []
    for split in _sorted_dirs(root):
        for subj in _sorted_dirs(split):
            for cap in _sorted_dirs(subj):
                images = cap / "Images"
                lm3d = None
                for cand in (images / "fusion" / PIXELFACE_LM3D_FILE, cap / "fusion" / PIXELFACE_LM3D_FILE):
                    if cand.is_file():
                        lm3d = cand
                        break
                view_folders = {images / d for d in view_dirs.values()}
                meshes = sorted(p for p in cap.rglob("*.obj") if p.parent not in view_folders)
                out.append(CaptureSource(
                    subject=subj.name, capture=cap.name, folder=cap,
                    views={v: _view_files(images / view_dirs[v], "t") for v in VIEWS},
                    yaw_deg=tuple(yaw_deg), split=split.name,
                    lm3d=lm3d, lm3d_drop=tuple(lm3d_drop) if lm3d is not None else (),
                    scan=meshes[0] if meshes else None,
                    transpose=transpose, source="pixelface",
                ))
    return out


_MULTIPIE_NAME = re.compile(r"^(\d{3})_(\d{2})_(\d{2})_(\d{3})_(\d{2})$")


def discover_multipie(root: Path, *, yaw_deg: tuple[float, float, float] = DEFAULT_YAW_DEG,
                      cameras: dict[str, str] | None = None, **_: object) -> list[CaptureSource]:
    """Multi-PIE: ``ROOT/session{NN}/multiview/{subject}/{recording}/{cam}/{stem}.png``.

    ``{stem}`` is ``{subject}_{session}_{recording}_{cam}_{illum}``.

    ``{cam}`` folders are ``08_0``-style; file names drop the underscore (``080``). One capture
    per (session, recording, illumination) that the three cameras of :data:`MULTIPIE_CAMERAS`
    share; landmarks and masks beside each image as ``{stem}.{pts,txt,npy}``/``{stem}.mask.png``.
    """
    cameras = dict(MULTIPIE_CAMERAS if cameras is None else cameras)
    groups: dict[tuple[str, str], dict[str, dict[str, Path]]] = {}
    sessions = [p for p in _sorted_dirs(root) if p.name.startswith("session")]
    for sess in sessions:
        for subj in _sorted_dirs(sess / "multiview"):
            for rec in _sorted_dirs(subj):
                for view, cam in cameras.items():
                    cam_dir = rec / cam
                    if not cam_dir.is_dir():
                        continue
                    for img in sorted(cam_dir.iterdir()):
                        if img.suffix.lower() not in IMAGE_EXTS or ".mask" in img.name:
                            continue
                        m = _MULTIPIE_NAME.match(img.stem)
                        if m is None:
                            continue
                        capture = f"{sess.name.removeprefix('session')}_{rec.name}_{m.group(5)}"
                        groups.setdefault((subj.name, capture), {}).setdefault(view, {})["image"] = img
    out = []
    for (subject, capture), found in sorted(groups.items()):
        views = {}
        any_img = next(iter(found.values()))["image"]
        rec_dir = any_img.parent.parent
        for v in VIEWS:
            img = found.get(v, {}).get("image")
            if img is None:
                illum = capture.split("_")[-1]
                views[v] = ViewFiles(image=None, landmarks=None, expected=f"{rec_dir / cameras[v]}/*_{illum}.png")
            else:
                vf = _view_files(img.parent, img.stem)
                vf.image = img
                views[v] = vf
        out.append(CaptureSource(subject=subject, capture=capture, folder=rec_dir, views=views,
                                 yaw_deg=tuple(yaw_deg), source="multipie", extra={"cameras": cameras}))
    return out


_BOSPHORUS_NAME = re.compile(r"^(bs\d{3})_([A-Z0-9]+_[A-Z0-9]+)_(\d+)$")


def discover_bosphorus(root: Path, *, yaw_deg: tuple[float, float, float] = DEFAULT_YAW_DEG,
                       poses: dict[str, str] | None = None, **_: object) -> list[CaptureSource]:
    """Bosphorus: ``ROOT/bs{NNN}/bs{NNN}_{pose}_{n}.png`` with the pose codes of :data:`BOSPHORUS_POSES`.

    One capture per subject and take ``n`` of the frontal pose; the side views are the
    subject's ``YR_*45`` images (take 0 when the same take is absent). The scan is the frontal
    image's ``.bnt`` (or ``.xyz``/``.npy`` point cloud, or ``.obj``/``.ply``) beside it, meshed
    by Delaunay triangulation in the x-y plane when it has no faces.
    """
    poses = dict(BOSPHORUS_POSES if poses is None else poses)
    out = []
    for subj in _sorted_dirs(root):
        found: dict[tuple[str, str], Path] = {}
        for img in sorted(subj.iterdir()):
            if img.suffix.lower() not in IMAGE_EXTS or ".mask" in img.name:
                continue
            m = _BOSPHORUS_NAME.match(img.stem)
            if m is not None:
                found[(m.group(2), m.group(3))] = img
        takes = sorted(t for (p, t) in found if p == poses["front"])
        for take in takes:
            views = {}
            for v in VIEWS:
                img = found.get((poses[v], take)) or found.get((poses[v], "0"))
                if img is None:
                    views[v] = ViewFiles(image=None, landmarks=None,
                                         expected=f"{subj / subj.name}_{poses[v]}_{take}.png")
                else:
                    views[v] = _view_files(img.parent, img.stem)
            front = found[(poses["front"], take)]
            scan = _first(front.parent, front.stem, (".bnt", ".xyz", ".npy") + MESH_EXTS)
            out.append(CaptureSource(subject=subj.name, capture=f"{poses['front']}_{take}", folder=subj,
                                     views=views, yaw_deg=tuple(yaw_deg), scan=scan, source="bosphorus",
                                     extra={"poses": poses}))
    return out


LAYOUTS: dict[str, Callable[..., list[CaptureSource]]] = {
    "generic": discover_generic,
    "pixelface": discover_pixelface,
    "multipie": discover_multipie,
    "bosphorus": discover_bosphorus,
}


def discover(layout: str, root: Path, **options: object) -> list[CaptureSource]:
    """The captures under ``root`` for ``layout`` (one of :data:`LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root}: not a directory")
    found = LAYOUTS[layout](root, **options)
    _logger.info("layout %s: %d captures under %s", layout, len(found), root)
    return found


def parse_view_map(text: str, name: str) -> dict[str, str]:
    """``"left=08_0,front=05_1,right=19_0"`` -> dict, every view present (``name`` for messages)."""
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"{name}: expected view=value pairs like left=..,front=..,right=.., got {text!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        out[k] = v
    if set(out) != set(VIEWS):
        raise ValueError(f"{name}: expected exactly the views {list(VIEWS)}, got {sorted(out)}")
    return out


def yaw_sign_check(lmk68: np.ndarray, yaw_deg: float) -> bool:
    """Whether the landmarks' apparent yaw agrees in sign with ``yaw_deg`` (True when |yaw| < 15).

    With positive yaw the nose turns towards image right, so the nose tip (30) lies right of
    the midpoint of the outer eye corners (36, 45) and the jaw's near side shrinks.
    """
    if abs(yaw_deg) < 15.0 or not math.isfinite(yaw_deg):
        return True
    eye_mid = 0.5 * (lmk68[36] + lmk68[45])
    offset = lmk68[30, 0] - eye_mid[0]
    return bool(np.sign(offset) == np.sign(yaw_deg)) or abs(offset) < 1e-6
