"""What every packer shares (``sharding.pack``, ``sharding.pack_parsing``): one packer per output
root (:func:`root_lock`: a local exclusive create or an S3 conditional put), the progress record
that makes a packer resumable (:func:`load_progress`, :func:`save_progress` over the one record
every shard-writing job keeps, :mod:`dfmvr.data.progress`: every published shard with its size
and sha256, under a fingerprint of the settings; a rerun with the same settings keeps the intact
ones and packs the rest), the shard writers of a run, one per split, numbered after them and
recording each shard as it is published (:class:`SplitWriters`), its progress bar
(:func:`progress_bar`), loading captures on worker processes in input order
(:func:`ordered_map`), and a packer's ending (:class:`PackedSummary`, :func:`report`).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from dfmvr.config import FaceModelConfig
from dfmvr.data import storage
from dfmvr.data.progress import Recorded, ShardProgress
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


class SplitWriters:
    """The writing half of a packer's run, for a ``with`` block: one ``writer_class`` per split
    (:class:`~dfmvr.data.shards.ShardWriter` or a writer of another sample kind) under ``cfg.out``,
    ``cfg.max_count`` samples a shard, numbered after the shards an interrupted run left
    (``recorded``); every shard a write publishes is recorded at once (:func:`save_progress`, with
    its keys among ``without_masks``, a set the packer may add to as it goes). Leaving the block
    discards the unfinished shards: on an error or Ctrl-C nothing is published half full.

    Attributes:
        per_split: samples per split, the recorded shards' included.
    """

    def __init__(self, cfg, recorded: list[ShardInfo], writer_class: type,
                 without_masks: set[str] | None = None) -> None:
        self.cfg = cfg
        self.recorded = recorded
        self.writer_class = writer_class
        self.without_masks = without_masks if without_masks is not None else set()
        self.writers: dict[str, object] = {}
        self.per_split: dict[str, int] = {}
        for info in recorded:
            self.per_split[info.split] = self.per_split.get(info.split, 0) + info.count

    def __enter__(self) -> "SplitWriters":
        return self

    def __exit__(self, *exc) -> None:
        for writer in self.writers.values():
            writer.abort()

    def write(self, split: str, sample) -> None:
        """Write ``sample`` to ``split``'s writer (made on its first sample)."""
        if split not in self.writers:
            self.writers[split] = self.writer_class(self.cfg.out, split, max_count=self.cfg.max_count,
                                                    endpoint=self.cfg.endpoint,
                                                    start_index=next_index(self.recorded, split))
        writer = self.writers[split]
        before = len(writer.shards)
        writer.write(sample)
        if len(writer.shards) > before:  # this write published the writer's full shard: record it
            published = self.recorded + [i for w in self.writers.values() for i in w.shards]
            save_progress(self.cfg, published, self.without_masks & {k for i in published for k in i.keys})
        self.per_split[split] = self.per_split.get(split, 0) + 1

    def close(self) -> list[ShardInfo]:
        """Publish the last shards; every shard of the run, the recorded ones first."""
        infos = list(self.recorded)
        for writer in self.writers.values():
            infos.extend(writer.close())
        return infos


@contextmanager
def progress_bar(show: bool, *, total: int, unit: str, desc: str) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr for the block when ``show`` (tqdm); yields ``tick()``: one more done."""
    if not show:
        yield lambda: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit=unit, file=sys.stderr, desc=desc) as bar:
        yield lambda: bar.update(1)


@dataclass(kw_only=True, slots=True)
class PackedSummary:
    """What a packer's run did: the fields every packer reports, and its summary lines
    (a packer adds its own fields, :meth:`notes` and :attr:`unit`)."""

    unit: ClassVar[str] = "samples"
    """What the packer packs, plural (the summary lines' noun)."""

    packed: int
    """Packed (those kept from an interrupted run included)."""
    per_split: dict[str, int]
    """Packed per split."""
    skipped: list[tuple[str, str]]
    """``(where, reason)`` of every refused one; the reason names the file and what was expected."""
    manifest: str | None
    """URL of the written manifest (None when nothing was packed)."""
    shards: list[str] = field(default_factory=list)

    def packed_what(self) -> str:
        """The first line's noun (:attr:`unit`, or more precise)."""
        return self.unit

    def notes(self) -> list[str]:
        """Lines of the packer's own, between the count and the skipped ones."""
        return []

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [f"packed {self.packed} {self.packed_what()}: "
               + ", ".join(f"{k} {v}" for k, v in sorted(self.per_split.items()))]
        out.extend(self.notes())
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} {self.unit}:")
            out.extend(f"  {where}: {reason}" for where, reason in self.skipped)
        if self.manifest:
            out.append(f"manifest: {self.manifest}")
        return out


def add_pack_options(p: argparse.ArgumentParser, *, max_count: int, workers_help: str, facemodel_help: str) -> None:
    """The options both packers take (``sharding.pack``, ``sharding.pack_parsing``): input and shard
    root, output size, splits and their seed, samples per shard, image format, worker processes,
    and the face model of the alignment templates (:func:`face_model_from_args`)."""
    p.add_argument("--input", required=True, help="dataset folder")
    p.add_argument("--out", required=True, help="shard root: a directory or s3://bucket/prefix")
    p.add_argument("--size", type=int, default=224, help="output side in pixels")
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions by subject")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject shuffle")
    p.add_argument("--max-count", type=int, default=max_count, help="samples per shard")
    p.add_argument("--image-format", default="png", choices=("png", "jpg"), help="png (lossless) or jpg")
    p.add_argument("--workers", type=int, default=1, help=workers_help)
    p.add_argument("--facemodel", default="procedural", choices=("procedural", "bfm"), help=facemodel_help)
    p.add_argument("--bfm-path", default="", help="BFM_model_front.mat when --facemodel bfm")
    p.add_argument("--n-vertices", type=int, default=4000, help="procedural model size for the templates")


def face_model_from_args(args: argparse.Namespace) -> FaceModelConfig:
    """The face model that :func:`add_pack_options`' options name."""
    return FaceModelConfig(source=args.facemodel, bfm_path=args.bfm_path, n_vertices=args.n_vertices)


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


__all__ = ["LOCK_NAME", "add_pack_options", "add_run_options", "face_model_from_args", "log_to_stderr", "PackedSummary", "RootBusyError", "SplitWriters", "load_progress", "next_index", "ordered_map", "progress_bar", "report",
           "root_lock", "save_progress"]
