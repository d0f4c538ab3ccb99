"""Reading shards: a shard's samples as webdataset groups them by key, from local files or S3,
optionally joined with a companion shard's entries (the parse net's cached masks) and without
the entries a reader never decodes (:func:`without_gt`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import webdataset

from dfmvr.data import storage



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

