"""Pack face-parsing datasets (CelebAMask-HQ, LaPa) into single-view parsing shards for the parse net.

    python -m sharding.pack_parsing --layout celebamask-hq|lapa --input DIR --out ROOT [--size 224]
        [--splits 0.8,0.1,0.1] [--seed 0] [--limit N] [--image-format png|jpg] [--max-count 1000]
        [--workers 1] [--endpoint URL] [--summary-json PATH]

Layouts (the datasets as their authors distribute them; never shipped with dfmvr, both licensed
for non-commercial research):

``celebamask-hq``
    ``DIR/CelebA-HQ-img/<id>.jpg`` (1024 x 1024, ids 0..29999) and
    ``DIR/CelebAMask-HQ-mask-anno/<k>/<id:05d>_<part>.png`` (``k = id // 2000``; 512 x 512 binary
    masks, white = the part; one file per part present; the 18 part names of
    :data:`CELEBAMASK_HQ_CLASSES`). The faces are already aligned (centred by CelebA-HQ's own
    crop): the image and the composed class map are resized to ``--size``, nothing is warped.
    CelebA-HQ's crop shows the whole head, so its faces are framed a little smaller and lower
    than the model's crop. With ``DIR/CelebA-HQ-to-CelebA-mapping.txt`` and CelebA's
    ``identity_CelebA.txt`` (in DIR, or ``--identities FILE``) the splits are by identity;
    without them every image is its own subject.
``lapa``
    ``DIR/images/<name>.jpg``, ``DIR/labels/<name>.png`` (single-channel, LaPa's 11 classes) and
    ``DIR/landmarks/<name>.txt`` (the count 106, then ``x y`` per line), or the same three
    folders under ``DIR/train``, ``DIR/val``, ``DIR/test``: then LaPa's own split is kept. Each
    image and its label map are aligned to the model's frontal crop by a 5-point similarity
    (eye centres, nose tip, mouth corners: :data:`LAPA_FIVE_POINTS`) onto the frontal template of
    :mod:`dfmvr.data.align` (the face model's mean face at yaw 0), the label map with nearest
    neighbour. LaPa has no identities: every image is its own subject.

Classes are mapped onto dfmvr's ten (:data:`dfmvr.facemodel.model.PARSE_CLASSES`, left/right the
subject's own) by one table per layout (:data:`CELEBAMASK_HQ_CLASSES`, :data:`LAPA_CLASSES`,
:func:`class_table`), recorded in the manifest. Splits: by subject, deterministic from ``--seed``
(:func:`dfmvr.data.splits.assign_splits`), unless the layout fixes them.

Bad input never stops a run: a missing or wrongly sized label file, an unknown part name in a
CelebAMask-HQ mask file name, an unreadable image, a landmark file with the wrong count, ... skip
that one sample with a message naming the file and what was expected; the skipped samples are
counted and listed at the end (and in ``--summary-json``) and the rest is packed. Exit status: 0
when something was packed, 1 when nothing could be, 2 for bad arguments (unknown layout, missing
input folder, a folder without the layout's sub-folders), found before anything is written.

``--out`` may be ``s3://bucket/prefix``. Resumable as ``sharding.pack``: every published shard is
recorded in ``pack-progress.json`` under the root (with a fingerprint of the settings), an
interrupted run publishes nothing partial, and the same command again keeps the recorded shards
that are still intact and packs only the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import cv2
import numpy as np

from dfmvr.config import FaceModelConfig
from dfmvr.data.align import AlignmentTemplate, estimate_similarity, warp_image, warp_mask
from dfmvr.data.parsing_shards import (
    ParsingSample,
    ParsingShardWriter,
    write_parsing_manifest,
)
from dfmvr.data.shards import ShardInfo
from dfmvr.data.splits import assign_splits, parse_fractions
from dfmvr.data.transforms import resize_image, resize_masks
from dfmvr.facemodel.model import PARSE_CLASSES
from sharding.layouts import IMAGE_EXTS, InputError, read_image
from sharding.pack import RootBusyError, load_progress, next_index, report, root_lock, safe_name, save_progress

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


# ---------------------------------------------------------------------------------------------
# config, workers


@dataclass(kw_only=True, slots=True)
class ParsingPackConfig:
    """What to pack and how."""

    input: str
    """Dataset folder."""
    out: str
    """Shard root: a local directory or ``s3://bucket/prefix``."""
    layout: Literal["celebamask-hq", "lapa"]
    """Folder layout of ``input``."""
    size: int = 224
    """Output side in pixels (the loader resizes to the model's size when they differ)."""
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/val/test fractions by subject (LaPa's split folders, when present, are kept instead)."""
    seed: int = 0
    """Seed of the subject shuffle before the split."""
    limit: int = 0
    """Pack only the first ``limit`` samples found (0: all)."""
    image_format: Literal["png", "jpg"] = "png"
    """Encoding of the images in the shards."""
    max_count: int = 1000
    """Samples per shard."""
    workers: int = 1
    """Processes reading the samples (1: in this process)."""
    identities: str = ""
    """CelebAMask-HQ: CelebA's ``identity_CelebA.txt`` (default: in ``input`` when present)."""
    facemodel: FaceModelConfig = field(default_factory=lambda: FaceModelConfig(n_vertices=4000))
    """Face model whose mean face gives LaPa's frontal alignment template."""
    endpoint: str | None = None
    """S3 endpoint (else ``AWS_ENDPOINT_URL``)."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_NAMES:
            raise ValueError(f"layout: expected one of {list(LAYOUT_NAMES)}, got {self.layout!r}")
        if self.size < 16:
            raise ValueError(f"size: expected >= 16 px, got {self.size}")
        if self.limit < 0:
            raise ValueError(f"limit: expected >= 0 (0: everything), got {self.limit}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format: expected 'png' or 'jpg', got {self.image_format!r}")
        if self.max_count < 1 or self.workers < 1:
            raise ValueError(f"max_count and workers: expected >= 1, got {self.max_count}, {self.workers}")
        self.splits = parse_fractions(self.splits)

    def fingerprint(self) -> str:
        """Hash of every setting that decides what the shards hold (not ``workers``, ``endpoint``)."""
        doc = {k: v for k, v in asdict(self).items() if k not in ("workers", "endpoint")}
        doc["packer"] = "pack_parsing"
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_template(cfg: ParsingPackConfig) -> AlignmentTemplate:
    """The frontal alignment template at ``cfg.size`` from ``cfg.facemodel``'s mean face."""
    from dfmvr.facemodel import build_face_model

    return AlignmentTemplate.from_face_model(build_face_model(cfg.facemodel), (0.0,), cfg.size)


_worker_state: dict = {}


def _init_worker(cfg: ParsingPackConfig, template: np.ndarray | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker_state["cfg"] = cfg
    _worker_state["template"] = template


def load_sample(src: ParsingSource, cfg: ParsingPackConfig, template: np.ndarray | None) -> ParsingSample:
    """One sample of ``cfg.layout``, validated; raises InputError/ValueError naming the file."""
    if cfg.layout == "celebamask-hq":
        sample = load_celebamask_hq(src, cfg.size, cfg.image_format)
    else:
        assert template is not None
        sample = load_lapa(src, cfg.size, cfg.image_format, template)
    sample.validate()
    return sample


def _load_one(src: ParsingSource) -> tuple[ParsingSample | None, str | None]:
    try:
        return load_sample(src, _worker_state["cfg"], _worker_state["template"]), None
    except (InputError, ValueError) as exn:
        return None, str(exn)


def _iter_loaded(sources: list[ParsingSource], cfg: ParsingPackConfig, template: np.ndarray | None
                 ) -> Iterator[tuple[ParsingSource, ParsingSample | None, str | None]]:
    if cfg.workers <= 1:
        _init_worker(cfg, template)
        for src in sources:
            yield (src, *_load_one(src))
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(cfg, template)) as pool:
        # map keeps input order, so the shards do not depend on the worker count
        for src, result in zip(sources, pool.map(_load_one, sources, chunksize=8)):
            yield (src, *result)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass(kw_only=True, slots=True)
class ParsingPackSummary:
    """What a run did."""

    layout: str
    packed: int
    """Samples in the shards (those kept from an interrupted run included)."""
    per_split: dict[str, int]
    """Samples per split."""
    skipped: list[tuple[str, str]]
    """``(file, reason)`` of every refused sample; the reason names the file and what was expected."""
    n_skipped: int
    """``len(skipped)``."""
    manifest: str | None
    """URL of the written manifest (None when nothing was packed)."""
    shards: list[str] = field(default_factory=list)
    resumed: int = 0
    """Samples kept from the shards of an interrupted run of the same command."""
    class_table: dict[str, str] = field(default_factory=dict)
    """Source label -> dfmvr class (:func:`class_table`)."""

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"packed {self.packed} {self.layout} samples: "
               + ", ".join(f"{k} {v}" for k, v in sorted(self.per_split.items()))]
        if self.resumed:
            out.append(f"{self.resumed} of them kept from an interrupted run")
        if self.skipped:
            out.append(f"skipped {self.n_skipped} samples:")
            out.extend(f"  {where}: {reason}" for where, reason in self.skipped)
        if self.manifest:
            out.append(f"manifest: {self.manifest}")
        return out


