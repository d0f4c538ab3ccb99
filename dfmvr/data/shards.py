"""WebDataset shards of multi-view face captures, and the ``manifest.json`` beside them.

One sample is one capture of one subject with all three views (docs/design.md "Shard schema").
Its key is ``{subject}-{capture}`` and its tar entries are::

    {key}.left.png  {key}.front.png  {key}.right.png     RGB uint8 [S, S, 3] (or .jpg)
    {key}.left.mask.png ...                              uint8 class map [S, S] (0..9), optional
    {key}.lmk2d.npy                                      float32 [3, 68, 2] pixels (x right, y down)
    {key}.lmk3d.npy                                      float32 [K, 3] decimetres, optional
    {key}.gt.npz                                         vertices [N, 3], faces [F, 3], units; optional
    {key}.coeffs.npy                                     float32 [269] true coefficients, optional
    {key}.meta.json                                      subject, capture, yaw_deg, source, schema_version

:class:`ShardWriter` writes ``{split}-{index:06d}.tar`` under a root (a local directory or
``s3://bucket/prefix``) with webdataset's ``TarWriter`` and ``ShardWriter`` semantics (a new
shard starts before a sample once the current one holds ``max_count`` samples or ``max_size``
payload bytes). Each shard is written to a local temporary file first, then published with
:func:`dfmvr.data.storage.put_file` (rename locally; verified, retried, multipart upload on S3);
only published shards are returned, so only they can reach the manifest.

:func:`write_manifest` records the schema version, the splits (by subject: no subject may sit
in two splits), shard names relative to the root, sample counts, image size and a sha256 per
shard. :func:`read_manifest` refuses unknown schema versions, naming the supported ones.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np
import webdataset

from dfmvr.data import storage

_logger = logging.getLogger(__name__)

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
MANIFEST_FORMAT = "dfmvr-shards"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


class ManifestError(ValueError):
    """A manifest is missing, malformed, of an unsupported schema, or inconsistent."""


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
        image = np.ascontiguousarray(image[..., ::-1])  # OpenCV encodes BGR
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
    flag = cv2.IMREAD_COLOR if color else cv2.IMREAD_UNCHANGED
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag) if len(data) else None
    if image is None:
        raise ValueError(f"{sample_where(wds_dict)}: entry {entry!r} ({len(data)} bytes) is not a decodable image")
    if color:
        return np.ascontiguousarray(image[..., ::-1])
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"{sample_where(wds_dict)}: entry {entry!r} must be a single-channel uint8 PNG, got {describe_array(image)}")
    return image


def _decode_npy(wds_dict: dict, entry: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(wds_dict[entry]), allow_pickle=False)
    except Exception as exn:
        raise ValueError(f"{sample_where(wds_dict)}: entry {entry!r} is not a readable .npy array: {exn}") from None


class ShardErrors:
    """webdataset exception handler for one shard: keeps every error and continues (the shard
    is read as far as it can be; the caller reports what was lost)."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    def __call__(self, exn: Exception) -> bool:
        self.errors.append(exn)
        return True


def without_gt(fname: str) -> bool:
    """``select_files`` for :func:`shard_samples`: every entry but the ground-truth mesh (the
    biggest entry by far in synthetic shards), which tarfile then skips over without building a
    bytes object."""
    return not fname.endswith(".gt.npz")


@contextmanager
def shard_samples(url: str, *, endpoint: str | None = None, handler=None,
                  select_files=None, companion: str | None = None) -> Iterator[Iterator[dict]]:
    """The one reader of shards: opens ``url`` (a streaming S3 body or a local file; nothing
    is written to disk) and yields an iterator of its raw samples in order, as webdataset dicts
    (``__key__``, ``__url__``, ``left.png``, ``meta.json``, ...; :func:`decode_sample` decodes
    one). Used by the training loader, evaluation and reconstruction, mask filling and previews.

    Args:
        handler: webdataset error handler (e.g. :class:`ShardErrors`) for a shard that cannot be
            opened (the iterator is then empty) and for damage inside the tar; None re-raises.
        select_files: entry filter (e.g. :func:`without_gt`).
        companion: a companion shard of ``url``: a small tar holding more entries for some of its
            samples under the same keys (the parse net's masks, :mod:`dfmvr.data.parsed_masks`);
            its entries join each sample's. A companion that cannot be opened counts as empty
            (the handler hears of it): the samples come without.

    Raises:
        FileNotFoundError / dfmvr.data.storage.StorageError: without a handler, when the shard
            cannot be opened.
    """
    handler = handler or webdataset.reraise_exception
    with _raw_samples(url, endpoint, handler, select_files) as samples:
        if companion is None:
            yield samples
            return
        with _raw_samples(companion, endpoint, handler, None) as extra:
            yield _join_by_key(samples, extra)


