"""Reading shards: a shard's samples as webdataset groups them by key, from local files or S3,
optionally joined with companion shards' entries (the evaluation companion's ground truth, the
parse net's cached masks) and without the entries a reader never decodes (:func:`without_gt`)."""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import webdataset

from dfmvr.data import storage

_logger = logging.getLogger(__name__)



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
                  select_files=None, companions: Sequence[str] = ()) -> Iterator[Iterator[dict]]:
    """The one reader of shards: opens ``url`` (a streaming S3 body or a local file; nothing
    is written to disk) and yields an iterator of its raw samples in order, as webdataset dicts
    (``__key__``, ``__url__``, ``left.png``, ``meta.json``, ...; :func:`decode_sample` decodes
    one). Used by the training loader, evaluation and reconstruction, mask filling and previews.

    Args:
        handler: webdataset error handler (e.g. :class:`ShardErrors`) for a shard that cannot be
            opened (the iterator is then empty) and for damage inside the tar; None re-raises.
        select_files: entry filter (e.g. :func:`without_gt`).
        companions: companion shards of ``url``: tars holding more entries for some of its
            samples under the same keys (the evaluation companion's ground truth,
            :func:`dfmvr.data.schema.eval_companion_url`; the parse net's masks,
            :mod:`dfmvr.data.parsed_masks`); their entries join each sample's. A companion that
            cannot be opened counts as empty (the handler hears of it): the samples come without.

    Raises:
        FileNotFoundError / dfmvr.data.storage.StorageError: without a handler, when the shard
            cannot be opened.
    """
    handler = handler or webdataset.reraise_exception
    with ExitStack() as stack:
        samples = stack.enter_context(_raw_samples(url, endpoint, handler, select_files))
        for companion in companions:
            samples = _join_by_key(samples, stack.enter_context(_raw_samples(companion, endpoint, handler, None)))
        yield samples


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


JOIN_WINDOW = 64
"""How many companion samples :func:`_join_by_key` reads ahead of the shard: writers keep one order
in a shard and its companions, so a sample's companion entries are the next ones, or a few ahead
when some samples have none."""


def _join_by_key(samples: Iterator[dict], extra: Iterator[dict]) -> Iterator[dict]:
    """Each sample with the entries of the ``extra`` sample of its key, streamed: at most
    :data:`JOIN_WINDOW` companion samples are held (an evaluation companion holds 200 meshes of
    1.2 MiB each; reading it whole would hold them all). A sample whose companion entries are
    not within the window comes without them (writers keep one order, so this happens only to a
    companion out of order, or when the shard lost a run of samples; it is logged once)."""
    pending: dict[str, dict] = {}  # read ahead, in companion order
    warned = False
    for sample in samples:
        key = sample["__key__"]
        while key not in pending and len(pending) < JOIN_WINDOW:
            item = next(extra, None)
            if item is None:
                break
            pending[item["__key__"]] = item
        if key not in pending:
            if len(pending) >= JOIN_WINDOW and not warned:
                warned = True
                _logger.warning("%s: %d companion samples read ahead and none is %s's; the companion is out of "
                                "order or its shard lost samples: samples from here on may come without its entries",
                                sample.get("__url__"), JOIN_WINDOW, key)
            yield sample
            continue
        # one order in both: what was read before this sample's entries belongs to samples passed by
        for older in list(pending):
            if older == key:
                break
            del pending[older]
        more = pending.pop(key)
        yield {**sample, **{k: v for k, v in more.items() if not k.startswith("__")}}
