"""Stream a manifest's split from a local directory or S3 into typed batches.

::

    loader = make_loader(cfg.data, "train")          # rank/world size from RANK/WORLD_SIZE
    for batch in loader:                             # dfmvr.data.batch.Batch
        ...
    loader.skipped                                   # bad samples skipped so far, all workers

Pipeline (one ``webdataset.DataPipeline`` per DataLoader worker)::

    shard URLs (manifest) --split_by_node (rank/world size)--> split_by_worker --shard shuffle-->
      [resampled: webdataset.ResampledShards instead of the three steps above]
    open (dfmvr.data.storage.open_read: streaming S3 get_object body or a local file)
      --> tar entries --> samples grouped by key  (webdataset's tar_file_expander / group_by_keys,
                                                  errors go to our handler: logged, counted)
    --> sample shuffle buffer (encoded samples: cheaper to hold than decoded ones)
    --> decode + check + resize + colour jitter + weight maps (bad samples: logged, counted, dropped)
    --> batch + collate --> Batch (carries the worker's skip count since its previous batch)

Bad input never stops the stream. Every skipped sample is counted exactly once:

- a sample that fails to decode or check (missing view, undecodable image, wrong image size,
  NaN landmarks, ...) is counted by the decode stage;
- samples that never come out of a shard (truncated or corrupt tar; tarfile treats a corrupt
  header after the first as the end of the archive, silently) are counted by comparing what a
  shard yielded with the manifest's count for it, when the shard ends.

Worker processes cannot change the parent's counter, so each batch carries its worker's count
and :class:`ShardLoader` adds them up (``loader.skipped``); a worker whose last samples were bad
sends a :class:`SkipReport` instead of a batch at the end of the epoch, which the loader
consumes. In resampled mode the stream is cut after a fixed number of batches, so skips counted
after a worker's last batch of an epoch are not reported (they are still logged).

One job: the training loader (shards to typed batches: decoding, mask-cache joins, shuffling,
resampling, sharding by rank, what it skipped); per-sample reading for the jobs is
:mod:`dfmvr.data.samples`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset

from dfmvr.config import DataConfig
from dfmvr.data import storage  # noqa: F401  (registers the s3 gopen scheme in every worker)
from dfmvr.data.batch import Batch, TripletItem, collate
from dfmvr.data.shards import (
    VIEWS,
    Manifest,
    ShardErrors,
    decode_sample,
    malformed_as_value_error,
    read_manifest,
    shard_samples,
    without_gt,
)
from dfmvr.data.parsed_masks import MaskCache, decode_masks
from dfmvr.data.transforms import color_jitter, resize_masks, resize_views, to_model_range, weight_map

_logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SkipReport:
    """Sent by a worker at the end of its stream when bad samples followed its last batch."""

    skipped: int


@dataclass(kw_only=True, slots=True)
class Tally:
    """Skip count of one worker process (each worker has its own copy); shared by its stages."""

    skipped: int = 0

    def take(self) -> int:
        count, self.skipped = self.skipped, 0
        return count


@dataclass(kw_only=True, slots=True)
class EpochState:
    """Set by the parent before each epoch; workers read it (fork / pickle copies it)."""

    epoch: int = 0


def worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass(kw_only=True, slots=True)
class SplitByRank:
    """Explicit node splitter: shard i goes to rank ``i % world_size``."""

    rank: int
    world_size: int

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for index, item in enumerate(src):
            if index % self.world_size == self.rank:
                yield item


@dataclass(kw_only=True, slots=True)
class EpochSeeded:
    """What a seeded stage holds: the base seed, this rank and the epoch (set by the parent);
    :meth:`epoch_seed` mixes them with the DataLoader worker and the stage's own stream number."""

    seed: int
    rank: int
    state: EpochState

    def epoch_seed(self, stream: int) -> int:
        worker, _ = worker_info()
        return mix_seed(self.seed, self.rank, worker, self.state.epoch, stream)


@dataclass(kw_only=True, slots=True)
class ShardShuffle(EpochSeeded):
    """Shuffle this worker's shard list, differently each epoch (same on every call of an epoch)."""

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        shards = list(src)
        random.Random(self.epoch_seed(1)).shuffle(shards)
        yield from shards