@contextmanager
def _raw_samples(url: str, endpoint: str | None, handler, select_files) -> Iterator[Iterator[dict]]:
    try:
        stream = storage.open_read(url, endpoint=endpoint)
    except Exception as exn:  # a missing object, no rights, an outage: the handler decides
        if not handler(exn):
            raise
        yield iter(())
        return
    try:
        files = webdataset.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler,
                                                          select_files=select_files)
        yield webdataset.tariterators.group_by_keys(files, handler=handler)
    finally:
        stream.close()


def _join_by_key(samples: Iterator[dict], extra: Iterator[dict]) -> Iterator[dict]:
    """Each sample with the entries of the ``extra`` sample of its key. A companion is small (a
    few entries per sample) and read whole first, so that a sample either one lacks costs only
    that sample its entries."""
    by_key = {item["__key__"]: item for item in extra}
    for sample in samples:
        more = by_key.get(sample["__key__"])
        if more is not None:
            sample = {**sample, **{k: v for k, v in more.items() if not k.startswith("__")}}
        yield sample


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


# --------------------------------------------------------------------------- writing shards


@dataclass(kw_only=True, slots=True)
class ShardInfo:
    """A published shard."""

    url: str
    """Full URL (local path or ``s3://...``)."""
    split: str
    """Split the shard belongs to."""
    count: int
    """Samples in the shard."""
    size: int
    """Bytes of the tar file."""
    sha256: str
    """Hex digest of the tar file."""
    image_size: int
    """Side ``S`` of every view in the shard."""
    keys: list[str] = field(default_factory=list)
    """Sample keys in write order."""
    subjects: list[str] = field(default_factory=list)
    """Sorted distinct subjects."""


def _check_split(split: str) -> None:
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split must be letters, digits or '_' (it names the shard files), got {split!r}")


