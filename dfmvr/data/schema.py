"""The shard schema and its codec: one sample (:class:`Sample`) to and from the tar entries
webdataset groups by key (docs/design.md "Shard schema"; the entries are listed in
:mod:`dfmvr.data.shards`). Every check names the sample and the entry it refuses."""

from __future__ import annotations

import io
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import cv2
import numpy as np



SCHEMA_VERSION = 1
"""Version written by this code."""
SUPPORTED_SCHEMA_VERSIONS = (1,)
"""Versions this code reads."""
VIEWS = ("left", "front", "right")
"""View order everywhere (yaw -45, 0, +45 degrees by default)."""
PARSING_VIEWS = ("image",)
"""The one view of a face-parsing sample (``image.png`` or ``.jpg``, ``mask.png``): the shards
``python -m sharding.pack_parsing`` writes from CelebAMask-HQ or LaPa for the parse net."""
N_LANDMARKS = 68
N_CLASSES = 10
IMAGE_FORMATS = ("png", "jpg")
MANIFEST_NAME = "manifest.json"
EVAL_ENTRIES = ("gt.npz",)
"""Entries only evaluation reads (the ground-truth mesh, 85% of a synthetic 224 px triplet's
bytes): :class:`dfmvr.data.writer.ShardWriter` puts them in the shard's evaluation companion
(:func:`eval_companion_url`), so a training stream never fetches them."""
MANIFEST_FORMAT = "dfmvr-shards"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


def eval_companion_url(shard_url: str) -> str:
    """Where a shard's evaluation companion lives: ``train-000000.tar`` -> ``train-000000.eval.tar``
    beside it (the manifest lists it as the shard's ``eval``)."""
    if not shard_url.endswith(".tar"):
        raise ValueError(f"{shard_url}: expected a shard URL ending in .tar")
    return shard_url[: -len(".tar")] + ".eval.tar"


# --------------------------------------------------------------------------- samples


