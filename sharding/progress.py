"""What every packer shares (``sharding.pack``, ``sharding.pack_parsing``): one packer per output
root (:func:`root_lock`: a local exclusive create or an S3 conditional put), the progress record
that makes a packer resumable (:func:`load_progress`, :func:`save_progress` over the one record
every shard-writing job keeps, :mod:`dfmvr.data.progress`: every published shard with its size
and sha256, under a fingerprint of the settings; a rerun with the same settings keeps the intact
ones and packs the rest), shard numbering that continues after them
(:func:`next_index`), loading captures on worker processes in input order
(:func:`ordered_map`), and a packer's ending (:func:`report`).

``cfg`` is any packer's config with ``out``, ``endpoint`` and ``fingerprint()``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from dfmvr.data import storage
from dfmvr.data.progress import PROGRESS_NAME, Recorded, ShardProgress
from dfmvr.data.shards import ShardInfo

_logger = logging.getLogger(__name__)


LOCK_NAME = ".dfmvr-packing.lock"
"""Held in the output root while a packer writes there: a second packer on the same root fails fast."""


class RootBusyError(RuntimeError):
    """Another packer is writing the same root."""


@contextmanager
def root_lock(out: str, endpoint: str | None):
    """Hold ``out/LOCK_NAME`` for the block: created only if absent (a local exclusive create, or an
    S3 conditional put), removed at the end; a stale lock after a crash is named in the error."""
    from dfmvr.data import storage

    url = storage.join(out, LOCK_NAME)
    note = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode()
    try:
        if storage.is_s3(url):
            bucket, key = storage.split_s3(url)
            storage.s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=note, IfNoneMatch="*")
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
            fd = os.open(url, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "wb") as f:
                f.write(note)
    except FileExistsError:
        raise RootBusyError(_busy_message(url, Path(url).read_text(errors="replace"))) from None
    except Exception as exn:
        if "PreconditionFailed" in str(exn) or "412" in str(exn):
            raise RootBusyError(_busy_message(url, "")) from None
        raise
    try:
        yield
    finally:
        storage.delete(url, endpoint=endpoint)


def _busy_message(url: str, holder: str) -> str:
    return (f"{url}: another packer is writing this root ({holder.strip() or 'holder unknown'}); wait for it, "
            "or delete the lock if no packer is running (a crashed one leaves it)")


def load_progress(cfg) -> tuple[list[ShardInfo], set[str]]:
    """Shards an interrupted run with the same settings published and that are still intact
    (the shard-writing jobs' one record, :class:`dfmvr.data.progress.ShardProgress`), and the
    keys of their captures packed without masks; nothing when there is no record, or one of other
    settings."""
    kept = ShardProgress(cfg.out, cfg.fingerprint(), endpoint=cfg.endpoint).load().values()
    return [r.info for r in kept], {k for r in kept for k in r.extra.get("without_masks", [])}


def save_progress(cfg, infos: list[ShardInfo], without_masks: set[str]) -> None:
    """Record the published shards ``infos``, each with its keys among ``without_masks``."""
    progress = ShardProgress(cfg.out, cfg.fingerprint(), endpoint=cfg.endpoint)
    for info in infos:
        progress.shards[storage.basename(info.url)] = Recorded(
            info=info, extra={"without_masks": sorted(without_masks.intersection(info.keys))})
    progress.save()


def next_index(infos: list[ShardInfo], split: str) -> int:
    indices = [int(m.group(1)) for i in infos if i.split == split
               and (m := re.search(rf"{re.escape(split)}-(\d+)\.tar$", i.url))]
    return max(indices) + 1 if indices else 0


def add_run_options(p: argparse.ArgumentParser, *, progress_bar: bool = True) -> None:
    """The options every sharding command line takes: ``--summary-json`` and ``--no-progress``."""
    p.add_argument("--summary-json", default=None, help="write the summary here as JSON")
    if progress_bar:
        p.add_argument("--no-progress", action="store_true")


def log_to_stderr() -> None:
    """The sharding commands' logging: INFO and up, one line each, on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def report(summary, args: argparse.Namespace) -> int:
    """A packer's ending: the summary's lines, its JSON at ``--summary-json``, and the exit code
    (0 when something was packed, 1 when nothing could be)."""
    for line in summary.lines():
        print(line)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(asdict(summary), indent=1))
    if summary.packed == 0:
        print(f"nothing packed from {args.input} (layout {args.layout})", file=sys.stderr)
        return 1
    return 0


def ordered_map(fn, items: list, *, workers: int, initializer, initargs: tuple, chunksize: int = 4) -> Iterator:
    """``(item, fn(item))`` for every item in input order: in this process (``initializer`` run
    here first) with ``workers <= 1``, else on that many spawned processes, each initialised
    once; the order never depends on the worker count, so neither do the shards."""
    if workers <= 1:
        initializer(*initargs)
        for item in items:
            yield item, fn(item)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                             initargs=initargs) as pool:
        yield from zip(items, pool.map(fn, items, chunksize=chunksize))


__all__ = ["LOCK_NAME", "add_run_options", "log_to_stderr", "PROGRESS_NAME", "RootBusyError", "load_progress", "next_index", "ordered_map", "report",
           "root_lock", "save_progress"]
