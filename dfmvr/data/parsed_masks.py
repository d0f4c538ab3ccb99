"""The mask cache: the parse net's masks of every sample, computed once and kept beside the shards.

The network reads the frozen parse net's masks (the paper's pipeline, ``model.input_masks``),
and the photometric weights and the mask loss's target come from them too. They depend only on
the image and the parse net, so a training run reads them from companion shards instead of
running the parse net on every view of every step::

    <root>/parsed-masks/<parse-net digest>/
        manifest.json        format "dfmvr-parsed-masks": the parse net's digest, the source
                             manifest, one entry per source shard (its sha256, the companion's)
        train-000000.tar     per sample key: left.parsed.png, front.parsed.png, right.parsed.png
        ...                  (uint8 class maps at the shards' size, one companion per source shard)

``<root>`` is the shard root (``data.url``) unless ``data.parsed_masks_root`` names another
(a local directory or ``s3://`` prefix, for a shard root one may not write to). The reader
(:func:`dfmvr.data.shards.shard_samples` with ``companions=``) joins a companion's entries to
its shard's samples by key.

A cache is *current* for a manifest when it was made by the same parse net (its digest names
the folder, :func:`dfmvr.nets.parsenet_digest`) for the same shards (each source shard's sha256
is recorded and compared): another parse net finds no cache, changed shards find a stale one,
and :func:`open_cache` says which. :func:`build_cache` makes one; the training driver calls it
once per job (``dfmvr.train.masks``), before the workers start.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import cv2
import numpy as np
import webdataset

from dfmvr.data import storage
from dfmvr.data.shards import (
    IMAGE_FORMATS,
    VIEWS,
    Manifest,
    ShardErrors,
    malformed_as_value_error,
    publish_file,
    shard_samples,
)

_logger = logging.getLogger(__name__)

CACHE_FORMAT = "dfmvr-parsed-masks"
CACHE_VERSION = 1
CACHE_DIR = "parsed-masks"
"""Folder under the cache root (the shard root by default) that holds one cache per parse net."""
PARSED_ENTRIES = tuple(f"{view}.parsed.png" for view in VIEWS)
"""A companion sample's entries: the parse net's class map of each view."""
MANIFEST_NAME = "manifest.json"


def cache_url(data_url: str, digest: str, root: str = "") -> str:
    """Where the cache of the parse net ``digest`` for the shards at ``data_url`` lives."""
    return storage.join(storage.join(root or data_url, CACHE_DIR), digest)


@dataclass(kw_only=True, slots=True)
class MaskCache:
    """A current mask cache (:func:`open_cache`): where it is and each source shard's companion."""

    url: str
    """The cache's folder (``.../parsed-masks/<digest>``)."""
    digest: str
    """The parse net's digest."""
    companions: dict[str, str] = field(default_factory=dict)
    """Source shard URL -> companion shard URL."""

    @property
    def source(self) -> str:
        """What :class:`dfmvr.data.batch.Batch` records as ``mask_source``: ``parse_net:<digest>``."""
        return f"parse_net:{self.digest}"


def open_cache(manifest: Manifest, digest: str, splits: Iterable[str], *, root: str = "",
               endpoint: str | None = None) -> MaskCache | None:
    """The current cache of parse net ``digest`` for ``splits`` of ``manifest``, or None (and the
    reason logged) when there is none or it was made for other shards.

    Raises:
        ValueError: a cache manifest that is not one (naming it).
    """
    url = cache_url(manifest.root, digest, root)
    found = _read_cache_manifest(url, endpoint)
    if found is None:
        return None
    if found.get("parse_net_digest") != digest:
        raise ValueError(f"{storage.join(url, MANIFEST_NAME)}: made for parse net {found.get('parse_net_digest')!r}, "
                         f"filed under {digest!r}")
    entries = found.get("shards", {})
    companions: dict[str, str] = {}
    for split in splits:
        for shard in manifest.split(split).shards:
            entry = entries.get(shard.name)
            if entry is None:
                _logger.info("mask cache %s: no companion for %s (split %s): stale", url, shard.name, split)
                return None
            if entry.get("source_sha256") != shard.sha256:
                _logger.info("mask cache %s: %s changed since the cache was made (sha256 %s there, %s now): stale",
                             url, shard.name, str(entry.get("source_sha256"))[:12], shard.sha256[:12])
                return None
            companions[shard.url] = storage.join(url, entry["name"])
    return MaskCache(url=url, digest=digest, companions=companions)