def pack(cfg: ParsingPackConfig, *, sources: list[ParsingSource] | None = None,
         progress: bool = False) -> ParsingPackSummary:
    """Pack every sample under ``cfg.input`` into parsing shards under ``cfg.out`` and write the manifest.

    Args:
        cfg: the run's settings.
        sources: what :func:`discover_parsing` found (discovered here when None).
        progress: show a progress bar on stderr.

    Returns:
        The summary; refused samples are listed with their reasons, the rest packed. No manifest
        is written when nothing could be packed.

    Raises:
        LayoutError: the input is not in the layout (before anything is written).
        sharding.pack.RootBusyError: another packer holds the root's lock.
    """
    if sources is None:
        sources = discover_parsing(cfg.layout, cfg.input, identities=cfg.identities or None)
    with root_lock(cfg.out, cfg.endpoint):
        return _pack(cfg, sources, progress=progress)


def _pack(cfg: ParsingPackConfig, sources: list[ParsingSource], *, progress: bool) -> ParsingPackSummary:
    if cfg.limit:
        sources = sources[:cfg.limit]
    template = build_template(cfg) if cfg.layout == "lapa" else None
    template_points = template.points(0.0) if template is not None else None
    split_of = assign_splits([s.subject for s in sources if s.split is None], cfg.splits, cfg.seed)
    if any(s.split is not None for s in sources):
        _logger.info("layout %s keeps its split folders: %s", cfg.layout,
                     sorted({s.split for s in sources if s.split is not None}))

    # an interrupted run of the same command left shards: keep them, pack the rest
    recorded, _ = load_progress(cfg)
    done = {k for info in recorded for k in info.keys}
    if recorded:
        _logger.info("resuming: %d shards (%d samples) of an interrupted run kept; packing the rest",
                     len(recorded), len(done))
    skipped: list[tuple[str, str]] = []
    per_split: dict[str, int] = {}
    for info in recorded:
        per_split[info.split] = per_split.get(info.split, 0) + info.count
    todo: list[ParsingSource] = []
    seen: dict[str, str] = {}
    for src in sources:
        if src.key in seen:  # two file names that differ only in characters a key cannot hold
            skipped.append((src.where, f"{src.where}: sample key {src.key!r} already taken by {seen[src.key]}; "
                                       "expected unique names (letters, digits, '_' and '-')"))
            continue
        seen[src.key] = src.where
        if src.key not in done:
            todo.append(src)
    writers: dict[str, ParsingShardWriter] = {}
    infos: list[ShardInfo] = list(recorded)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="sample", file=sys.stderr, desc=f"pack {cfg.layout}")
    try:
        for src, sample, error in _iter_loaded(todo, cfg, template_points):
            if bar is not None:
                bar.update(1)
            if sample is None:
                _logger.error("skipping %s: %s", src.where, error)
                skipped.append((src.where, str(error)))
                continue
            split = src.split or split_of[src.subject]
            if split not in writers:
                writers[split] = ParsingShardWriter(cfg.out, split, max_count=cfg.max_count, endpoint=cfg.endpoint,
                                                    start_index=next_index(recorded, split))
            writer = writers[split]
            before = len(writer.shards)
            writer.write(sample)
            if len(writer.shards) > before:  # this write published the writer's full shard: record it
                save_progress(cfg, recorded + [i for w in writers.values() for i in w.shards], set())
            per_split[split] = per_split.get(split, 0) + 1
        for writer in writers.values():
            infos.extend(writer.close())
        if infos:
            save_progress(cfg, infos, set())
    finally:
        if bar is not None:
            bar.close()
        # on an error or Ctrl-C the unfinished shards are discarded, never published half full
        for writer in writers.values():
            writer.abort()
    packed = sum(per_split.values())
    manifest = None
    table = class_table(cfg.layout)
    if infos:
        extra = {
            "source": f"pack_parsing:{cfg.layout}",
            "pack_parsing": {
                "input": str(cfg.input), "layout": cfg.layout, "seed": cfg.seed, "splits": list(cfg.splits),
                "limit": cfg.limit, "image_format": cfg.image_format,
                "split_by": "folders" if any(s.split for s in sources) else (
                    "identity" if any(s.identity for s in sources) else "image"),
            },
            "parse_classes": list(PARSE_CLASSES),
            "class_table": table,
            "skipped": [where for where, _ in skipped],
        }
        if template is not None:
            extra["alignment_template"] = template.to_dict()
            extra["alignment_landmarks"] = list(LAPA_FIVE_POINTS)
        manifest = write_parsing_manifest(cfg.out, infos, image_size=cfg.size, extra=extra, endpoint=cfg.endpoint)
    if skipped:
        _logger.warning("skipped %d samples: %s", len(skipped), ", ".join(where for where, _ in skipped[:20])
                        + (" ..." if len(skipped) > 20 else ""))
    return ParsingPackSummary(layout=cfg.layout, packed=packed, per_split=per_split, skipped=skipped,
                              n_skipped=len(skipped), manifest=manifest, shards=[i.url for i in infos],
                              resumed=len(done), class_table=table)


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding.pack_parsing", description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", required=True, help=f"one of {', '.join(LAYOUT_NAMES)}")
    p.add_argument("--input", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="shard root: a directory or s3://bucket/prefix")
    p.add_argument("--size", type=int, default=224, help="output side in pixels")
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions by subject")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject shuffle")
    p.add_argument("--limit", type=int, default=0, help="pack only the first N samples found (0: all)")
    p.add_argument("--image-format", default="png", help="png (lossless) or jpg")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="processes reading the samples")
    p.add_argument("--identities", default="", help="celebamask-hq: CelebA's identity_CelebA.txt (default: in --input)")
    p.add_argument("--facemodel", default="procedural", help="lapa: face model of the alignment template "
                   "(procedural or bfm)")
    p.add_argument("--bfm-path", default="", help="BFM_model_front.mat when --facemodel bfm")
    p.add_argument("--n-vertices", type=int, default=4000, help="procedural model size for the template")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    p.add_argument("--summary-json", default=None, help="write the summary here as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the packer; returns the exit status (0 packed, 1 nothing packed, 2 bad arguments)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exn:  # argparse: a missing or malformed option (it printed why)
        return int(exn.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = ParsingPackConfig(
            input=args.input, out=args.out, layout=args.layout, size=args.size,
            splits=parse_fractions(args.splits), seed=args.seed, limit=args.limit,
            image_format=args.image_format, max_count=args.max_count, workers=args.workers,
            identities=args.identities,
            facemodel=FaceModelConfig(source=args.facemodel, bfm_path=args.bfm_path, n_vertices=args.n_vertices),
            endpoint=args.endpoint,
        )
        # every argument error surfaces here, before anything is written
        sources = discover_parsing(cfg.layout, cfg.input, identities=cfg.identities or None)
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    try:
        summary = pack(cfg, sources=sources, progress=not args.no_progress)
    except RootBusyError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return report(summary, args)


if __name__ == "__main__":
    sys.exit(main())
