"""The ``manifest.json`` beside a shard root: schema version, splits by subject (no subject in
two splits), shard names relative to the root, sample counts, image size and a sha256 per
shard (:func:`write_manifest`); :func:`read_manifest` refuses unknown schema versions, naming
the supported ones."""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


from dfmvr.data import storage
from dfmvr.data.schema import (MANIFEST_FORMAT, MANIFEST_NAME, PARSING_VIEWS, SCHEMA_VERSION,
                                SUPPORTED_SCHEMA_VERSIONS, VIEWS, check_split)
from dfmvr.data.writer import ShardInfo

_logger = logging.getLogger(__name__)

class ManifestError(ValueError):
    """A manifest is missing, malformed, of an unsupported schema, or inconsistent."""



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
    eval_url: str | None = None
    """Its evaluation companion (the entries only evaluation reads, e.g. ``gt.npz``), or None."""
    eval_size: int = 0
    eval_sha256: str = ""

    def files(self) -> list[tuple[str, int, str]]:
        """``(url, size, sha256)`` of the shard and of its evaluation companion when it has one."""
        return [(self.url, self.size, self.sha256)] + (
            [(self.eval_url, self.eval_size, self.eval_sha256)] if self.eval_url else [])


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

    def eval_companions(self, split: str) -> dict[str, str]:
        """Shard URL -> its evaluation companion's URL, for the shards of ``split`` that have one
        (shards written before companions keep their ground truth inside)."""
        return {shard.url: shard.eval_url for shard in self.split(split).shards if shard.eval_url}

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
        check_split(info.split)
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
            for url, expected, _ in info.files():
                stored = storage.size(url, endpoint=endpoint)
                if stored != expected:
                    raise ManifestError(f"{url}: stored size {stored} bytes, expected {expected} bytes; not listing it")
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
                    **({"eval": {"name": _relative_name(root, info.eval_url), "size": info.eval_size,
                                 "sha256": info.eval_sha256}} if info.eval_url else {}),
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


def _resolve(root: str, name: str) -> str:
    return name if storage.is_s3(name) or name.startswith("/") else storage.join(root, name)


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
                full = _resolve(root, name)
                companion = shard.get("eval")
                entries.append(
                    ShardEntry(
                        name=name,
                        url=full,
                        count=int(shard["count"]),
                        size=int(shard["size"]),
                        sha256=str(shard["sha256"]),
                        subjects=list(shard.get("subjects", [])),
                        eval_url=_resolve(root, str(companion["name"])) if companion else None,
                        eval_size=int(companion["size"]) if companion else 0,
                        eval_sha256=str(companion["sha256"]) if companion else "",
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