class ShardWriter:
    """Write samples of one split into ``{split}-{index:06d}.tar`` shards under ``root``.

    Use as a context manager; :meth:`close` (or leaving the ``with`` block normally) publishes
    the last shard and returns every published :class:`ShardInfo`. When the ``with`` block
    raises, the unfinished shard is discarded; shards already published stay listed in
    :attr:`shards`.

    Args:
        root: local directory or ``s3://bucket/prefix``.
        split: split name (``train``, ``val``, ``test``, ...).
        max_count: at most this many samples per shard.
        max_size: a new shard starts once the current one holds this many payload bytes.
        start_index: index of the first shard (parallel packers use disjoint ranges).
        endpoint: S3 endpoint (else ``AWS_ENDPOINT_URL``).
        transfer: multipart and retry settings for S3 uploads.
        tmp_dir: where shards are staged before publishing (default: the system temp dir).
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        max_count: int = 1000,
        max_size: int = 1 << 30,
        start_index: int = 0,
        endpoint: str | None = None,
        transfer: storage.TransferSettings | None = None,
        tmp_dir: str | None = None,
    ) -> None:
        _check_split(split)
        if max_count < 1:
            raise ValueError(f"max_count: expected >= 1, got {max_count}")
        if max_size < 1:
            raise ValueError(f"max_size: expected >= 1 byte, got {max_size}")
        if start_index < 0:
            raise ValueError(f"start_index: expected >= 0, got {start_index}")
        self.root = root
        self.split = split
        self.max_count = max_count
        self.max_size = max_size
        self.endpoint = endpoint
        self.transfer = transfer
        self.tmp_dir = tmp_dir
        self.shards: list[ShardInfo] = []
        self._index = start_index
        self._tar: webdataset.TarWriter | None = None
        self._file: Any = None
        self._tmp_path: str | None = None
        self._count = 0
        self._size = 0
        self._keys: list[str] = []
        self._subjects: set[str] = set()
        self._image_size: int | None = None
        self._closed = False

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()
            self._closed = True

    def url_for(self, index: int) -> str:
        """URL of shard ``index``."""
        return storage.join(self.root, f"{self.split}-{index:06d}.tar")

    def write(self, sample: Sample) -> None:
        """Append one sample (validated and encoded), starting a new shard when the current is full.

        Raises:
            ValueError: the sample does not validate, or its image size differs from the
                earlier samples of this writer.
            dfmvr.data.storage.StorageError: publishing a full shard failed.
        """
        if self._closed:
            raise ValueError(f"ShardWriter for {self.root} split {self.split!r} is closed")
        self.write_encoded(encode_sample(sample), key=sample.key, subject=sample.subject, image_size=sample.image_size)

    def write_encoded(self, encoded: dict[str, Any], *, key: str, subject: str, image_size: int) -> None:
        """Append one sample already encoded as a webdataset dict (``__key__`` and its entries):
        what :meth:`write` does after encoding, and what writers of other sample kinds call
        (:class:`dfmvr.data.parsing_shards.ParsingShardWriter`).

        Raises:
            ValueError: the writer is closed, or ``image_size`` differs from the earlier samples'.
            dfmvr.data.storage.StorageError: publishing a full shard failed.
        """
        if self._closed:
            raise ValueError(f"ShardWriter for {self.root} split {self.split!r} is closed")
        if self._image_size is None:
            self._image_size = image_size
        elif image_size != self._image_size:
            raise ValueError(
                f"sample {key}: views are {image_size} px, expected {self._image_size} px "
                f"like the earlier samples written to {self.root} split {self.split!r}"
            )
        if self._tar is not None and (self._count >= self.max_count or self._size >= self.max_size):
            self._publish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._size += self._tar.write(encoded)
        self._count += 1
        self._keys.append(key)
        self._subjects.add(subject)

    def close(self) -> list[ShardInfo]:
        """Publish the last shard and return every published shard."""
        if not self._closed:
            self._closed = True
            if self._tar is not None:
                self._publish()
        return list(self.shards)

    def abort(self) -> list[ShardInfo]:
        """Discard the unfinished shard (nothing partial is published); returns the shards
        published before."""
        if not self._closed:
            self._closed = True
            self._discard()
        return list(self.shards)

    def _open(self) -> None:
        fd, path = tempfile.mkstemp(prefix=f"dfmvr-{self.split}-{self._index:06d}-", suffix=".tar", dir=self.tmp_dir)
        self._file = os.fdopen(fd, "wb")
        self._tmp_path = path
        # mtime 0: the same samples give the same bytes and so the same sha256.
        self._tar = webdataset.TarWriter(self._file, mtime=0)
        self._count = 0
        self._size = 0
        self._keys = []
        self._subjects = set()

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
        self._tar = None
        self._file = None

    def _discard(self) -> None:
        if self._tar is not None:
            _logger.warning(
                "discarding unfinished shard %s (%d samples) after an error", self.url_for(self._index), self._count
            )
        self._close_tar()
        if self._tmp_path is not None:
            Path(self._tmp_path).unlink(missing_ok=True)
            self._tmp_path = None

    def _publish(self) -> None:
        assert self._tmp_path is not None and self._image_size is not None
        self._close_tar()
        url = self.url_for(self._index)
        tmp, self._tmp_path = self._tmp_path, None
        nbytes, sha256 = publish_file(tmp, url, endpoint=self.endpoint, transfer=self.transfer)
        info = ShardInfo(
            url=url,
            split=self.split,
            count=self._count,
            size=nbytes,
            sha256=sha256,
            image_size=self._image_size,
            keys=list(self._keys),
            subjects=sorted(self._subjects),
        )
        self.shards.append(info)
        _logger.info("published %s: %d samples, %d bytes", url, info.count, info.size)
        self._index += 1


def publish_file(tmp: str, url: str, *, endpoint: str | None = None,
                 transfer: storage.TransferSettings | None = None) -> tuple[int, str]:
    """Publish a finished local file (a shard) at ``url`` and remove the local file, whatever happens.

    Returns:
        ``(bytes, sha256 hex digest)`` of what was stored.

    Raises:
        dfmvr.data.storage.StorageError: the upload failed (after its retries).
    """
    try:
        digest = hashlib.sha256()
        with open(tmp, "rb") as handle:
            for block in storage.iter_chunks(handle):
                digest.update(block)
        nbytes = storage.put_file(tmp, url, endpoint=endpoint, settings=transfer)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return nbytes, digest.hexdigest()


# --------------------------------------------------------------------------- manifest


@dataclass(kw_only=True, slots=True)
class ShardEntry:
    """A shard as the manifest lists it."""

    name: str
    """Name relative to the manifest's directory (or an absolute URL)."""
    url: str
    """Resolved full URL."""
    count: int
    size: int
    sha256: str
    subjects: list[str] = field(default_factory=list)