@dataclass(kw_only=True, slots=True)
class Sample:
    """One capture of one subject: three views, their masks and landmarks, optional 3D truth.

    ``images`` and ``masks`` map a view name (``VIEWS``) to an array; ``lmk2d`` is in view
    order left, front, right.
    """

    subject: str
    """Subject id (letters, digits, ``_``, ``-``; no dots: webdataset splits keys at the first dot)."""
    capture: str
    """Capture id within the subject (same characters as ``subject``)."""
    images: dict[str, np.ndarray]
    """View -> uint8 [S, S, 3] RGB."""
    masks: dict[str, np.ndarray] | None
    """View -> uint8 [S, S] parsing classes 0..9, or None when the source has none."""
    lmk2d: np.ndarray
    """float32 [3, 68, 2] iBUG landmarks in pixels (x right, y down), views left, front, right."""
    lmk3d: np.ndarray | None = None
    """float32 [K, 3] sparse 3D landmarks in face-model units (decimetres), front-view frame."""
    gt: dict | None = None
    """Ground truth mesh or scan: ``{"vertices": float32 [N, 3], "faces": int32 [F, 3], "units": "dm"}``."""
    coeffs: np.ndarray | None = None
    """float32 [269] true coefficients (synthetic data)."""
    meta: dict = field(default_factory=dict)
    """``yaw_deg`` (3 numbers), ``source`` and anything JSON-serialisable; ``schema_version`` is added on write."""
    image_format: str = "png"
    """Encoding of the RGB views: ``png`` (lossless) or ``jpg``."""

    @property
    def key(self) -> str:
        """``{subject}-{capture}``: the webdataset key."""
        return f"{self.subject}-{self.capture}"

    @property
    def image_size(self) -> int:
        """Side ``S`` of the (square) views."""
        return int(self.images[VIEWS[0]].shape[0])

    def validate(self) -> None:
        """Check every entry's type, shape and values.

        Raises:
            ValueError: naming the sample key, the entry, what was expected and what was found.
        """
        for name, value in (("subject", self.subject), ("capture", self.capture)):
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise ValueError(
                    f"sample {self.subject!r}/{self.capture!r}: {name} must be a non-empty string of "
                    f"letters, digits, '_' or '-' (no dots), got {value!r}"
                )
        key = self.key
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"sample {key}: image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if not isinstance(self.images, dict) or set(self.images) != set(VIEWS):
            got = sorted(self.images) if isinstance(self.images, dict) else type(self.images).__name__
            raise ValueError(f"sample {key}: images must have exactly the views {list(VIEWS)}, got {got}")
        size = None
        for view in VIEWS:
            image = self.images[view]
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"sample {key}: images[{view!r}] must be uint8 [S, S, 3], got {describe_array(image)}")
            if image.shape[0] != image.shape[1]:
                raise ValueError(f"sample {key}: images[{view!r}] must be square, got {image.shape[:2]}")
            if size is None:
                size = image.shape[0]
            elif image.shape[0] != size:
                raise ValueError(
                    f"sample {key}: images[{view!r}] is {image.shape[0]} px, expected {size} px like images['{VIEWS[0]}']"
                )
        if self.masks is not None:
            if not isinstance(self.masks, dict) or set(self.masks) != set(VIEWS):
                got = sorted(self.masks) if isinstance(self.masks, dict) else type(self.masks).__name__
                raise ValueError(f"sample {key}: masks must be None or have exactly the views {list(VIEWS)}, got {got}")
            for view in VIEWS:
                mask = self.masks[view]
                if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.shape != (size, size):
                    raise ValueError(
                        f"sample {key}: masks[{view!r}] must be uint8 [{size}, {size}], got {describe_array(mask)}"
                    )
                if mask.size and int(mask.max()) >= N_CLASSES:
                    raise ValueError(
                        f"sample {key}: masks[{view!r}] holds class {int(mask.max())}, expected 0..{N_CLASSES - 1}"
                    )
        _check_float_array(key, "lmk2d", self.lmk2d, (len(VIEWS), N_LANDMARKS, 2))
        if self.lmk3d is not None:
            _check_float_array(key, "lmk3d", self.lmk3d, (None, 3))
        if self.coeffs is not None:
            _check_float_array(key, "coeffs", self.coeffs, (None,))
        if self.gt is not None:
            _check_gt(key, self.gt)
        if not isinstance(self.meta, dict):
            raise ValueError(f"sample {key}: meta must be a dict, got {type(self.meta).__name__}")
        yaw = self.meta.get("yaw_deg")
        if yaw is not None and (len(yaw) != len(VIEWS) or not all(math.isfinite(float(y)) for y in yaw)):
            raise ValueError(f"sample {key}: meta['yaw_deg'] must be {len(VIEWS)} finite numbers, got {yaw!r}")
        try:
            json.dumps(self.meta)
        except TypeError as exn:
            raise ValueError(f"sample {key}: meta must be JSON-serialisable: {exn}") from None


def describe_array(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {list(value.shape)}"
    return type(value).__name__


def _check_float_array(key: str, name: str, value: Any, shape: tuple[int | None, ...]) -> None:
    expected = "[" + ", ".join("K" if s is None else str(s) for s in shape) + "]"
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim != len(shape):
        raise ValueError(f"sample {key}: {name} must be a float array {expected}, got {describe_array(value)}")
    for want, got in zip(shape, value.shape):
        if (want is None and got < 1) or (want is not None and got != want):
            raise ValueError(f"sample {key}: {name} must have shape {expected}, got {list(value.shape)}")
    if not np.isfinite(value).all():
        bad = int((~np.isfinite(value)).sum())
        raise ValueError(f"sample {key}: {name} holds {bad} non-finite values (NaN or inf), expected finite numbers")


def _check_gt(key: str, gt: dict) -> None:
    if not isinstance(gt, dict) or "vertices" not in gt or "faces" not in gt:
        got = sorted(gt) if isinstance(gt, dict) else type(gt).__name__
        raise ValueError(f"sample {key}: gt must be a dict with 'vertices' and 'faces' (and 'units'), got {got}")
    _check_float_array(key, "gt['vertices']", np.asarray(gt["vertices"]), (None, 3))
    faces = np.asarray(gt["faces"])
    if faces.dtype.kind not in "iu" or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"sample {key}: gt['faces'] must be an integer array [F, 3], got {describe_array(faces)}")
    n = len(gt["vertices"])
    if faces.size and (faces.min() < 0 or faces.max() >= n):
        raise ValueError(
            f"sample {key}: gt['faces'] indexes vertices {int(faces.min())}..{int(faces.max())}, expected 0..{n - 1}"
        )


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_image(key: str, entry: str, image: np.ndarray, image_format: str) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)  # OpenCV encodes BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else []
    ok, encoded = cv2.imencode("." + image_format, image, params)
    if not ok:
        raise ValueError(f"sample {key}: could not encode {entry} as {image_format}")
    return encoded.tobytes()