@dataclass(kw_only=True, slots=True)
class WorkerSeed(EpochSeeded):
    """Seed for ``webdataset.ResampledShards``: distinct per rank, worker and epoch."""

    def __call__(self) -> int:
        return self.epoch_seed(2)


class ShardReadError(RuntimeError):
    """Too many shards in a row gave no sample: the data cannot be read (``data.max_bad_shards_in_a_row``)."""


@dataclass(kw_only=True, slots=True)
class TarSamples:
    """Open each shard (streaming), expand its tar, group entries into samples, count losses;
    stop with :class:`ShardReadError` after ``max_bad_in_a_row`` shards in a row without a sample."""

    expected: dict[str, int]
    endpoint: str | None
    tally: Tally
    with_gt: bool = True
    max_bad_in_a_row: int = 16
    companions: dict[str, str] | None = None
    """Shard URL -> its mask-cache companion (:mod:`dfmvr.data.parsed_masks`), joined by key."""
    eval_companions: dict[str, str] | None = None
    """Shard URL -> its evaluation companion (the ground truth), joined by key when ``with_gt``."""

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        bad: list[tuple[str, str]] = []  # (url, first error) of the shards in a row that gave nothing
        for shard in src:
            url = shard["url"]
            expected = self.expected.get(url)
            handler = ShardErrors()
            yielded = 0
            # a shard that cannot be opened is counted like an empty one
            companions = [c for c in ((self.eval_companions or {}).get(url) if self.with_gt else None,
                                      (self.companions or {}).get(url)) if c]
            with shard_samples(url, endpoint=self.endpoint, handler=handler,
                               select_files=None if self.with_gt else without_gt, companions=companions) as samples:
                for sample in samples:
                    yielded += 1
                    yield sample
            if yielded:
                bad.clear()
            else:
                bad.append((url, repr(handler.errors[0])[:300] if handler.errors else "no sample in it"))
                if len(bad) >= self.max_bad_in_a_row:
                    urls = sorted({u for u, _ in bad})
                    raise ShardReadError(
                        f"{len(bad)} shards in a row gave no sample ({len(urls)} distinct: {', '.join(urls[:5])}"
                        f"{' ...' if len(urls) > 5 else ''}); last error: {bad[-1][1]}. The data cannot be read: "
                        "check the bucket, the credentials and the shards; the limit is "
                        "data.max_bad_shards_in_a_row")
            if expected is None:
                continue
            lost = expected - yielded
            if lost > 0 or handler.errors:
                cause = f"; first error: {handler.errors[0]!r:.300}" if handler.errors else ""
                _logger.warning(
                    "shard %s: manifest lists %d samples, read %d; %d lost%s",
                    url, expected, yielded, max(lost, 0), cause,
                )
                self.tally.skipped += max(lost, 0)
            elif lost < 0:
                _logger.warning("shard %s: manifest lists %d samples, read %d (manifest out of date?)", url, expected, yielded)


@dataclass(kw_only=True, slots=True)
class SubjectFilter:
    """Pipeline stage: only the samples of these subjects (read from ``meta.json`` before anything
    is decoded); a sample whose subject cannot be read goes on, for the decoder to name."""

    subjects: frozenset[str]

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for raw in src:
            try:
                subject = json.loads(raw["meta.json"])["subject"]
            except (KeyError, TypeError, ValueError):
                yield raw
                continue
            if subject in self.subjects:
                yield raw