@dataclass(kw_only=True, slots=True)
class SplitEntry:
    """One split of a manifest."""

    shards: list[ShardEntry]
    count: int
    subjects: list[str]


@dataclass(kw_only=True, slots=True)
class Manifest:
    """A parsed ``manifest.json``."""

    url: str
    """Where the manifest was read from."""
    root: str
    """Directory or prefix the shard names are relative to."""
    schema_version: int
    image_size: int
    splits: dict[str, SplitEntry]
    extra: dict = field(default_factory=dict)
    views: tuple[str, ...] = VIEWS
    """The views a sample holds: :data:`VIEWS` (captures) or :data:`PARSING_VIEWS` (face parsing)."""

    @property
    def is_parsing(self) -> bool:
        """Single-view face-parsing samples (an image and its mask), not multi-view captures."""
        return self.views == PARSING_VIEWS

    def split(self, name: str) -> SplitEntry:
        """The split ``name``.

        Raises:
            ManifestError: naming the manifest and the splits it has.
        """
        if name not in self.splits:
            raise ManifestError(f"{self.url}: no split {name!r}; the manifest has {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        """Full URLs of the shards of ``split``, in manifest order."""
        return [shard.url for shard in self.split(split).shards]

    def shard_counts(self, split: str) -> dict[str, int]:
        """URL -> sample count for the shards of ``split``."""
        return {shard.url: shard.count for shard in self.split(split).shards}


def _subject_splits(split_subjects: Iterable[tuple[str, Iterable[str]]]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for split, subjects in split_subjects:
        for subject in subjects:
            splits = seen.setdefault(subject, [])
            if split not in splits:
                splits.append(split)
    return {subject: splits for subject, splits in seen.items() if len(splits) > 1}


def _relative_name(root: str, url: str) -> str:
    prefix = root.rstrip("/") + "/"
    if storage.is_s3(root):
        return url[len(prefix) :] if url.startswith(prefix) else url
    try:
        return str(Path(url).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(url).resolve())


def write_manifest(
    root: str,
    shards: list[ShardInfo],
    *,
    image_size: int,
    extra: dict | None = None,
    endpoint: str | None = None,
    verify: bool = True,
    views: tuple[str, ...] = VIEWS,
) -> str:
    """Write ``manifest.json`` under ``root`` listing ``shards``.

    Args:
        root: the shard root (local directory or ``s3://bucket/prefix``).
        shards: published shards (from :meth:`ShardWriter.close`), any number of splits.
        image_size: side ``S`` of every view.
        views: the views a sample holds: :data:`VIEWS` for multi-view captures,
            :data:`PARSING_VIEWS` for single-view face-parsing samples (``sharding.pack_parsing``).
        extra: anything JSON-serialisable to keep beside (generator settings, source, ...).
        endpoint: S3 endpoint.
        verify: check that every shard exists with the recorded size before listing it.

    Returns:
        The manifest's URL.

    Raises:
        ManifestError: a subject in two splits (naming it), a shard listed twice, a shard of a
            different image size, or a shard missing / of the wrong size in storage.
    """
    if not shards:
        raise ManifestError(f"{root}: no shards to list in {MANIFEST_NAME}")
    by_split: dict[str, list[ShardInfo]] = {}
    urls: set[str] = set()
    for info in shards:
        _check_split(info.split)
        if info.url in urls:
            raise ManifestError(f"{info.url}: listed twice in the shards given to write_manifest")
        urls.add(info.url)
        if info.image_size != image_size:
            raise ManifestError(f"{info.url}: views are {info.image_size} px, expected image_size {image_size} px")
        by_split.setdefault(info.split, []).append(info)
    clashes = _subject_splits((info.split, info.subjects) for info in shards)
    if clashes:
        subject, splits = next(iter(sorted(clashes.items())))
        raise ManifestError(
            f"{root}: subject {subject!r} appears in splits {splits}; splits are by subject "
            f"(no subject in two splits); {len(clashes)} subject(s) clash: {sorted(clashes)[:10]}"
        )
    if verify:
        for info in shards:
            stored = storage.size(info.url, endpoint=endpoint)
            if stored != info.size:
                raise ManifestError(f"{info.url}: stored size {stored} bytes, expected {info.size} bytes; not listing it")
    splits: dict[str, Any] = {}
    for split, infos in sorted(by_split.items()):
        infos = sorted(infos, key=lambda info: info.url)
        splits[split] = {
            "count": sum(info.count for info in infos),
            "subjects": sorted({s for info in infos for s in info.subjects}),
            "shards": [
                {
                    "name": _relative_name(root, info.url),
                    "count": info.count,
                    "size": info.size,
                    "sha256": info.sha256,
                    "subjects": info.subjects,
                }
                for info in infos
            ],
        }
    document = {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "root": root,
        "image_size": int(image_size),
        "views": list(views),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "splits": splits,
        "extra": extra or {},
    }
    url = storage.join(root, MANIFEST_NAME)
    storage.write_bytes(url, json.dumps(document, indent=1).encode("utf-8"), endpoint=endpoint)
    _logger.info(
        "wrote %s: %s", url, ", ".join(f"{s} {d['count']} samples in {len(d['shards'])} shards" for s, d in splits.items())
    )
    return url


def manifest_url(root_or_url: str) -> str:
    """``root/manifest.json`` for a root; a URL ending in ``.json`` is returned as is."""
    if root_or_url.endswith(".json"):
        return root_or_url
    return storage.join(root_or_url, MANIFEST_NAME)


def read_manifest(root_or_url: str, *, endpoint: str | None = None) -> Manifest:
    """Read and check a manifest.

    Args:
        root_or_url: the shard root, or the manifest's own URL.
        endpoint: S3 endpoint.

    Raises:
        FileNotFoundError: no manifest at that place (naming the URL).
        ManifestError: malformed JSON, an unsupported ``schema_version`` (the message lists the
            supported versions), or a subject in two splits.
    """
    url = manifest_url(root_or_url)
    raw = storage.read_bytes(url, endpoint=endpoint)
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ManifestError(f"{url}: not valid JSON: {exn}") from None
    if not isinstance(document, dict):
        raise ManifestError(f"{url}: expected a JSON object, got {type(document).__name__}")
    version = document.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ManifestError(
            f"{url}: schema_version {version!r} is not supported; this dfmvr reads schema versions "
            f"{list(SUPPORTED_SCHEMA_VERSIONS)} (re-pack the shards or use the dfmvr that wrote them)"
        )
    root = storage.parent(url)
    try:
        image_size = int(document["image_size"])
        splits: dict[str, SplitEntry] = {}
        for split, body in document["splits"].items():
            entries = []
            for shard in body["shards"]:
                name = str(shard["name"])
                full = name if storage.is_s3(name) or name.startswith("/") else storage.join(root, name)
                entries.append(
                    ShardEntry(
                        name=name,
                        url=full,
                        count=int(shard["count"]),
                        size=int(shard["size"]),
                        sha256=str(shard["sha256"]),
                        subjects=list(shard.get("subjects", [])),
                    )
                )
            splits[split] = SplitEntry(
                shards=entries,
                count=int(body.get("count", sum(e.count for e in entries))),
                subjects=sorted(set(body.get("subjects", [])) | {s for e in entries for s in e.subjects}),
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exn:
        raise ManifestError(
            f"{url}: malformed manifest ({type(exn).__name__}: {exn}); expected image_size and "
            f"splits -> {{name: {{shards: [{{name, count, size, sha256}}]}}}}"
        ) from None
    clashes = _subject_splits((split, entry.subjects) for split, entry in splits.items())
    if clashes:
        subject, in_splits = next(iter(sorted(clashes.items())))
        raise ManifestError(
            f"{url}: subject {subject!r} appears in splits {in_splits}; splits must be by subject "
            f"({len(clashes)} subject(s) clash: {sorted(clashes)[:10]})"
        )
    return Manifest(
        url=url,
        root=root,
        schema_version=int(version),
        image_size=image_size,
        splits=splits,
        extra=dict(document.get("extra", {})),
        views=tuple(document.get("views", VIEWS)),
    )


__all__ = [
    "IMAGE_FORMATS",
    "MANIFEST_NAME",
    "PARSING_VIEWS",
    "Manifest",
    "ManifestError",
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "Sample",
    "ShardEntry",
    "ShardErrors",
    "ShardInfo",
    "ShardWriter",
    "SplitEntry",
    "VIEWS",
    "decode_sample",
    "encode_sample",
    "read_manifest",
    "shard_samples",
    "without_gt",
    "write_manifest",
]
