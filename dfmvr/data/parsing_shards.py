"""Single-view face-parsing shards: one photo and its class map per sample, for the parse net.

::

    loader = make_parsing_loader("s3://bucket/celebamask-hq", "train", image_size=224,
                                 batch_size=16, resampled=True, epoch_samples=20000)
    for images, masks in loader:      # float32 [N, 3, S, S] in [-1, 1], int64 [N, S, S] classes 0..9
        ...
    loader.skipped                    # bad samples skipped so far, all workers

``python -m sharding.pack_parsing`` writes these shards from CelebAMask-HQ or LaPa. A sample's
key is ``{source}-{id}`` and its tar entries are::

    {key}.image.png  (or .jpg)     RGB uint8 [S, S, 3]
    {key}.mask.png                 uint8 [S, S] parsing classes 0..9 (dfmvr.facemodel.model.PARSE_CLASSES)
    {key}.meta.json                source, id, subject, schema_version and the packer's notes

The shards sit under a root beside a ``manifest.json`` of :mod:`dfmvr.data.shards` that says
``views: ["image"]`` (:data:`~dfmvr.data.shards.PARSING_VIEWS`; ``Manifest.is_parsing``), with
the same splits by subject, shard names ``{split}-{index:06d}.tar``, counts and sha256s as the
multi-view captures' manifest. :class:`ParsingShardWriter` is :class:`~dfmvr.data.shards.ShardWriter`
(temporary local tar, then :func:`~dfmvr.data.shards.publish_file`) for these samples.

Reading (:func:`make_parsing_loader`) reuses the capture loader's stages (:mod:`dfmvr.data.loader`:
shard lists per rank and worker or resampled shards, streaming tar reads that count samples lost
in damaged shards against the manifest, the shuffle buffer); only decoding and batching differ.
Bad samples are skipped, logged once per key and counted (``loader.skipped``), as there.

One job: the single-view parsing shard format end to end (schema, writer, manifest, loader), kept
together as it is small beside the triplet shards'.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

# the capture loader's stages and the shards' entry codecs: the same shard selection, loss
# counting and shuffling, and image entries encoded, size-checked from their header before
# decoding, and decoded exactly as in the capture shards
from dfmvr.data.loader import (
    BatchStage,
    EpochSeeded,
    EpochState,
    SampleShuffle,
    ShardLoader,
    Tally,
    TarSamples,
    decode_or_skip,
    pipeline_loader,
    shard_stages,
    stage_rank,
)
from dfmvr.data.shards import (
    IMAGE_FORMATS,
    N_CLASSES,
    PARSING_VIEWS,
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    ShardInfo,
    ShardWriter,
    decode_image,
    describe_array,
    encode_image,
    malformed_as_value_error,
    read_manifest,
    sample_where,
    shard_samples,
    write_manifest,
)
from dfmvr.data.transforms import color_jitter as jitter_colors
from dfmvr.data.transforms import resize_image, resize_masks, to_model_range

_logger = logging.getLogger(__name__)

IMAGE_ENTRY = "image"
"""Stem of the RGB entry (``image.png`` or ``image.jpg``): the one view of :data:`PARSING_VIEWS`."""
MASK_ENTRY = "mask.png"
META_ENTRY = "meta.json"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# --------------------------------------------------------------------------- samples


@dataclass(kw_only=True, slots=True)
class ParsingSample:
    """One face photo and its parsing classes.

    Args:
        source: dataset tag, the key's first part (``celebamaskhq``, ``lapa``); letters, digits,
            ``_`` and ``-`` only (no dots: webdataset splits keys at the first dot).
        id: the sample's id within ``source`` (same characters).
        image: uint8 ``[S, S, 3]`` RGB.
        mask: uint8 ``[S, S]`` parsing classes 0..9, left/right the subject's own.
        meta: anything JSON-serialisable (dataset, layout, original file names, alignment);
            ``source``, ``id``, ``subject`` and ``schema_version`` are added on write.
        image_format: encoding of ``image`` in the shard: ``png`` (lossless) or ``jpg``.
        subject: identity, for splits by subject; empty means the key (every image its own subject).
    """

    source: str
    id: str
    image: np.ndarray
    mask: np.ndarray
    meta: dict = field(default_factory=dict)
    image_format: str = "png"
    subject: str = ""

    def __post_init__(self) -> None:
        if not self.subject:
            self.subject = self.key

    @property
    def key(self) -> str:
        """``{source}-{id}``: the webdataset key."""
        return f"{self.source}-{self.id}"

    @property
    def image_size(self) -> int:
        """Side ``S`` of the (square) image."""
        return int(self.image.shape[0])

    def validate(self) -> None:
        """Check every field's type, shape and values.

        Raises:
            ValueError: naming the sample key, the entry, what was expected and what was found.
        """
        for name, value in (("source", self.source), ("id", self.id), ("subject", self.subject)):
            if not isinstance(value, str) or not _NAME_RE.match(value):
                raise ValueError(f"parsing sample {self.source!r}/{self.id!r}: {name} must be a non-empty string of "
                                 f"letters, digits, '_' or '-' (no dots), got {value!r}")
        key = self.key
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"parsing sample {key}: image_format must be one of {IMAGE_FORMATS}, "
                             f"got {self.image_format!r}")
        image = self.image
        if (not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3
                or image.shape[2] != 3 or image.shape[0] != image.shape[1] or image.shape[0] < 1):
            raise ValueError(f"parsing sample {key}: image must be uint8 [S, S, 3] (square, RGB), "
                             f"got {describe_array(image)}")
        size = image.shape[0]
        mask = self.mask
        if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.shape != (size, size):
            raise ValueError(f"parsing sample {key}: mask must be uint8 [{size}, {size}] like the image, "
                             f"got {describe_array(mask)}")
        if int(mask.max()) >= N_CLASSES:
            raise ValueError(f"parsing sample {key}: mask holds class {int(mask.max())}, "
                             f"expected 0..{N_CLASSES - 1}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"parsing sample {key}: meta must be a dict, got {type(self.meta).__name__}")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as exn:
            raise ValueError(f"parsing sample {key}: meta must be JSON-serialisable: {exn}") from None


def encode_parsing_sample(sample: ParsingSample) -> dict[str, Any]:
    """Encode a sample into a webdataset dict (``__key__`` plus one ``bytes`` value per entry).

    Raises:
        ValueError: when the sample does not validate (see :meth:`ParsingSample.validate`).
    """
    sample.validate()
    key = sample.key
    entry = f"{IMAGE_ENTRY}.{sample.image_format}"
    meta = dict(sample.meta)
    meta.update(source=sample.source, id=sample.id, subject=sample.subject, schema_version=SCHEMA_VERSION)
    return {
        "__key__": key,
        entry: encode_image(key, entry, sample.image, sample.image_format),
        MASK_ENTRY: encode_image(key, MASK_ENTRY, sample.mask, "png"),
        META_ENTRY: json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def decode_parsing_sample(wds_dict: dict, image_size: int | None = None) -> ParsingSample:
    """Inverse of :func:`encode_parsing_sample` (the dict as webdataset's tar reader groups it).

    Args:
        wds_dict: ``__key__`` (and ``__url__`` when read from a shard) plus the entries.
        image_size: the manifest's side; an entry whose header declares another size is refused
            before it is decoded.

    Raises:
        ValueError: naming the key (and shard URL when known), the entry and what was expected: a
            missing entry, an undecodable image, a malformed ``meta.json`` or a sample that does
            not validate. Every malformed input ends here as a ValueError, whatever the decoder raised.
    """
    with malformed_as_value_error(sample_where(wds_dict)):
        return _decode_parsing_sample(wds_dict, image_size)


def _decode_parsing_sample(wds_dict: dict, image_size: int | None) -> ParsingSample:
    where = sample_where(wds_dict)
    present = sorted(k for k in wds_dict if not k.startswith("__"))
    if META_ENTRY not in wds_dict:
        raise ValueError(f"{where}: missing entry {META_ENTRY!r} (has {present})")
    try:
        meta = json.loads(wds_dict[META_ENTRY])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise ValueError(f"{where}: entry {META_ENTRY!r} is not valid JSON: {exn}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("source"), str) or not isinstance(meta.get("id"), str):
        raise ValueError(f"{where}: {META_ENTRY} must be an object with string 'source' and 'id', got {meta!r:.200}")
    found = [fmt for fmt in IMAGE_FORMATS if f"{IMAGE_ENTRY}.{fmt}" in wds_dict]
    if not found:
        raise ValueError(f"{where}: missing entry '{IMAGE_ENTRY}.png' (or '{IMAGE_ENTRY}.jpg'); has {present}")
    if MASK_ENTRY not in wds_dict:
        raise ValueError(f"{where}: missing entry {MASK_ENTRY!r} (uint8 class map); has {present}")
    image = decode_image(wds_dict, f"{IMAGE_ENTRY}.{found[0]}", color=True, size=image_size)
    mask = decode_image(wds_dict, MASK_ENTRY, color=False, size=image_size)
    subject = meta.pop("subject", "")
    sample = ParsingSample(
        source=meta.pop("source"),
        id=meta.pop("id"),
        image=image,
        mask=mask,
        meta=meta,
        image_format=found[0],
        subject=subject if isinstance(subject, str) else "",
    )
    try:
        sample.validate()
    except ValueError as exn:
        raise ValueError(f"{where}: {exn}") from None
    return sample


# --------------------------------------------------------------------------- writing


class ParsingShardWriter(ShardWriter):
    """Write :class:`ParsingSample` s of one split into ``{split}-{index:06d}.tar`` under ``root``.

    Everything but the encoding is :class:`dfmvr.data.shards.ShardWriter` (same arguments, same
    context-manager use, :meth:`close` returns the published :class:`~dfmvr.data.shards.ShardInfo` s,
    :meth:`abort` publishes nothing partial); list the shards with :func:`write_parsing_manifest`.
    """

    def write(self, sample: ParsingSample) -> None:  # type: ignore[override]
        """Append one sample (validated and encoded), starting a new shard when the current is full.

        Raises:
            ValueError: the sample does not validate, or its size differs from the earlier samples'.
            dfmvr.data.storage.StorageError: publishing a full shard failed.
        """
        self.write_encoded(encode_parsing_sample(sample), key=sample.key, subject=sample.subject,
                           image_size=sample.image_size)


def write_parsing_manifest(root: str, shards: list[ShardInfo], *, image_size: int, extra: dict | None = None,
                           endpoint: str | None = None) -> str:
    """``manifest.json`` under ``root`` listing parsing shards (:func:`dfmvr.data.shards.write_manifest`
    with ``views=PARSING_VIEWS``). Returns its URL; raises as ``write_manifest`` does."""
    return write_manifest(root, shards, image_size=image_size, extra=extra, endpoint=endpoint, views=PARSING_VIEWS)


def read_parsing_manifest(root_or_url: str, *, endpoint: str | None = None) -> Manifest:
    """:func:`dfmvr.data.shards.read_manifest`, refusing a manifest of multi-view captures.

    Raises:
        FileNotFoundError, ManifestError: as ``read_manifest``; ManifestError also when the manifest's
            ``views`` are not :data:`PARSING_VIEWS` (naming what it holds).
    """
    manifest = read_manifest(root_or_url, endpoint=endpoint)
    if not manifest.is_parsing:
        raise ManifestError(f"{manifest.url}: views {list(manifest.views)}, expected {list(PARSING_VIEWS)} "
                            "(a face-parsing manifest from python -m sharding.pack_parsing); multi-view captures "
                            "are read with dfmvr.data.loader.make_loader")
    return manifest


def iter_parsing_samples(url: str, *, endpoint: str | None = None) -> Iterator[ParsingSample]:
    """Every sample of one parsing shard, decoded, in order (for checks and previews; errors raise)."""
    with shard_samples(url, endpoint=endpoint) as samples:
        for raw in samples:
            yield decode_parsing_sample(raw)


# --------------------------------------------------------------------------- reading


@dataclass(kw_only=True, slots=True)
class ParsingItem:
    """One decoded, resized sample (worker side, NumPy)."""

    key: str
    image: np.ndarray
    """float32 [3, S, S] RGB in [-1, 1]."""
    mask: np.ndarray
    """uint8 [S, S] classes 0..9."""


@dataclass(kw_only=True, slots=True)
class ParsingBatch:
    """A batch of parsing samples; unpacks as ``images, masks = batch``.

    Attributes:
        images: float32 ``[N, 3, S, S]`` RGB in [-1, 1] (``x / 127.5 - 1``).
        masks: int64 ``[N, S, S]`` parsing classes 0..9.
        keys: the samples' keys, length N.
        skipped: bad samples the producing worker skipped since its previous batch (summed by the loader).
    """

    images: torch.Tensor
    masks: torch.Tensor
    keys: list[str] = field(default_factory=list)
    skipped: int = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.images, self.masks))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ParsingBatch":
        """A copy with both tensors on ``device``."""
        return ParsingBatch(images=self.images.to(device, non_blocking=non_blocking),
                            masks=self.masks.to(device, non_blocking=non_blocking), keys=self.keys, skipped=self.skipped)

    def pin_memory(self) -> "ParsingBatch":
        """A copy in pinned memory (DataLoader ``pin_memory=True`` calls this)."""
        return ParsingBatch(images=self.images.pin_memory(), masks=self.masks.pin_memory(), keys=self.keys,
                            skipped=self.skipped)


@dataclass(kw_only=True, slots=True)
class ParsingDecoder(EpochSeeded):
    """Pipeline stage: decode, check, resize (and colour-jitter) samples; drop and count the bad ones."""

    shard_size: int
    """Side the manifest promises (entries declaring another are refused before decoding)."""
    image_size: int
    """Side of the batches."""
    tally: Tally
    color_jitter: float = 0.0
    """Strength of :func:`dfmvr.data.transforms.color_jitter` (0: none)."""
    seed: int = 0
    rank: int = 0
    state: EpochState = field(default_factory=EpochState)

    def __call__(self, src: Iterator[dict]) -> Iterator[ParsingItem]:
        yield from decode_or_skip(src, self.decode, np.random.default_rng(self.epoch_seed(4)), self.tally,
                                  noun="parsing sample")

    def decode(self, raw: dict, rng: np.random.Generator) -> ParsingItem:
        """One webdataset sample -> :class:`ParsingItem`; raises ValueError naming what is wrong."""
        with malformed_as_value_error(sample_where(raw)):
            sample = decode_parsing_sample(raw, self.shard_size)
            image = resize_image(sample.image, self.image_size)[None]  # [1, S, S, 3]
            if self.color_jitter > 0:
                image = jitter_colors(image.astype(np.float32) * np.float32(1 / 255), self.color_jitter, rng)
            return ParsingItem(key=sample.key, image=to_model_range(image)[0],
                               mask=resize_masks(sample.mask[None], self.image_size)[0])


@dataclass(kw_only=True)
class ParsingBatcher(BatchStage):
    """:class:`~dfmvr.data.loader.BatchStage` of single views: :class:`ParsingBatch` es."""

    def collate(self, items: list[ParsingItem]) -> ParsingBatch:
        return ParsingBatch(
            images=torch.from_numpy(np.stack([item.image for item in items])),
            masks=torch.from_numpy(np.stack([item.mask for item in items]).astype(np.int64)),
            keys=[item.key for item in items],
            skipped=self.tally.take(),
        )


def make_parsing_loader(
    url_or_root: str,
    split: str,
    *,
    image_size: int,
    batch_size: int,
    endpoint: str | None = None,
    resampled: bool = False,
    epoch_samples: int | None = None,
    shuffle: bool = True,
    shuffle_buffer: int = 256,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    color_jitter: float = 0.0,
    max_bad_shards_in_a_row: int = 16,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
) -> ShardLoader:
    """Stream one split of a face-parsing manifest as batches ``(images, masks)``.

    Two modes:

    - training (``resampled=True``): shards are drawn with replacement (an endless stream, as
      webdataset's ``ResampledShards``), and each ``iter()`` of the loader is cut after the same
      number of batches on every rank: ``ceil(epoch_samples / batch_size)`` split over the workers;
    - validation (``resampled=False``, the default): one pass over this rank's shards (shards split
      by rank, then by DataLoader worker), every sample once; pass ``shuffle=False`` to keep the
      manifest's order.

    Args:
        url_or_root: the shard root (local directory or ``s3://bucket/prefix``) or its ``manifest.json``.
        split: split name in the manifest (``train``, ``val``, ``test``).
        image_size: side ``S`` of the batches; samples are resized from the manifest's size (area or
            bilinear for the images, nearest neighbour for the masks).
        batch_size: samples per batch (the last batch of a pass may be smaller).
        endpoint: S3 endpoint (else ``AWS_ENDPOINT_URL``).
        resampled: see above.
        epoch_samples: samples per ``iter()`` per rank in resampled mode (default: the split's count).
        shuffle: shuffle the shard order (per epoch) and samples (through a buffer).
        shuffle_buffer: samples in the shuffle buffer (encoded, so cheap to hold).
        seed: base seed of shard order, shuffle and colour jitter.
        rank, world_size: this process's place among the training processes; None reads
            ``RANK``/``WORLD_SIZE`` through webdataset.
        num_workers: DataLoader worker processes (0: in this process).
        color_jitter: strength of the photometric jitter (0: none; training only, normally).
        max_bad_shards_in_a_row: stop with :class:`dfmvr.data.loader.ShardReadError` after this many
            shards in a row gave no sample (a bucket that cannot be read).
        pin_memory, prefetch_factor, multiprocessing_context: as :func:`dfmvr.data.loader.make_loader`.

    Returns:
        A :class:`~dfmvr.data.loader.ShardLoader` yielding :class:`ParsingBatch` (``images`` float32 ``[N, 3, S, S]`` in
        [-1, 1], ``masks`` int64 ``[N, S, S]``); ``loader.skipped`` counts the bad samples skipped.

    Raises:
        FileNotFoundError: no manifest there.
        dfmvr.data.shards.ManifestError: not a parsing manifest, unknown split, unsupported schema.
        ValueError: inconsistent arguments (naming them).
    """
    manifest = read_parsing_manifest(url_or_root, endpoint=endpoint)
    urls = manifest.shard_urls(split)
    if not urls:
        raise ValueError(f"{manifest.url}: split {split!r} lists no shards")
    if image_size < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"image_size >= 1, batch_size >= 1 and num_workers >= 0 expected, got {image_size}, "
                         f"{batch_size}, {num_workers}")
    seed_rank = stage_rank(rank, world_size)
    if color_jitter < 0:
        raise ValueError(f"color_jitter: expected >= 0, got {color_jitter}")
    epoch_samples = manifest.split(split).count if epoch_samples is None else epoch_samples

    state = EpochState()
    tally = Tally()
    stages = shard_stages(urls, resampled=resampled, epoch_samples=epoch_samples, seed=seed, rank=rank,
                          world_size=world_size, num_workers=num_workers, shuffle=shuffle, state=state,
                          where=f"{manifest.url} split {split!r}")
    stages.append(TarSamples(expected=manifest.shard_counts(split), endpoint=endpoint, tally=tally,
                              max_bad_in_a_row=max_bad_shards_in_a_row))
    if shuffle:
        stages.append(SampleShuffle(bufsize=shuffle_buffer, seed=seed, rank=seed_rank, state=state))
    stages.append(ParsingDecoder(shard_size=manifest.image_size, image_size=image_size, tally=tally,
                                 color_jitter=color_jitter, seed=seed, rank=seed_rank, state=state))
    stages.append(ParsingBatcher(batch_size=batch_size, tally=tally))
    return pipeline_loader(stages, manifest=manifest, split=split, state=state, resampled=resampled,
                           epoch_samples=epoch_samples, batch_size=batch_size, num_workers=num_workers, rank=rank,
                           world_size=world_size, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                           multiprocessing_context=multiprocessing_context, kind="parsing loader",
                           sizes=f" at {manifest.image_size} px -> {image_size} px")


__all__ = [
    "IMAGE_ENTRY",
    "MASK_ENTRY",
    "META_ENTRY",
    "ParsingBatch",
    "ParsingBatcher",
    "ParsingDecoder",
    "ParsingItem",
    "ParsingSample",
    "ParsingShardWriter",
    "decode_parsing_sample",
    "encode_parsing_sample",
    "iter_parsing_samples",
    "make_parsing_loader",
    "read_parsing_manifest",
    "write_parsing_manifest",
]
