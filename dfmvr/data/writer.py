"""Writing shards: :class:`ShardWriter` writes ``{split}-{index:06d}.tar`` under a root (local or
``s3://``), each shard to a local temporary file first, then published (:func:`publish_file`:
renamed locally; verified, retried, multipart on S3), so only whole shards are ever seen. The
entries only evaluation reads (:data:`dfmvr.data.schema.EVAL_ENTRIES`, the ground-truth mesh)
go to the shard's evaluation companion ``{split}-{index:06d}.eval.tar``, published before the
shard itself, so the training stream carries the views, masks and landmarks alone."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset

from dfmvr.config import check_at_least
from dfmvr.data import storage
from dfmvr.data.schema import EVAL_ENTRIES, Sample, check_split, encode_sample, eval_companion_url

_logger = logging.getLogger(__name__)

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
    eval_size: int = 0
    """Bytes of the evaluation companion (:func:`dfmvr.data.schema.eval_companion_url`); 0: none."""
    eval_sha256: str = ""
    """Hex digest of the evaluation companion; empty when there is none."""

    @property
    def eval_url(self) -> str | None:
        """The evaluation companion's URL, or None when the shard has none."""
        return eval_companion_url(self.url) if self.eval_size else None

    def files(self) -> list[tuple[str, int, str]]:
        """``(url, size, sha256)`` of the shard and of its evaluation companion when it has one."""
        return [(self.url, self.size, self.sha256)] + (
            [(self.eval_url, self.eval_size, self.eval_sha256)] if self.eval_url else [])


class _StagedTar:
    """One tar staged in a local temporary file (``mtime`` 0: the same samples give the same bytes
    and so the same sha256), then published or discarded."""

    def __init__(self, prefix: str, tmp_dir: str | None) -> None:
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=".tar", dir=tmp_dir)
        self.file = os.fdopen(fd, "wb")
        self.tar = webdataset.TarWriter(self.file, mtime=0)

    def write(self, encoded: dict[str, Any]) -> int:
        return self.tar.write(encoded)

    def publish(self, url: str, endpoint: str | None, transfer) -> tuple[int, str]:
        self.close()
        return publish_file(self.path, url, endpoint=endpoint, transfer=transfer)

    def close(self) -> None:
        if not self.file.closed:
            self.tar.close()
            self.file.close()

    def discard(self) -> None:
        self.close()
        Path(self.path).unlink(missing_ok=True)


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
        split_eval: put :data:`~dfmvr.data.schema.EVAL_ENTRIES` in the evaluation companion
            (default); False keeps every entry in the shard (the layout before companions).
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
        split_eval: bool = True,
    ) -> None:
        check_split(split)
        check_at_least("max_count", max_count, 1)
        check_at_least("max_size", max_size, 1, " byte")
        check_at_least("start_index", start_index, 0)
        self.root = root
        self.split = split
        self.max_count = max_count
        self.max_size = max_size
        self.endpoint = endpoint
        self.transfer = transfer
        self.tmp_dir = tmp_dir
        self.split_eval = split_eval
        self.shards: list[ShardInfo] = []
        self._index = start_index
        self._tar: _StagedTar | None = None
        self._eval: _StagedTar | None = None
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
        evaluation = {k: encoded[k] for k in EVAL_ENTRIES if k in encoded} if self.split_eval else {}
        if evaluation:
            if self._eval is None:
                self._eval = _StagedTar(f"dfmvr-{self.split}-{self._index:06d}-eval-", self.tmp_dir)
            self._eval.write({"__key__": encoded["__key__"], **evaluation})
            encoded = {k: v for k, v in encoded.items() if k not in evaluation}
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
        self._tar = _StagedTar(f"dfmvr-{self.split}-{self._index:06d}-", self.tmp_dir)
        self._count = 0
        self._size = 0
        self._keys = []
        self._subjects = set()

    def _discard(self) -> None:
        if self._tar is not None:
            _logger.warning(
                "discarding unfinished shard %s (%d samples) after an error", self.url_for(self._index), self._count
            )
        for staged in (self._tar, self._eval):
            if staged is not None:
                staged.discard()
        self._tar = self._eval = None

    def _publish(self) -> None:
        assert self._tar is not None and self._image_size is not None
        url = self.url_for(self._index)
        eval_size, eval_sha256 = 0, ""
        staged, evaluation, self._tar, self._eval = self._tar, self._eval, None, None
        try:
            if evaluation is not None:  # first, so that a published shard always has its companion
                eval_size, eval_sha256 = evaluation.publish(eval_companion_url(url), self.endpoint, self.transfer)
            nbytes, sha256 = staged.publish(url, self.endpoint, self.transfer)
            if evaluation is None:  # none left from an earlier write of this index: a companion beside a shard is its own
                storage.delete(eval_companion_url(url), endpoint=self.endpoint)
        finally:
            staged.discard()
            if evaluation is not None:
                evaluation.discard()
        info = ShardInfo(
            url=url,
            split=self.split,
            count=self._count,
            size=nbytes,
            sha256=sha256,
            image_size=self._image_size,
            keys=list(self._keys),
            subjects=sorted(self._subjects),
            eval_size=eval_size,
            eval_sha256=eval_sha256,
        )
        self.shards.append(info)
        _logger.info("published %s: %d samples, %d bytes (+%d in its evaluation companion)", url, info.count,
                     info.size, eval_size)
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

