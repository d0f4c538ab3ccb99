"""Reading a split's samples one by one for the evaluation and reconstruction jobs.

Training reads shards through :func:`dfmvr.data.loader.make_loader`, which drops bad samples and
only counts them. The jobs here must say *which* samples they left out and why, and the
evaluation job spreads a split over Ray tasks, so they read shards themselves, with the loader's
own per-sample decoding (:class:`dfmvr.data.loader.TripletDecoder`), in *chunks*: a range of
sample positions within one shard (:func:`plan_chunks`). A chunk is read by streaming its shard
and decoding only the samples in its range (:func:`read_chunk`), which yields either a decoded
:class:`~dfmvr.data.batch.TripletItem` or a :class:`Skipped` record naming the sample, its
shard and the problem. Beyond what the decoder checks, a sample is refused when a landmark lies
well outside its image (the crop does not hold the face the way the model expects).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from dfmvr.data.batch import TripletItem
from dfmvr.data.loader import EpochState, Tally, TripletDecoder
from dfmvr.data.shards import VIEWS, Manifest, ShardErrors, shard_samples, without_gt

_logger = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class Skipped:
    """A sample or capture a job left out."""

    name: str
    """Sample key or capture folder name (or a shard range when whole samples went missing)."""
    source: str
    """The file or shard it came from."""
    reason: str
    """What is wrong with it, for people."""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def message(self) -> str:
        return f"{self.name} ({self.source}): {self.reason}"


@dataclass(kw_only=True, slots=True)
class ShardChunk:
    """Samples ``start <= i < stop`` (positions in the shard, manifest order) of one shard."""

    url: str
    start: int
    stop: int
    eval_url: str | None = None
    """The shard's evaluation companion (its ground truth), or None."""

    @property
    def count(self) -> int:
        return self.stop - self.start


def plan_chunks(manifest: Manifest, split: str, chunk_size: int, *, max_samples: int = 0) -> list[ShardChunk]:
    """Cut ``split`` into chunks of at most ``chunk_size`` samples, shard by shard.

    Args:
        manifest: the shard manifest.
        split: split name (``ManifestError`` naming the known splits when absent).
        chunk_size: samples per chunk (>= 1).
        max_samples: stop after this many samples in manifest order (0: all).

    Returns:
        Chunks in manifest order covering the split (or its first ``max_samples`` samples).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    chunks: list[ShardChunk] = []
    left = max_samples if max_samples > 0 else math.inf
    for shard in manifest.split(split).shards:
        count = int(min(shard.count, left))
        for start in range(0, count, chunk_size):
            chunks.append(ShardChunk(url=shard.url, start=start, stop=min(start + chunk_size, count),
                                     eval_url=shard.eval_url))
        left -= count
        if left <= 0:
            break
    return chunks


def make_decoder(manifest: Manifest, image_size: int, *, with_gt: bool, weight_map: str = "paper") -> TripletDecoder:
    """The loader's per-sample decoder for this manifest, resizing views to ``image_size``,
    without colour jitter."""
    return TripletDecoder(shard_size=manifest.image_size, image_size=image_size, color_jitter=0.0,
                          weight_map=weight_map, with_gt=with_gt, seed=0, rank=0, state=EpochState(),
                          tally=Tally())


LANDMARK_MARGIN = 0.1
"""How far (share of the image side) a 2D landmark may lie outside the image before the sample
is refused: a crop that cuts the chin's tip is normal (3 of 114 synthetic samples at 64 px had
a jaw landmark up to 1.6 px outside), landmarks far outside mean wrong landmarks or a wrong crop."""


def landmark_problem(lmk2d: np.ndarray, size: int) -> str | None:
    """Why ``lmk2d [V, 68, 2]`` (pixels at side ``size``) is unusable, or None.

    A landmark more than :data:`LANDMARK_MARGIN` of the side outside ``[0, size]`` on either
    axis means the crop does not contain the face as the shards' alignment promises.
    """
    slack = LANDMARK_MARGIN * size
    outside = ~((lmk2d >= -slack) & (lmk2d <= size + slack)).all(-1)  # [V, 68]
    if not outside.any():
        return None
    parts = []
    for v, view in enumerate(VIEWS[: lmk2d.shape[0]]):
        idx = np.flatnonzero(outside[v])
        if idx.size:
            x, y = lmk2d[v, idx[0]]
            parts.append(f"{idx.size} in view '{view}' (e.g. landmark {idx[0]} at ({x:.1f}, {y:.1f}))")
    return (f"lmk2d: landmarks more than {slack:.3g} px outside the {size} x {size} image: "
            + ", ".join(parts))


def read_chunk(chunk: ShardChunk, decoder: TripletDecoder, *, endpoint: str | None = None
               ) -> Iterator[TripletItem | Skipped]:
    """Decode the samples of ``chunk``; bad ones come out as :class:`Skipped`.

    Samples that never come out of the shard (truncated or corrupt tar) are reported as one
    :class:`Skipped` for the missing range.
    """
    rng = np.random.default_rng(0)
    handler = ShardErrors()
    position = 0
    with shard_samples(chunk.url, endpoint=endpoint, handler=handler,
                       select_files=None if decoder.with_gt else without_gt,
                       companions=[chunk.eval_url] if decoder.with_gt and chunk.eval_url else []) as raws:
        for raw in raws:
            index, position = position, position + 1
            if index < chunk.start:
                continue
            if index >= chunk.stop:
                break
            key = str(raw.get("__key__"))
            try:
                item = decoder.decode(raw, rng)
            except ValueError as exn:
                yield Skipped(name=key, source=chunk.url, reason=str(exn))
                continue
            problem = landmark_problem(item.lmk2d, decoder.image_size)
            if problem:
                yield Skipped(name=key, source=chunk.url, reason=problem)
                continue
            yield item
    if position < chunk.stop:
        first = max(position, chunk.start)
        cause = f"; first error: {handler.errors[0]!r:.300}" if handler.errors else ""
        yield Skipped(name=f"samples {first}..{chunk.stop - 1}", source=chunk.url,
                      reason=f"the shard ended after {position} samples, the manifest lists more{cause}")


__all__ = ["LANDMARK_MARGIN", "ShardChunk", "Skipped", "landmark_problem", "make_decoder", "plan_chunks", "read_chunk"]