def _read_cache_manifest(url: str, endpoint: str | None) -> dict | None:
    path = storage.join(url, MANIFEST_NAME)
    if not storage.exists(path, endpoint=endpoint):
        return None
    try:
        found = json.loads(storage.read_bytes(path, endpoint=endpoint))
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ValueError(f"{path}: not a mask-cache manifest (bad JSON: {exn})") from None
    if not isinstance(found, dict) or found.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: expected format {CACHE_FORMAT!r}, got "
                         f"{found.get('format') if isinstance(found, dict) else type(found).__name__!r}")
    if found.get("version") != CACHE_VERSION:
        raise ValueError(f"{path}: mask-cache version {found.get('version')!r}; this code reads {CACHE_VERSION}")
    return found


Predict = Callable[[np.ndarray], np.ndarray]
"""uint8 RGB views ``[M, S, S, 3]`` -> uint8 class maps ``[M, S, S]`` (the parse net's argmax)."""


@dataclass(kw_only=True, slots=True)
class BuildReport:
    """What :func:`build_cache` did."""

    cache: MaskCache
    samples: int = 0
    """Samples that got masks."""
    skipped: list[dict] = field(default_factory=list)
    """Samples whose views could not be read: ``{"key", "shard", "reason"}`` (training skips them too)."""
    seconds: float = 0.0


def _view_entries(name: str) -> bool:
    """Only the views are read to make masks (no meshes, no landmarks)."""
    entry = name.split(".", 1)[-1] if "." in name else name
    return entry in {f"{view}.{fmt}" for view in VIEWS for fmt in IMAGE_FORMATS}


def _read_views(raw: dict, size: int) -> np.ndarray:
    """uint8 ``[V, S, S, 3]`` RGB of one raw sample; ValueError naming what is wrong."""
    where = f"sample {raw.get('__key__')} in {raw.get('__url__')}"
    views = []
    with malformed_as_value_error(where):
        for view in VIEWS:
            entry = next((f"{view}.{fmt}" for fmt in IMAGE_FORMATS if f"{view}.{fmt}" in raw), None)
            if entry is None:
                raise ValueError(f"{where}: missing entry '{view}.png' (or '{view}.jpg')")
            image = cv2.imdecode(np.frombuffer(raw[entry], np.uint8), cv2.IMREAD_COLOR)
            if image is None or image.shape[:2] != (size, size):
                got = "undecodable" if image is None else f"{image.shape[1]} x {image.shape[0]} px"
                raise ValueError(f"{where}: entry {entry!r} is {got}, expected a {size} x {size} px image")
            views.append(image[..., ::-1])
    return np.stack(views)


def encode_masks(key: str, masks: np.ndarray) -> dict:
    """A companion sample: ``masks`` uint8 ``[V, S, S]`` as :data:`PARSED_ENTRIES` PNGs under ``key``."""
    out = {"__key__": key}
    for entry, mask in zip(PARSED_ENTRIES, masks):
        ok, png = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
        if not ok:
            raise ValueError(f"sample {key}: could not encode {entry}")
        out[entry] = png.tobytes()
    return out