def encode_sample(sample: Sample) -> dict[str, Any]:
    """Encode a sample into a webdataset dict (``__key__`` plus one ``bytes`` value per entry).

    Raises:
        ValueError: when the sample does not validate (see :meth:`Sample.validate`).
    """
    sample.validate()
    key = sample.key
    out: dict[str, Any] = {"__key__": key}
    for view in VIEWS:
        entry = f"{view}.{sample.image_format}"
        out[entry] = encode_image(key, entry, sample.images[view], sample.image_format)
        if sample.masks is not None:
            out[f"{view}.mask.png"] = encode_image(key, f"{view}.mask.png", sample.masks[view], "png")
    out["lmk2d.npy"] = _npy_bytes(np.asarray(sample.lmk2d, dtype=np.float32))
    if sample.lmk3d is not None:
        out["lmk3d.npy"] = _npy_bytes(np.asarray(sample.lmk3d, dtype=np.float32))
    if sample.coeffs is not None:
        out["coeffs.npy"] = _npy_bytes(np.asarray(sample.coeffs, dtype=np.float32))
    if sample.gt is not None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            vertices=np.asarray(sample.gt["vertices"], dtype=np.float32),
            faces=np.asarray(sample.gt["faces"], dtype=np.int32),
            units=np.array(str(sample.gt.get("units", "dm"))),
        )
        out["gt.npz"] = buffer.getvalue()
    meta = dict(sample.meta)
    meta.update(subject=sample.subject, capture=sample.capture, schema_version=SCHEMA_VERSION)
    out["meta.json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return out


def sample_where(wds_dict: dict) -> str:
    key = wds_dict.get("__key__", "<no key>")
    url = wds_dict.get("__url__")
    return f"sample {key}" + (f" in {url}" if url else "")


MAX_IMAGE_SIDE = 4096
"""Largest side an image entry may declare when the caller gives no expected size: a small
file that declares 16k x 16k pixels is refused from its header, never decoded."""


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` an encoded PNG or JPEG declares in its header, or None when the header
    cannot be read (cv2 then refuses the bytes)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data) and data[i] == 0xFF:
            marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
            i += 2 + length
    return None


def decode_image(wds_dict: dict, entry: str, *, color: bool, size: int | None = None) -> np.ndarray:
    data = wds_dict[entry]
    declared = image_header_size(data)
    if declared is not None:
        w, h = declared
        if size is not None and (w, h) != (size, size):
            raise ValueError(f"{sample_where(wds_dict)}: entry {entry!r} declares {w} x {h} px; the manifest says "
                             f"{size} x {size} (refused before decoding)")
        if max(w, h) > MAX_IMAGE_SIDE:
            raise ValueError(f"{sample_where(wds_dict)}: entry {entry!r} declares {w} x {h} px, more than "
                             f"{MAX_IMAGE_SIDE} (refused before decoding)")
    # RGB straight from the decoder (OpenCV >= 4.10): the BGR -> RGB copy was 0.15 ms of a view's 0.85
    flag = cv2.IMREAD_COLOR_RGB if color else cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag) if len(data) else None
    if image is None:
        raise ValueError(f"{sample_where(wds_dict)}: entry {entry!r} ({len(data)} bytes) is not a decodable image")
    if color:
        return image
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"{sample_where(wds_dict)}: entry {entry!r} must be a single-channel uint8 PNG, got {describe_array(image)}")
    return image


def _decode_npy(wds_dict: dict, entry: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(wds_dict[entry]), allow_pickle=False)
    except Exception as exn:
        raise ValueError(f"{sample_where(wds_dict)}: entry {entry!r} is not a readable .npy array: {exn}") from None



def decode_sample(wds_dict: dict, *, image_size: int | None = None) -> Sample:
    """Inverse of :func:`encode_sample` (the dict as webdataset's tar reader groups it).

    ``image_size``: the manifest's side; an image entry whose header declares another size is
    refused before it is decoded (without it, any side above :data:`MAX_IMAGE_SIDE` is).

    Raises:
        ValueError: naming the key (and shard URL when known), the entry and what was expected:
            a missing view, an undecodable image, an unreadable array, a malformed ``meta.json``
            (bad JSON, nesting too deep, values of the wrong type) or a sample that does not
            validate. Every malformed input ends here as a ValueError, whatever the decoder raised.
    """
    with malformed_as_value_error(sample_where(wds_dict)):
        return _decode_sample(wds_dict, image_size)


@contextmanager
def malformed_as_value_error(where: str) -> Iterator[None]:
    """Turn what a malformed sample makes decoders raise (wrong types, nesting too deep, missing
    keys, ...) into a ValueError naming ``where``, so that every reader skips, names and counts it."""
    try:
        yield
    except ValueError:
        raise
    except (TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError, OSError) as exn:
        raise ValueError(f"{where}: malformed sample ({type(exn).__name__}: {exn!s:.200})") from None


def _decode_sample(wds_dict: dict, image_size: int | None) -> Sample:
    where = sample_where(wds_dict)
    if "meta.json" not in wds_dict:
        raise ValueError(f"{where}: missing entry 'meta.json' (has {sorted(k for k in wds_dict if not k.startswith('__'))})")
    try:
        meta = json.loads(wds_dict["meta.json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ValueError(f"{where}: entry 'meta.json' is not valid JSON: {exn}") from None
    if not isinstance(meta, dict) or "subject" not in meta or "capture" not in meta:
        raise ValueError(f"{where}: meta.json must be an object with 'subject' and 'capture', got {meta!r:.200}")
    images: dict[str, np.ndarray] = {}
    image_format = None
    for view in VIEWS:
        found = [fmt for fmt in IMAGE_FORMATS if f"{view}.{fmt}" in wds_dict]
        if not found:
            raise ValueError(
                f"{where}: missing entry '{view}.png' (or '{view}.jpg'); a sample needs all views {list(VIEWS)}"
            )
        image_format = found[0]
        images[view] = decode_image(wds_dict, f"{view}.{image_format}", color=True, size=image_size)
    masks = None
    mask_entries = [f"{view}.mask.png" for view in VIEWS]
    present = [entry for entry in mask_entries if entry in wds_dict]
    if present:
        if len(present) != len(VIEWS):
            missing = sorted(set(mask_entries) - set(present))
            raise ValueError(f"{where}: missing mask entries {missing} (masks are all-or-none)")
        masks = {view: decode_image(wds_dict, f"{view}.mask.png", color=False, size=image_size) for view in VIEWS}
    if "lmk2d.npy" not in wds_dict:
        raise ValueError(f"{where}: missing entry 'lmk2d.npy' (float32 [3, 68, 2])")
    lmk2d = _decode_npy(wds_dict, "lmk2d.npy")
    lmk3d = _decode_npy(wds_dict, "lmk3d.npy") if "lmk3d.npy" in wds_dict else None
    coeffs = _decode_npy(wds_dict, "coeffs.npy") if "coeffs.npy" in wds_dict else None
    gt = None
    if "gt.npz" in wds_dict:
        try:
            with np.load(io.BytesIO(wds_dict["gt.npz"]), allow_pickle=False) as npz:
                gt = {"vertices": npz["vertices"], "faces": npz["faces"], "units": str(npz["units"]) if "units" in npz else "dm"}
        except Exception as exn:
            raise ValueError(f"{where}: entry 'gt.npz' must hold 'vertices' and 'faces' arrays: {exn}") from None
    subject, capture = str(meta.pop("subject")), str(meta.pop("capture"))
    sample = Sample(
        subject=subject,
        capture=capture,
        images=images,
        masks=masks,
        lmk2d=lmk2d,
        lmk3d=lmk3d,
        gt=gt,
        coeffs=coeffs,
        meta=meta,
        image_format=image_format or "png",
    )
    try:
        sample.validate()
    except ValueError as exn:
        raise ValueError(f"{where}: {exn}") from None
    return sample



def check_split(split: str) -> None:
    """A split name names shard files: letters, digits or '_'."""
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split must be letters, digits or '_' (it names the shard files), got {split!r}")
