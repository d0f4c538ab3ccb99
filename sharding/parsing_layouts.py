"""The face-parsing datasets' layouts, as ``python -m sharding.pack_parsing`` reads them:
CelebAMask-HQ (``CelebA-HQ-img/<id>.jpg``, ``CelebAMask-HQ-mask-anno/<k>/<id:05d>_<part>.png``,
19 parts) and LaPa (``images/``, ``labels/`` with 11 classes, ``landmarks/`` with 106 points):
their class tables onto dfmvr's ten (docs/parsenet.md), finding an input's samples
(:func:`discover_parsing`) and loading one aligned to the model's crop (:func:`load_celebamask_hq`,
:func:`load_lapa`). Every problem is a :class:`LayoutError` or a named skip."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from dfmvr.data.align import estimate_similarity, warp_image, warp_mask
from dfmvr.data.parsing_shards import (
    ParsingSample,
)
from dfmvr.data.transforms import resize_image, resize_masks
from dfmvr.facemodel.model import PARSE_CLASSES
from sharding.layouts import IMAGE_EXTS, InputError, read_image
from sharding.captures import safe_name

_logger = logging.getLogger(__name__)

LAYOUT_NAMES = ("celebamask-hq", "lapa")

# ---------------------------------------------------------------------------------------------
# class tables
#
# Left and right. dfmvr's classes are the subject's own (PARSE_CLASSES; the subject's left is on
# the image's right in a frontal view).
#
# CelebAMask-HQ's l_/r_ are the SUBJECT's: in the official repository
# (github.com/switchablenorms/CelebAMask-HQ, face_parsing/README.md gives the label ids 4 l_eye,
# 5 r_eye, 6 l_brow, 7 r_brow), the label maps MaskGAN_demo/samples/{0..3}.png put l_eye and
# l_brow at x ~ 320-333 of 512 and r_eye, r_brow at x ~ 182-195, on the image's right, in all
# four (frontal photos {0..3}.jpg beside them; commit 3f6c45d). FaRL's CelebAMask-HQ loader
# (github.com/FacePerceiver/FaRL at 3fb4694, farl/datasets/celebamask_hq.py) agrees: it names
# l_brow/l_eye "rb"/"re" in the convention of its LaPa loader, whose "lb"/"le" are LaPa's
# image-left labels. So CelebAMask-HQ maps straight: l_brow -> left_brow.
#
# LaPa's "left" is the IMAGE's (the subject's right): the dataset's own figure
# (github.com/JDAI-CV/lapa-dataset at 271ab6d: sample.png, colours from colormap.txt, label names
# from labelmap.txt) paints label 2 "left eyebrow" and 4 "left eye" on the image's left in all seven
# panels with visible brows.
# FaRL keeps LaPa's names "lb"/"le" for labels 2/4 and names CelebAMask-HQ's l_brow/l_eye the
# opposite, "rb"/"re" (above), and aligns LaPa with landmarks [104, 105, 54, 84, 90] onto a
# template whose first eye is the image-left one (github.com/FacePerceiver/facer at ddd35c7,
# facer/transform.py, _standard_face_pts: x 196 < 316). So LaPa swaps: 2 -> right_brow (3),
# 3 -> left_brow (2), 4 -> right_eye (5), 5 -> left_eye (4).

CELEBAMASK_HQ_CLASSES: dict[str, int] = {
    "skin": 1,
    "nose": 6,
    # eyeglasses: what is under the frame and lenses is unknown; around the eyes it is mostly skin.
    # Glasses are drawn before the eyes and brows, which win where they overlap (DRAW_ORDER).
    "eye_g": 1,
    "l_eye": 4,
    "r_eye": 5,
    "l_brow": 2,
    "r_brow": 3,
    # the face model covers the face only: ears, hair, headwear, jewellery, neck and clothes are
    # background for the parse net (the renderer never draws them)
    "l_ear": 0,
    "r_ear": 0,
    "mouth": 7,
    "u_lip": 8,
    "l_lip": 9,
    "hair": 0,
    "hat": 0,
    "ear_r": 0,
    "neck_l": 0,
    "neck": 0,
    "cloth": 0,
}
"""CelebAMask-HQ part name (the ``<part>`` of ``<id:05d>_<part>.png``; 18 parts, background is what
no part covers) -> dfmvr parsing class."""

CELEBAMASK_HQ_DRAW_ORDER: tuple[str, ...] = (
    "neck", "cloth", "neck_l", "l_ear", "r_ear", "ear_r",  # around the face
    "skin", "eye_g",                                        # the face, glasses on it
    "hair", "hat",                                          # occluders of skin and glasses
    "nose", "mouth", "u_lip", "l_lip",                      # features: small parts last
    "l_brow", "r_brow", "l_eye", "r_eye",
)
"""Order the overlapping part masks are painted in; a later part wins where two overlap. Large
regions first and the small features last, so eyes, brows and lips win over skin, glasses and
hair (the dataset's own g_mask.py paints hair, hat and clothes over everything instead)."""

LAPA_LABELS = ("background", "skin", "left eyebrow", "right eyebrow", "left eye", "right eye", "nose",
               "upper lip", "inner mouth", "lower lip", "hair")
"""LaPa's 11 label names by id (its labelmap.txt); left/right the image's."""

LAPA_CLASSES: dict[int, int] = {
    0: 0,   # background
    1: 1,   # skin
    2: 3,   # "left eyebrow" is image-left: the subject's right brow
    3: 2,   # "right eyebrow": the subject's left brow
    4: 5,   # "left eye": the subject's right eye
    5: 4,   # "right eye": the subject's left eye
    6: 6,   # nose
    7: 8,   # upper lip
    8: 7,   # inner mouth -> mouth
    9: 9,   # lower lip
    10: 0,  # hair: not in the face model
}
"""LaPa label id -> dfmvr parsing class."""

LAPA_N_LANDMARKS = 106
LAPA_FIVE_POINTS = (104, 105, 54, 84, 90)
"""LaPa's 106-point indices (0-based) of :data:`dfmvr.data.align.FIVE_POINT_NAMES`: the subject's
right eye centre (104, image left), left eye centre (105), nose tip (54), the subject's right
mouth corner (84, image left) and left corner (90).

Source: FaRL (github.com/FacePerceiver/FaRL at 3fb4694, farl/datasets/prepare.py) aligns LaPa with exactly
``landmarks[[104, 105, 54, 84, 90]]`` onto a (left eye, right eye, nose, left mouth, right mouth)
image-space template; its LaPa loader (farl/datasets/lapa.py, ``draw_landmarks``) draws 0-32 as the
contour, 33-41 and 42-50 as the brows, 51-54 the nose bridge down to the tip, 55-65 the lower nose,
66-73 and 75-82 the eyes with pupils 74 and 83, 84-95 the outer lips and 96-103 the inner lips;
an independent LaPa eye-crop script (``LAPA106DataSet``) takes eye corners 66/70 and 75/79 and
eye centres 104/105. That is NOT the "106-point" order of Face++/JD-landmark that is often
quoted (its nose tip is 46 and its eyes 52-63): we follow the indices code that reads LaPa's
files uses. We did not find a primary LaPa document listing the indices."""

CELEBAMASK_HQ_MASK_SIZE = 512
"""Side of every CelebAMask-HQ part mask."""
CELEBAMASK_HQ_SOURCE = "celebamaskhq"
LAPA_SOURCE = "lapa"
LAPA_SPLIT_DIRS = ("train", "val", "test")
IDENTITY_FILE = "identity_CelebA.txt"
HQ_MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"


def class_table(layout: str) -> dict[str, str]:
    """The layout's class mapping by name, for docs and the manifest: source label -> dfmvr class."""
    if layout == "celebamask-hq":
        return {part: PARSE_CLASSES[cls] for part, cls in CELEBAMASK_HQ_CLASSES.items()}
    if layout == "lapa":
        return {f"{i} {LAPA_LABELS[i]}": PARSE_CLASSES[cls] for i, cls in LAPA_CLASSES.items()}
    raise ValueError(f"layout: expected one of {list(LAYOUT_NAMES)}, got {layout!r}")


_LAPA_LUT = np.zeros(256, np.uint8)
for _label, _cls in LAPA_CLASSES.items():
    _LAPA_LUT[_label] = _cls


# ---------------------------------------------------------------------------------------------
# discovery


class LayoutError(ValueError):
    """The input folder does not have the layout's structure (a bad argument, not a bad sample)."""


@dataclass(kw_only=True, slots=True)
class ParsingSource:
    """One image and its annotation files as found on disk (``None`` where nothing was found).

    Args:
        source, id: the sample key's parts (``{source}-{id}``).
        subject: identity for the split (the key when unknown).
        image: the photo, or None (``expected_image`` says where it was looked for).
        parts: CelebAMask-HQ: part name -> mask file.
        label: LaPa: the label map.
        landmarks: LaPa: the 106-point file.
        split: the split fixed by the layout's folders, else None (assigned by subject).
        problems: what discovery found wrong (an unknown part name...), each naming the file.
        root: the input folder (file names in the meta are relative to it).
    """

    source: str
    id: str
    subject: str
    image: Path | None
    expected_image: Path
    root: Path
    parts: dict[str, Path] = field(default_factory=dict)
    label: Path | None = None
    expected_label: Path | None = None
    landmarks: Path | None = None
    expected_landmarks: Path | None = None
    split: str | None = None
    problems: list[str] = field(default_factory=list)
    identity: str | None = None

    @property
    def key(self) -> str:
        return f"{self.source}-{self.id}"

    @property
    def where(self) -> str:
        """The file named in the skipped list."""
        return str(self.image or self.expected_image)


_CELEBA_IMAGE = re.compile(r"^(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)
_CELEBA_MASK = re.compile(r"^(\d+)_(.+)\.png$", re.IGNORECASE)


def read_celeba_identities(mapping: Path, identities: Path) -> dict[int, str]:
    """CelebA-HQ image id -> CelebA identity, from ``CelebA-HQ-to-CelebA-mapping.txt`` (``idx
    orig_idx orig_file`` rows after a header) and CelebA's ``identity_CelebA.txt`` (``file identity``).

    Raises:
        LayoutError: a malformed row, naming the file and line.
    """
    by_file: dict[str, str] = {}
    for number, line in enumerate(identities.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise LayoutError(f"{identities}:{number}: expected '<file> <identity>', got {line!r}")
        by_file[parts[0]] = parts[1]
    out: dict[int, str] = {}
    for number, line in enumerate(mapping.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or not parts[0].isdigit():
            continue  # the header row
        if len(parts) != 3:
            raise LayoutError(f"{mapping}:{number}: expected 'idx orig_idx orig_file', got {line!r}")
        identity = by_file.get(parts[2])
        if identity is not None:
            out[int(parts[0])] = identity
    return out


def discover_celebamask_hq(root: Path, *, identities: str | None = None) -> list[ParsingSource]:
    """Every image id under ``root`` in the CelebAMask-HQ layout, sorted by id.

    Args:
        root: the dataset folder.
        identities: CelebA's ``identity_CelebA.txt`` (default: that file in ``root`` when present).

    Raises:
        LayoutError: ``root`` lacks ``CelebA-HQ-img/`` or ``CelebAMask-HQ-mask-anno/``.
    """
    img_dir, anno_dir = root / "CelebA-HQ-img", root / "CelebAMask-HQ-mask-anno"
    for folder in (img_dir, anno_dir):
        if not folder.is_dir():
            raise LayoutError(f"{root}: no {folder.name}/ folder; the celebamask-hq layout is CelebA-HQ-img/<id>.jpg "
                              "and CelebAMask-HQ-mask-anno/<id // 2000>/<id:05d>_<part>.png")
    images: dict[int, Path] = {}
    ignored = 0
    for path in sorted(img_dir.iterdir()):
        match = _CELEBA_IMAGE.match(path.name)
        if match is None:
            ignored += 1
            continue
        images[int(match.group(1))] = path
    parts: dict[int, dict[str, Path]] = {}
    problems: dict[int, list[str]] = {}
    for folder in sorted(p for p in anno_dir.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            match = _CELEBA_MASK.match(path.name)
            if match is None:
                ignored += 1
                continue
            index, part = int(match.group(1)), match.group(2)
            if part not in CELEBAMASK_HQ_CLASSES:
                problems.setdefault(index, []).append(
                    f"{path}: unknown part {part!r} in the mask file name; expected <id:05d>_<part>.png with "
                    f"a part of {sorted(CELEBAMASK_HQ_CLASSES)}")
                continue
            parts.setdefault(index, {})[part] = path
    if ignored:
        _logger.info("celebamask-hq: ignored %d files under %s not named like the layout's images or masks",
                     ignored, root)
    identity_of: dict[int, str] = {}
    identity_file = Path(identities) if identities else root / IDENTITY_FILE
    mapping_file = root / HQ_MAPPING_FILE
    if identity_file.is_file() and mapping_file.is_file():
        identity_of = read_celeba_identities(mapping_file, identity_file)
        _logger.info("celebamask-hq: identities of %d images from %s and %s: splits by identity",
                     len(identity_of), mapping_file.name, identity_file)
    elif identities:
        raise LayoutError(f"--identities {identities}: needs {identity_file} and {mapping_file}; "
                          f"found {[str(p) for p in (identity_file, mapping_file) if p.is_file()]}")
    else:
        _logger.info("celebamask-hq: no %s and %s in %s: every image is its own subject for the splits",
                     IDENTITY_FILE, HQ_MAPPING_FILE, root)
    out = []
    for index in sorted(set(images) | set(parts) | set(problems)):
        sample_id = str(index)
        key = f"{CELEBAMASK_HQ_SOURCE}-{sample_id}"
        identity = identity_of.get(index)
        out.append(ParsingSource(
            source=CELEBAMASK_HQ_SOURCE, id=sample_id,
            subject=f"celeba_id{safe_name(identity)}" if identity is not None else key,
            image=images.get(index), expected_image=img_dir / f"{index}.jpg", root=root,
            parts=parts.get(index, {}), problems=problems.get(index, []), identity=identity,
            expected_label=anno_dir / str(index // 2000) / f"{index:05d}_<part>.png",
        ))
    return out


def discover_lapa(root: Path) -> list[ParsingSource]:
    """Every image under ``root`` in the LaPa layout (flat, or in ``train``/``val``/``test`` folders
    whose split is kept), sorted by split folder and name.

    Raises:
        LayoutError: no ``images/`` folder (in ``root`` or its split folders), or one without
            ``labels/`` and ``landmarks/`` beside it.
    """
    groups = [(root / name, name) for name in LAPA_SPLIT_DIRS if (root / name / "images").is_dir()]
    if not groups:
        if not (root / "images").is_dir():
            raise LayoutError(f"{root}: no images/ folder (nor train/images, val/images, test/images); the lapa "
                              "layout is images/<name>.jpg, labels/<name>.png, landmarks/<name>.txt")
        groups = [(root, None)]
    out = []
    for folder, split in groups:
        for sub in ("labels", "landmarks"):
            if not (folder / sub).is_dir():
                raise LayoutError(f"{folder}: has images/ but no {sub}/ folder beside it (the lapa layout has "
                                  "images/, labels/ and landmarks/ side by side)")
        for path in sorted((folder / "images").iterdir()):
            if path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
                continue
            name = path.stem
            label = folder / "labels" / f"{name}.png"
            landmarks = folder / "landmarks" / f"{name}.txt"
            sample_id = safe_name(name)
            out.append(ParsingSource(
                source=LAPA_SOURCE, id=sample_id, subject=f"{LAPA_SOURCE}-{sample_id}",
                image=path, expected_image=path, root=root,
                label=label if label.is_file() else None, expected_label=label,
                landmarks=landmarks if landmarks.is_file() else None, expected_landmarks=landmarks,
                split=split,
            ))
    return out


def discover_parsing(layout: str, root: Path | str, *, identities: str | None = None) -> list[ParsingSource]:
    """The samples under ``root`` for ``layout`` (one of :data:`LAYOUT_NAMES`).

    Raises:
        LayoutError: an unknown layout, a missing folder, or one without the layout's structure.
    """
    root = Path(root)
    if layout not in LAYOUT_NAMES:
        raise LayoutError(f"--layout: expected one of {list(LAYOUT_NAMES)}, got {layout!r}")
    if not root.is_dir():
        raise LayoutError(f"--input {root}: not a directory")
    found = discover_celebamask_hq(root, identities=identities) if layout == "celebamask-hq" else discover_lapa(root)
    _logger.info("layout %s: %d samples under %s", layout, len(found), root)
    return found


# ---------------------------------------------------------------------------------------------
# reading one sample


def read_lapa_landmarks(path: Path) -> np.ndarray:
    """A LaPa landmark file: the count (106) on the first line, then ``x y`` per line.

    Returns:
        ``[106, 2]`` float64 pixels.

    Raises:
        InputError: naming the file: unreadable, a count other than 106, rows that disagree with the
            count, a row that is not two numbers, NaN or infinity.
    """
    try:
        lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exn:
        raise InputError(f"{path}: unreadable landmark file ({exn})") from None
    if not lines or len(lines[0]) != 1 or not lines[0][0].isdigit():
        got = " ".join(lines[0]) if lines else "an empty file"
        raise InputError(f"{path}: expected the point count {LAPA_N_LANDMARKS} on the first line, got {got!r}")
    count, rows = int(lines[0][0]), lines[1:]
    if count != LAPA_N_LANDMARKS:
        raise InputError(f"{path}: says {count} landmarks, expected {LAPA_N_LANDMARKS} (LaPa's 106-point scheme)")
    if len(rows) != count:
        raise InputError(f"{path}: says {count} landmarks but holds {len(rows)} rows, expected {count} rows of 'x y'")
    try:
        if any(len(row) != 2 for row in rows):
            raise ValueError("a row is not two numbers")
        points = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError as exn:
        raise InputError(f"{path}: expected {count} rows of 'x y' numbers ({exn})") from None
    if not np.isfinite(points).all():
        raise InputError(f"{path}: landmarks {np.flatnonzero(~np.isfinite(points).all(axis=1)).tolist()} "
                         "are NaN or infinite")
    return points


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def load_celebamask_hq(src: ParsingSource, size: int, image_format: str) -> ParsingSample:
    """Compose, map and resize one CelebAMask-HQ sample.

    Raises:
        InputError: naming the file: a discovery problem, a missing image or masks, an unreadable
            image or mask, a non-square image, a mask not 512 x 512.
    """
    if src.problems:
        raise InputError("; ".join(src.problems))
    if src.image is None:
        raise InputError(f"{src.expected_image}: missing image (its masks {sorted(p.name for p in src.parts.values())} "
                         "have no photo)")
    if not src.parts:
        raise InputError(f"{src.expected_label}: no mask file for image {src.image} (expected at least one, "
                         "e.g. the skin)")
    image = read_image(src.image)
    h, w = image.shape[:2]
    if h != w:
        raise InputError(f"{src.image}: image is {w} x {h} px, expected a square CelebA-HQ image (1024 x 1024)")
    side = CELEBAMASK_HQ_MASK_SIZE
    classes = np.zeros((side, side), np.uint8)
    for part in CELEBAMASK_HQ_DRAW_ORDER:
        path = src.parts.get(part)
        if path is None:
            continue
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise InputError(f"{path}: unreadable mask image")
        if mask.shape != (side, side):
            raise InputError(f"{path}: mask is {mask.shape[1]} x {mask.shape[0]} px, expected {side} x {side} "
                             "(CelebAMask-HQ part masks)")
        classes[mask > 127] = CELEBAMASK_HQ_CLASSES[part]
    meta = {
        "dataset": "CelebAMask-HQ",
        "layout": "celebamask-hq",
        "image_file": _relative(src.image, src.root),
        "parts": sorted(src.parts),
        "original_size": [int(h), int(w)],
    }
    if src.identity is not None:
        meta["identity"] = src.identity
    # image and masks cover the same square, so both are resized to it; nearest keeps classes
    return ParsingSample(source=src.source, id=src.id, subject=src.subject, image=resize_image(image, size),
                         mask=resize_masks(classes[None], size)[0], meta=meta, image_format=image_format)


def load_lapa(src: ParsingSource, size: int, image_format: str, template: np.ndarray) -> ParsingSample:
    """Map and align one LaPa sample to the crop of the ``[5, 2]`` template at ``size`` px.

    Raises:
        InputError: naming the file: a missing label map or landmark file, an unreadable image, a
            label map that is not single-channel, not the image's size or holds ids above 10, a
            landmark file without 106 points, landmarks no similarity can be fitted to.
    """
    if src.label is None:
        raise InputError(f"{src.expected_label}: missing label map for image {src.image}")
    if src.landmarks is None:
        raise InputError(f"{src.expected_landmarks}: missing 106-point landmark file for image {src.image}")
    assert src.image is not None
    image = read_image(src.image)
    h, w = image.shape[:2]
    labels = cv2.imread(str(src.label), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise InputError(f"{src.label}: unreadable label map")
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise InputError(f"{src.label}: expected a single-channel 8-bit label map (LaPa ids 0..10), got "
                         f"{labels.shape[2] if labels.ndim == 3 else 1} channel(s) of {labels.dtype}")
    if labels.shape != (h, w):
        raise InputError(f"{src.label}: label map is {labels.shape[1]} x {labels.shape[0]} px, expected "
                         f"{w} x {h} like its image {src.image.name}")
    if int(labels.max()) > max(LAPA_CLASSES):
        raise InputError(f"{src.label}: holds label {int(labels.max())}, expected LaPa ids 0..{max(LAPA_CLASSES)}")
    points = read_lapa_landmarks(src.landmarks)
    try:
        matrix = estimate_similarity(points[list(LAPA_FIVE_POINTS)], template)
    except ValueError as exn:
        raise InputError(f"{src.landmarks}: cannot align with landmarks {list(LAPA_FIVE_POINTS)} ({exn})") from None
    meta = {
        "dataset": "LaPa",
        "layout": "lapa",
        "image_file": _relative(src.image, src.root),
        "label_file": _relative(src.label, src.root),
        "landmarks_file": _relative(src.landmarks, src.root),
        "original_size": [int(h), int(w)],
        "align": {"matrix": np.round(matrix, 6).tolist(), "landmarks": list(LAPA_FIVE_POINTS),
                  "template": "frontal (yaw 0)"},
    }
    if src.split is not None:
        meta["split_folder"] = src.split
    return ParsingSample(source=src.source, id=src.id, subject=src.subject, image=warp_image(image, matrix, size),
                         mask=warp_mask(_LAPA_LUT[labels], matrix, size), meta=meta, image_format=image_format)