def decode_masks(raw: dict, size: int) -> np.ndarray:
    """The parse net's masks of one joined raw sample: uint8 ``[V, S, S]``.

    Raises:
        ValueError: the companion gave this sample no masks, or masks of another size or classes.
    """
    where = f"sample {raw.get('__key__')} in {raw.get('__url__')}"
    missing = [e for e in PARSED_ENTRIES if e not in raw]
    if missing:
        raise ValueError(f"{where}: the mask cache has no {missing} for it (the parse net could not read it when "
                         "the cache was made)")
    masks = []
    for entry in PARSED_ENTRIES:
        mask = cv2.imdecode(np.frombuffer(raw[entry], np.uint8), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.shape != (size, size) or mask.dtype != np.uint8:
            got = "undecodable" if mask is None else f"{mask.dtype} {list(mask.shape)}"
            raise ValueError(f"{where}: cached mask {entry!r} is {got}, expected uint8 [{size}, {size}]")
        masks.append(mask)
    return np.stack(masks)


def build_cache(manifest: Manifest, predict: Predict, digest: str, splits: Iterable[str], *, root: str = "",
                endpoint: str | None = None, batch_size: int = 64,
                transfer: storage.TransferSettings | None = None, extra: dict | None = None) -> BuildReport:
    """Make the cache of parse net ``digest`` (whose argmax is ``predict``) for ``splits`` of ``manifest``.

    Every source shard gets one companion shard (its samples' masks, in its order); the cache's
    manifest is written last, so a cache that has one is whole. A sample whose views cannot be
    read is skipped and reported (the training loader skips it as well).

    Args:
        batch_size: views per ``predict`` call.
        extra: more to record in the cache manifest (the parse net's file, its mIoU, ...).

    Returns:
        :class:`BuildReport`.
    """
    t0 = time.perf_counter()
    splits = list(dict.fromkeys(splits))
    url = cache_url(manifest.root, digest, root)
    old = _read_cache_manifest(url, endpoint)
    entries: dict[str, dict] = dict(old.get("shards", {})) if old and old.get("parse_net_digest") == digest else {}
    report = BuildReport(cache=MaskCache(url=url, digest=digest))
    for split in splits:
        for shard in manifest.split(split).shards:
            name = os.path.basename(shard.name)
            if any(e["name"] == name for k, e in entries.items() if k != shard.name):
                name = f"{len(entries):06d}-{name}"  # shards of one name in two folders
            entry = entries.get(shard.name)
            if entry is None or entry.get("source_sha256") != shard.sha256:
                count, nbytes, sha256 = _build_companion(shard.url, storage.join(url, name), predict, manifest.image_size,
                                                         endpoint=endpoint, batch_size=batch_size, transfer=transfer,
                                                         report=report)
                entries[shard.name] = {"name": name, "split": split, "count": count, "size": nbytes, "sha256": sha256,
                                       "source_sha256": shard.sha256}
            report.cache.companions[shard.url] = storage.join(url, entries[shard.name]["name"])
    record = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "parse_net_digest": digest,
        "source_manifest": manifest.url, "image_size": manifest.image_size, "splits": splits,
        "entries": list(PARSED_ENTRIES), "shards": entries, "skipped": report.skipped[:1000],
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {}),
    }
    storage.write_bytes(storage.join(url, MANIFEST_NAME), json.dumps(record, indent=1).encode(), endpoint=endpoint,
                        settings=transfer)
    report.seconds = time.perf_counter() - t0
    _logger.info("mask cache %s: %d samples of %s in %.1f s (%d skipped)", url, report.samples, splits,
                 report.seconds, len(report.skipped))
    return report


def _build_companion(source: str, target: str, predict: Predict, size: int, *, endpoint: str | None,
                     batch_size: int, transfer, report: BuildReport) -> tuple[int, int, str]:
    handler = ShardErrors()
    fd, tmp = tempfile.mkstemp(prefix="dfmvr-masks-", suffix=".tar")
    count = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            tar = webdataset.TarWriter(handle, mtime=0)  # mtime 0: the same masks give the same bytes
            keys: list[str] = []
            views: list[np.ndarray] = []

            def flush() -> None:
                nonlocal count
                if not keys:
                    return
                masks = predict(np.concatenate(views)).reshape(len(keys), len(VIEWS), size, size)
                for key, sample_masks in zip(keys, masks):
                    tar.write(encode_masks(key, sample_masks))
                count += len(keys)
                keys.clear()
                views.clear()

            with shard_samples(source, endpoint=endpoint, handler=handler, select_files=_view_entries) as samples:
                for raw in samples:
                    try:
                        views.append(_read_views(raw, size))
                    except ValueError as exn:
                        report.skipped.append({"key": raw.get("__key__"), "shard": source, "reason": str(exn)[:300]})
                        _logger.warning("mask cache: skipping %s", exn)
                        continue
                    keys.append(raw["__key__"])
                    if len(keys) * len(VIEWS) >= batch_size:
                        flush()
                flush()
            for exn in handler.errors:
                report.skipped.append({"key": None, "shard": source, "reason": f"shard damaged: {exn!r:.300}"})
            tar.close()
        nbytes, sha256 = publish_file(tmp, target, endpoint=endpoint, transfer=transfer)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report.samples += count
    return count, nbytes, sha256


__all__ = ["BuildReport", "CACHE_DIR", "CACHE_FORMAT", "MaskCache", "PARSED_ENTRIES", "Predict", "build_cache",
           "cache_url", "decode_masks", "encode_masks", "open_cache"]