@dataclass(kw_only=True, slots=True)
class SampleShuffle(EpochSeeded):
    """Shuffle buffer over encoded samples, seeded per rank, worker and epoch."""

    bufsize: int

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.bufsize <= 1:
            yield from src
            return
        rng = random.Random(self.epoch_seed(3))
        # start yielding once a quarter of the buffer is full: shorter wait for the first batch
        yield from webdataset.shuffle(self.bufsize, initial=max(1, self.bufsize // 4), rng=rng)(src)


def decode_or_skip(src: Iterator[dict], decode, rng: np.random.Generator, tally: Tally,
                   noun: str = "sample") -> Iterator:
    """``decode(raw, rng)`` of every raw sample; one that raises ValueError is skipped, counted in
    ``tally`` and logged once per shard and key (a decoder stage's loop, for every sample kind)."""
    logged: set[tuple[str, str]] = set()
    for raw in src:
        try:
            item = decode(raw, rng)
        except ValueError as exn:
            tally.skipped += 1
            where = (str(raw.get("__url__")), str(raw.get("__key__")))
            if where not in logged:
                logged.add(where)
                _logger.warning("skipping %s %s in %s: %s", noun, where[1], where[0], exn)
            continue
        yield item


@dataclass(kw_only=True, slots=True)
class TripletDecoder(EpochSeeded):
    """Pipeline stage: decode, check and transform samples; drop and count the bad ones.

    Public so that benchmarks can run exactly the loader's per-sample work without storage.
    """

    shard_size: int
    image_size: int
    color_jitter: float
    weight_map: str
    with_gt: bool
    tally: Tally
    parsed_masks: bool = False
    """The pipeline's masks are the parse net's, from the mask cache's entries joined to each sample
    (a sample without them is skipped); else the sample's own."""
    keep_given: bool = False
    """With ``parsed_masks``: keep the sample's own masks too (``given_masks``)."""

    def __call__(self, src: Iterator[dict]) -> Iterator[TripletItem]:
        yield from decode_or_skip(src, self.decode, np.random.default_rng(self.epoch_seed(4)), self.tally)

    def decode(self, raw: dict, rng: np.random.Generator) -> TripletItem:
        """One webdataset sample -> :class:`TripletItem`; raises ValueError naming what is wrong
        (whatever the malformed input made the decoding or the transforms raise)."""
        with malformed_as_value_error(f"sample {raw.get('__key__')} in {raw.get('__url__')}"):
            return self._decode(raw, rng)

    def _decode(self, raw: dict, rng: np.random.Generator) -> TripletItem:
        unread = set() if self.with_gt else {"gt.npz"}
        if self.parsed_masks and not self.keep_given:
            unread.update(f"{view}.mask.png" for view in VIEWS)
        if unread & raw.keys():
            raw = {name: value for name, value in raw.items() if name not in unread}  # not decoded for nothing
        sample = decode_sample(raw, image_size=self.shard_size)
        if sample.image_size != self.shard_size:
            raise ValueError(
                f"sample {sample.key} in {raw.get('__url__')}: views are {sample.image_size} px, "
                f"the manifest says {self.shard_size} px"
            )
        images = np.stack([sample.images[view] for view in VIEWS])
        given = np.stack([sample.masks[view] for view in VIEWS]) if sample.masks is not None else None
        masks = decode_masks(raw, self.shard_size) if self.parsed_masks else given
        images, masks, lmk2d = resize_views(images, masks, sample.lmk2d.astype(np.float32), self.image_size)
        given = resize_masks(given, self.image_size) if self.parsed_masks and self.keep_given else None
        if self.color_jitter > 0:
            pixels = color_jitter(images.astype(np.float32) * np.float32(1 / 255), self.color_jitter, rng)
            images_model = to_model_range(pixels)
        else:
            images_model = to_model_range(images)
        size = self.image_size
        if masks is not None:
            weights = weight_map(masks, self.weight_map)[:, None]
        else:
            weights = np.ones((len(VIEWS), 1, size, size), dtype=np.float32)
        yaw = sample.meta.get("yaw_deg")
        yaw_deg = np.asarray(yaw, dtype=np.float32) if yaw is not None else np.full(len(VIEWS), np.nan, np.float32)
        gt_vertices = gt_faces = None
        if self.with_gt and sample.gt is not None:
            gt_vertices = np.asarray(sample.gt["vertices"], dtype=np.float32)
            gt_faces = np.asarray(sample.gt["faces"], dtype=np.int64)
        return TripletItem(
            key=sample.key,
            subject=sample.subject,
            images=images_model,
            masks=masks,
            weights=weights,
            lmk2d=lmk2d,
            yaw_deg=yaw_deg,
            lmk3d=sample.lmk3d.astype(np.float32) if sample.lmk3d is not None else None,
            coeffs=sample.coeffs.astype(np.float32) if sample.coeffs is not None else None,
            gt_vertices=gt_vertices,
            gt_faces=gt_faces,
            given_masks=given,
        )


@dataclass(kw_only=True)
class BatchStage:
    """Pipeline stage: group items into batches (:meth:`collate`) carrying the skips counted since
    the previous one; the skips after the last batch come as a :class:`SkipReport`."""

    batch_size: int
    tally: Tally

    def __call__(self, src: Iterator) -> Iterator:
        items: list = []
        for item in src:
            items.append(item)
            if len(items) == self.batch_size:
                yield self.collate(items)
                items = []
        if items:
            yield self.collate(items)
        pending = self.tally.take()
        if pending:
            yield SkipReport(pending)

    def collate(self, items: list):
        raise NotImplementedError


@dataclass(kw_only=True)
class Batcher(BatchStage):
    """:class:`BatchStage` of triplets: :class:`~dfmvr.data.batch.Batch` es."""

    with_gt: bool
    mask_source: str = "given"
    keep_given: bool = False

    def collate(self, items: list[TripletItem]) -> Batch:
        return collate(items, skipped=self.tally.take(), with_gt=self.with_gt, mask_source=self.mask_source,
                       keep_given=self.keep_given)


@dataclass(eq=False)
class ShardLoader:
    """An iterable of :class:`~dfmvr.data.batch.Batch` over one split; see :func:`make_loader`.

    Attributes:
        skipped: bad samples skipped so far (all epochs, all DataLoader workers of this rank).
        epoch: the epoch the next ``iter()`` runs (it then increments); seeds shard order,
            shuffle and jitter. Set it when resuming so a resumed run does not replay epoch 0.
        manifest: the manifest the loader reads.
    """

    pipeline: webdataset.DataPipeline
    _: KW_ONLY
    manifest: Manifest
    split: str
    state: EpochState
    """The pipeline's stages read the epoch from it; ``iter()`` sets it."""
    num_workers: int
    batches_per_epoch: int | None
    pin_memory: bool
    prefetch_factor: int
    multiprocessing_context: str | None = None
    skipped: int = field(default=0, init=False)
    epoch: int = field(default=0, init=False)

    def __len__(self) -> int:
        """Batches per epoch (resampled mode only; a plain pass has no fixed length)."""
        if self.batches_per_epoch is None:
            raise TypeError("ShardLoader has no length in non-resampled mode (bad samples are skipped)")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        self.state.epoch = self.epoch
        self.epoch += 1
        loader = torch.utils.data.DataLoader(
            self.pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False,
            multiprocessing_context=self.multiprocessing_context if self.num_workers > 0 else None,
        )
        for item in loader:
            self.skipped += item.skipped
            if not isinstance(item, SkipReport):
                yield item


def batches_per_worker(epoch_samples: int, batch_size: int, num_workers: int) -> int:
    return max(1, math.ceil(math.ceil(epoch_samples / batch_size) / max(1, num_workers)))


def shard_stages(urls: list[str], *, resampled: bool, epoch_samples: int, seed: int, rank: int | None,
                 world_size: int | None, num_workers: int, shuffle: bool, state: EpochState, where: str) -> list[Any]:
    """The first stages of a loader's pipeline: which shards this rank and DataLoader worker read.

    Resampled: shards drawn with replacement (``webdataset.ResampledShards``), seeded per rank,
    worker and epoch. Otherwise one pass: shard ``i`` to rank ``i % world_size`` (``rank`` None:
    webdataset's ``split_by_node`` from ``RANK``/``WORLD_SIZE``), then split by worker, shuffled
    per epoch when ``shuffle``. Shared by the capture loader and the parsing loader
    (:func:`dfmvr.data.parsing_shards.make_parsing_loader`).
    """
    seed_rank, seed_world = (rank, world_size) if rank is not None else webdataset.utils.pytorch_worker_info()[:2]
    if resampled:
        if epoch_samples < 1:
            raise ValueError(f"epoch_samples: expected >= 1 in resampled mode, got {epoch_samples}")
        return [webdataset.ResampledShards(urls, seed=seed, worker_seed=WorkerSeed(seed=seed, rank=seed_rank, state=state),
                                           deterministic=True)]
    stages: list[Any] = [webdataset.SimpleShardList(urls)]
    stages.append(SplitByRank(rank=rank, world_size=world_size) if rank is not None else webdataset.split_by_node)
    stages.append(webdataset.split_by_worker)
    if shuffle:
        stages.append(ShardShuffle(seed=seed, rank=seed_rank, state=state))
    slots = seed_world * max(1, num_workers)
    if len(urls) < slots:
        _logger.warning(
            "%s: %d shards for %d ranks x %d workers; some workers get no shards "
            "(ranks may see different numbers of batches: use resampled mode for training)",
            where, len(urls), seed_world, max(1, num_workers),
        )
    return stages


def stage_rank(rank: int | None, world_size: int | None) -> int:
    """This process's rank, to seed its stages by: ``rank``, or webdataset's (``RANK``) when None;
    ``rank`` and ``world_size`` are checked to come together and agree (ValueError naming them)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"rank and world_size: give both or neither, got rank={rank}, world_size={world_size}")
    if world_size is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    return rank if rank is not None else webdataset.utils.pytorch_worker_info()[0]


def epoch_pipeline(stages: list[Any], *, resampled: bool, epoch_samples: int, batch_size: int,
                   num_workers: int) -> tuple[webdataset.DataPipeline, int | None]:
    """``(pipeline, batches per epoch)``: the stages chained, cut after the same number of batches
    on every rank in resampled mode (None otherwise: one pass, bad samples skipped)."""
    pipeline = webdataset.DataPipeline(*stages)
    if not resampled:
        return pipeline, None
    per_worker = batches_per_worker(epoch_samples, batch_size, num_workers)
    return pipeline.with_epoch(per_worker), per_worker * max(1, num_workers)


def pipeline_loader(stages: list[Any], *, manifest: Manifest, split: str, state: EpochState, resampled: bool,
                    epoch_samples: int, batch_size: int, num_workers: int, rank: int | None, world_size: int | None,
                    pin_memory: bool, prefetch_factor: int, multiprocessing_context: str | None,
                    kind: str = "loader", sizes: str = "") -> ShardLoader:
    """The end of every loader (:func:`make_loader`, :func:`dfmvr.data.parsing_shards.make_parsing_loader`):
    the stages chained (:func:`epoch_pipeline`), one log line saying what the ``kind`` of loader reads
    (``sizes``: a note after its sample count), and the :class:`ShardLoader` over them."""
    pipeline, batches_per_epoch = epoch_pipeline(stages, resampled=resampled, epoch_samples=epoch_samples,
                                                 batch_size=batch_size, num_workers=num_workers)
    _logger.info(
        "%s %s split %r: %d shards, %d samples%s, %s, batch %d, %d workers%s",
        kind, manifest.url, split, len(manifest.shard_urls(split)), manifest.split(split).count, sizes,
        f"resampled {batches_per_epoch} batches/epoch" if resampled else "one pass",
        batch_size, num_workers,
        f", rank {rank}/{world_size}" if rank is not None else "",
    )
    return ShardLoader(pipeline, manifest=manifest, split=split, state=state, num_workers=num_workers,
                       batches_per_epoch=batches_per_epoch, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                       multiprocessing_context=multiprocessing_context)


def make_loader(
    data_cfg: DataConfig,
    split: str,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    epoch_samples: int | None = None,
    resampled: bool | None = None,
    seed: int = 0,
    with_gt: bool = False,
    batch_size: int | None = None,
    num_workers: int | None = None,
    shuffle: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
    mask_cache: MaskCache | None = None,
    keep_given_masks: bool = False,
    subjects: Iterable[str] | None = None,
) -> ShardLoader:
    """Build the loader for one split of the manifest at ``data_cfg.url``.

    Args:
        data_cfg: :class:`dfmvr.config.DataConfig` (url, image_size, batch_size, num_workers,
            shuffle_buffer, resampled, epoch_samples, color_jitter, weight_map, s3_endpoint).
        split: split name in the manifest.
        rank, world_size: this process's place among the training processes; None reads
            ``RANK``/``WORLD_SIZE`` (set by Ray Train / torchrun) through webdataset.
        epoch_samples: samples per epoch per rank in resampled mode (default ``data_cfg.epoch_samples``).
        resampled: draw shards with replacement and cut each epoch at a fixed number of batches,
            identical on every rank (default ``data_cfg.resampled``). False: one pass over this
            rank's shards (shards split by rank, then by worker).
        seed: base seed of shard order, sample shuffle and colour jitter.
        with_gt: keep ground-truth meshes in the batches (evaluation).
        batch_size, num_workers: override ``data_cfg``.
        shuffle: shuffle shards and samples (False keeps manifest order within each worker).
        pin_memory: pin batches for faster host-to-GPU copies.
        prefetch_factor: batches each worker keeps ready.
        multiprocessing_context: ``"fork"``, ``"spawn"`` or ``"forkserver"`` for the workers
            (None: the platform default). Every stage is picklable and the storage module
            registers the s3 scheme on import, so spawned workers work too.
        mask_cache: the parse net's masks for this split (:func:`dfmvr.data.parsed_masks.open_cache`):
            they become the batches' ``masks`` and weight maps (``mask_source`` says whose);
            None: the samples' own masks.
        keep_given_masks: with ``mask_cache``, carry the samples' own masks as ``given_masks`` too.
        subjects: only these subjects' samples (chosen before decoding: the others cost a read of
            their ``meta.json``); None: all.

    Returns:
        A :class:`ShardLoader` (iterate it once per epoch; ``.skipped`` counts bad samples).

    Raises:
        FileNotFoundError: no manifest at ``data_cfg.url``.
        dfmvr.data.shards.ManifestError: unsupported schema version, unknown split, ...
        ValueError: inconsistent arguments (naming them).
    """
    if not data_cfg.url:
        raise ValueError("data.url: expected a shard root (local directory or s3://bucket/prefix), got ''")
    endpoint = data_cfg.s3_endpoint or None
    manifest = read_manifest(data_cfg.url, endpoint=endpoint)
    urls = manifest.shard_urls(split)
    if not urls:
        raise ValueError(f"{manifest.url}: split {split!r} lists no shards")
    resampled = data_cfg.resampled if resampled is None else resampled
    epoch_samples = data_cfg.epoch_samples if epoch_samples is None else epoch_samples
    batch_size = data_cfg.batch_size if batch_size is None else batch_size
    num_workers = data_cfg.num_workers if num_workers is None else num_workers
    seed_rank = stage_rank(rank, world_size)
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size >= 1 and num_workers >= 0 expected, got {batch_size}, {num_workers}")

    state = EpochState()
    tally = Tally()
    stages = shard_stages(urls, resampled=resampled, epoch_samples=epoch_samples, seed=seed, rank=rank,
                          world_size=world_size, num_workers=num_workers, shuffle=shuffle, state=state,
                          where=f"{manifest.url} split {split!r}")
    if mask_cache is not None:
        uncovered = [u for u in urls if u not in mask_cache.companions]
        if uncovered:
            raise ValueError(f"mask cache {mask_cache.url} covers no companion for {len(uncovered)} shard(s) of split "
                             f"{split!r} ({', '.join(uncovered[:3])}{' ...' if len(uncovered) > 3 else ''}); build it "
                             "for this split")
    stages.append(TarSamples(expected=manifest.shard_counts(split), endpoint=endpoint, tally=tally, with_gt=with_gt,
                              max_bad_in_a_row=data_cfg.max_bad_shards_in_a_row,
                              companions=mask_cache.companions if mask_cache is not None else None,
                              eval_companions=manifest.eval_companions(split)))
    if subjects is not None:
        stages.append(SubjectFilter(subjects=frozenset(subjects)))
    if shuffle:
        stages.append(SampleShuffle(bufsize=data_cfg.shuffle_buffer, seed=seed, rank=seed_rank, state=state))
    stages.append(
        TripletDecoder(
            shard_size=manifest.image_size,
            image_size=data_cfg.image_size,
            color_jitter=data_cfg.color_jitter,
            weight_map=data_cfg.weight_map,
            with_gt=with_gt,
            seed=seed,
            rank=seed_rank,
            state=state,
            tally=tally,
            parsed_masks=mask_cache is not None,
            keep_given=keep_given_masks,
        )
    )
    stages.append(Batcher(batch_size=batch_size, with_gt=with_gt, tally=tally,
                          mask_source=mask_cache.source if mask_cache is not None else "given",
                          keep_given=mask_cache is not None and keep_given_masks))
    return pipeline_loader(stages, manifest=manifest, split=split, state=state, resampled=resampled,
                           epoch_samples=epoch_samples, batch_size=batch_size, num_workers=num_workers, rank=rank,
                           world_size=world_size, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                           multiprocessing_context=multiprocessing_context)


__all__ = ["BatchStage", "Batcher", "EpochState", "ShardLoader", "SkipReport", "SubjectFilter", "Tally", "TripletDecoder",
           "make_loader"]
