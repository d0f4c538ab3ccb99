"""Synthetic (left, front, right) triplets of procedural faces, written as dfmvr shards.

    python -m sharding.synth --out ROOT [--subjects 40] ...       (the command line: sharding/synth.py)

Per subject: identity and albedo coefficients. Per capture (an expression of that subject;
capture 0 is neutral): expression coefficients, SH lighting (DC-dominant with modest
directional terms), a pose per view (the nominal yaw plus a few degrees of jitter on every
angle and a few millimetres of translation) and a background per view (flat colour, gradient
or noise texture). The three views are rendered by :class:`dfmvr.render.Renderer` and
composited over their backgrounds with the coverage mask.

Each sample carries: the images; the parsing masks (the renderer's per-pixel region labels);
the 68 projected landmarks per view (``Camera.project`` of the posed keypoint vertices); the
3D landmarks (vertices ``lm3d_index`` of the shape in the face-model frame, before any pose:
the frame of the lm3d loss in docs/design.md ("Losses"), the frame the reconstruction's shape
lives in before its per-view rigid pose); the ground-truth mesh ``gt.npz`` (model-frame
vertices, the model's faces, units dm); the true coefficients (``CoeffLayout.join`` of id,
exp, tex, gamma, per-view angles and translations) and meta.

Deterministic: a sample's random numbers come from generators seeded with
``(seed, subject)`` (identity, albedo) and ``(seed, subject, capture)`` (everything else),
samples are assigned to shards by a fixed plan, every sample is rendered with one torch thread
(by whichever worker process), the main process writes the shards in plan order, and tar
headers carry a fixed mtime; the same settings give byte-identical shards for any
``--workers``. Resumable: finished shards are recorded in the progress record every shard-writing
job keeps (:mod:`dfmvr.data.progress`, ``shard-progress.json`` beside the shards); a rerun with
the same settings keeps every recorded shard whose stored sha256 still matches and makes only the
others.

This module is the dataset job (plan, worker pool, resumption, manifest, read-back and previews);
one sample's sampling and rendering is :mod:`dfmvr.data.synth_faces`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch

from dfmvr.config import FaceModelConfig, check_at_least
from dfmvr.data import storage
from dfmvr.data.progress import ShardProgress
from dfmvr.data.shards import (VIEWS, Sample, ShardWriter, decode_sample, eval_companion_url, shard_samples,
                               write_manifest)
from dfmvr.data.splits import SPLIT_NAMES, assign_splits, parse_fractions
from dfmvr.data.synth_faces import (SampleParams, SamplingConfig, capture_name, make_sample, render_views,  # noqa: F401
                                    sample_params, subject_name)

_logger = logging.getLogger(__name__)

SYNTH_VERSION = 1
"""Bump when the generator's output changes for the same settings (invalidates resumption)."""


def default_n_vertices(size: int) -> int:
    """Procedural model size that renders cleanly and fast at ``size`` px.

    Triangles much smaller than a pixel only cost time; much larger ones show facets. At
    224 px the full 35k-vertex model is used; small images get a proportionally coarser mesh.
    """
    if size >= 160:
        return 35709
    if size >= 96:
        return 12000
    return 4000


@dataclass(kw_only=True, slots=True)
class SynthConfig:
    """A synthetic dataset."""

    out: str
    """Shard root: a local directory or ``s3://bucket/prefix``."""
    n_subjects: int = 40
    """Identities."""
    n_captures: int = 3
    """Captures (expressions) per subject."""
    size: int = 224
    """Image side in pixels."""
    yaw_deg: tuple[float, float, float] = (-45.0, 0.0, 45.0)
    """Nominal yaw of the left, front and right views."""
    side_yaw_choices: tuple[float, ...] = ()
    """When set, each capture's left and right views get a yaw drawn (independently) from these
    magnitudes, left at minus and right at plus, instead of ``yaw_deg``'s (paper Tab. III
    "random"). Drawn after every other random number, so a sample differs from the fixed-yaw one
    of the same seed only in its side views' yaw."""
    seed: int = 0
    """Seed of everything random in the data (not of the face model)."""
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/val/test fractions of the subjects."""
    workers: int = 2
    """Processes rendering shards (1: in this process)."""
    n_vertices: int | None = None
    """Procedural model size; None picks :func:`default_n_vertices` for ``size``."""
    model_seed: int = 0
    """Seed of the procedural face model (keep it equal to the training job's facemodel.seed)."""
    facemodel: FaceModelConfig | None = None
    """Explicit face model (e.g. BFM); overrides ``n_vertices`` and ``model_seed``."""
    max_count: int = 200
    """Samples per shard."""
    image_format: str = "png"
    """``png`` (lossless) or ``jpg``."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Distributions."""
    endpoint: str | None = None
    """S3 endpoint (else ``AWS_ENDPOINT_URL``)."""

    def __post_init__(self) -> None:
        if self.n_subjects < 1 or self.n_captures < 1:
            raise ValueError(f"n_subjects/n_captures: expected >= 1, got {self.n_subjects}, {self.n_captures}")
        check_at_least("size", self.size, 16, " px")
        if len(self.yaw_deg) != 3 or not all(math.isfinite(float(y)) for y in self.yaw_deg):
            raise ValueError(f"yaw_deg: expected 3 finite angles (left, front, right), got {self.yaw_deg!r}")
        check_at_least("workers", self.workers, 1)
        check_at_least("max_count", self.max_count, 1)
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format: expected 'png' or 'jpg', got {self.image_format!r}")
        self.yaw_deg = tuple(float(y) for y in self.yaw_deg)
        if not all(math.isfinite(float(y)) and 0 <= float(y) <= 90 for y in self.side_yaw_choices):
            raise ValueError(f"side_yaw_choices: expected yaw magnitudes in 0..90 degrees, got {self.side_yaw_choices!r}")
        self.side_yaw_choices = tuple(float(y) for y in self.side_yaw_choices)
        self.splits = parse_fractions(self.splits)

    def face_model_config(self) -> FaceModelConfig:
        """The face model the samples are made with."""
        if self.facemodel is not None:
            return self.facemodel
        n = self.n_vertices if self.n_vertices is not None else default_n_vertices(self.size)
        return FaceModelConfig(source="procedural", n_vertices=n, seed=self.model_seed)

    def fingerprint(self) -> str:
        """Hash of every setting that changes the shards' bytes (not ``out``, ``workers``, ``endpoint``)."""
        fm = self.face_model_config()
        doc = {
            "version": SYNTH_VERSION, "n_subjects": self.n_subjects, "n_captures": self.n_captures,
            "size": self.size, "yaw_deg": list(self.yaw_deg), "seed": self.seed, "splits": list(self.splits),
            "max_count": self.max_count, "image_format": self.image_format, "sampling": self.sampling.to_dict(),
            "facemodel": {"source": fm.source, "bfm_path": fm.bfm_path, "n_vertices": fm.n_vertices, "seed": fm.seed},
        }
        if self.side_yaw_choices:  # only when set: fingerprints of fixed-yaw datasets stay as they were
            doc["side_yaw_choices"] = list(self.side_yaw_choices)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(kw_only=True, slots=True)
class ShardTask:
    """One shard of the plan: which samples it holds."""

    split: str
    index: int
    items: list[tuple[int, int]]
    """``(subject index, capture index)`` in write order."""

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass(kw_only=True, slots=True)
class SynthSummary:
    """What a generation run did."""

    manifest: str
    n_samples: int
    per_split: dict[str, int]
    subjects_per_split: dict[str, int]
    generated: list[str]
    """Shard names made by this run."""
    kept: list[str]
    """Shard names kept from an earlier run (verified by sha256)."""
    seconds: float
    triplets_per_s: float
    """Samples made by this run per second of wall time (0 when all were kept)."""
    n_vertices: int
    """Vertices of the face model used (the procedural model rounds the requested count to its grid)."""


def plan_shards(cfg: SynthConfig) -> list[ShardTask]:
    """Assign every (subject, capture) to a split and a shard, deterministically."""
    names = [subject_name(i) for i in range(cfg.n_subjects)]
    split_of = assign_splits(names, cfg.splits, cfg.seed)
    tasks = []
    for split in SPLIT_NAMES:
        items = [(i, c) for i in range(cfg.n_subjects) if split_of[names[i]] == split for c in range(cfg.n_captures)]
        for index, start in enumerate(range(0, len(items), cfg.max_count)):
            tasks.append(ShardTask(split=split, index=index, items=items[start:start + cfg.max_count]))
    return tasks


# ---------------------------------------------------------------------------------------------
# workers

_state: dict = {}


@contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread: the same arithmetic (and so the same bytes) in every process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_digest(model) -> str:
    """Content hash of a face model (16 hex digits): shards record which model made them."""
    h = hashlib.sha256()
    for name in ("mean_shape", "id_base", "exp_base", "mean_tex", "tex_base", "tri", "keypoints", "region",
                 "lm3d_index"):
        h.update(np.ascontiguousarray(getattr(model, name).numpy()).tobytes())
    return h.hexdigest()[:16]


def _init_worker(cfg: SynthConfig, model, pool_process: bool = True) -> None:
    """Per process: keep the face model (built once by the parent and sent over: rebuilding a
    35k-vertex procedural model takes about 30 s per process) and make a renderer."""
    from dfmvr.render import Renderer
    from dfmvr.render.camera import Camera

    if pool_process:
        torch.set_num_threads(1)
    _state["cfg"] = cfg
    _state["model"] = model
    _state["digest"] = model_digest(model)
    _state["renderer"] = Renderer(Camera.at_size(cfg.size), backend="torch")


def _make_item(item: tuple[int, int]) -> tuple[Sample, str]:
    """Render one (subject, capture) in a worker: the sample and the digest of the model that made it."""
    with _one_thread():
        return make_sample(_state["model"], _state["renderer"], _state["cfg"], *item), _state["digest"]


# ---------------------------------------------------------------------------------------------
# resumption


def _load_progress(cfg: SynthConfig, tasks: list[ShardTask]) -> ShardProgress:
    """The job's progress record (:class:`dfmvr.data.progress.ShardProgress`), keeping the recorded
    shards of an earlier run with the same settings that are intact and hold the planned samples."""
    progress = ShardProgress(cfg.out, cfg.fingerprint(), endpoint=cfg.endpoint)
    planned = {t.name: [f"{subject_name(s)}-{capture_name(c)}" for s, c in t.items] for t in tasks}
    for name, rec in progress.load().items():
        if planned.get(name) != rec.info.keys or "model" not in rec.extra:
            progress.forget(name)
    return progress


def _make_shards(cfg: SynthConfig, model, todo: list[ShardTask], progress: ShardProgress, bar) -> list[str]:
    """Make the shards ``todo``, recording each finished one in the progress record (with the
    digest of the face model that made it).

    Samples are rendered in parallel (one task per sample, so the work spreads over the
    workers however few shards there are) and come back in plan order; this process writes
    them, shard after shard, so a shard's bytes do not depend on which worker rendered what.
    """
    items = [item for task in todo for item in task.items]
    made: list[str] = []

    def write_all(results: Iterator[tuple[Sample, str]]) -> None:
        for task in todo:
            digests = set()
            with ShardWriter(cfg.out, task.split, max_count=cfg.max_count, max_size=1 << 62,
                             start_index=task.index, endpoint=cfg.endpoint) as writer:
                for _ in task.items:
                    sample, digest = next(results)
                    digests.add(digest)
                    writer.write(sample)
                    if bar is not None:
                        bar.update(1)
            (info,) = writer.close()
            assert info.url.endswith(task.name) and info.count == len(task.items), info
            if len(digests) > 1:
                raise RuntimeError(f"worker processes built different face models ({sorted(digests)}) from "
                                   f"{cfg.face_model_config()}: the face model is not deterministic, so the "
                                   "shards would not be either")
            progress.record(info, model=digests.pop())
            made.append(task.name)

    if cfg.workers == 1:
        _init_worker(cfg, model, pool_process=False)
        try:
            write_all(_make_item(item) for item in items)
        finally:
            _state.clear()  # do not keep the model alive in the caller's process
        return made
    ctx = mp.get_context("spawn")  # torch and fork do not mix well; spawn starts clean
    with ProcessPoolExecutor(max_workers=min(cfg.workers, len(items)), mp_context=ctx,
                             initializer=_init_worker, initargs=(cfg, model)) as pool:
        write_all(_ordered(pool, items, window=4 * cfg.workers))
    return made


def _ordered(pool: ProcessPoolExecutor, items: list, window: int) -> Iterator:
    """``pool.map`` in order with at most ``window`` results in flight (bounded memory)."""
    pending = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(_make_item, item))
        if len(pending) >= window:
            break
    while pending:
        yield pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(_make_item, nxt))


# ---------------------------------------------------------------------------------------------
# the run


def generate(out: str, *, n_subjects: int = 40, n_captures: int = 3, size: int = 224,
             yaw_deg: tuple[float, float, float] = (-45.0, 0.0, 45.0), seed: int = 0,
             splits: tuple[float, float, float] = (0.8, 0.1, 0.1), workers: int = 2,
             n_vertices: int | None = None, max_count: int = 200, progress: bool = False,
             **kwargs) -> SynthSummary:
    """Generate a synthetic dataset under ``out`` (see :class:`SynthConfig` for every option).

    Returns:
        :class:`SynthSummary` (manifest URL, counts, shards made and kept, throughput).
    """
    cfg = SynthConfig(out=out, n_subjects=n_subjects, n_captures=n_captures, size=size, yaw_deg=yaw_deg,
                      seed=seed, splits=splits, workers=workers, n_vertices=n_vertices, max_count=max_count,
                      **kwargs)
    return run(cfg, progress=progress)


def run(cfg: SynthConfig, *, progress: bool = False) -> SynthSummary:
    """Generate (or finish generating) the dataset ``cfg`` describes and write its manifest.

    Shards recorded by an earlier run are kept when their bytes still match and the face
    model built here (once; workers receive it) is the one that made them; shards made by a
    different model (its code changed since) are made again, so every shard of the dataset
    comes from one model.
    """
    if not storage.is_s3(cfg.out):
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    tasks = plan_shards(cfg)
    by_name = {t.name: t for t in tasks}
    progress = _load_progress(cfg, tasks)
    done = progress.shards
    kept_before = set(done)
    todo = [t for t in tasks if t.name not in done]
    n_total = sum(len(t.items) for t in tasks)
    fm = cfg.face_model_config()
    _logger.info("synth: %d samples in %d shards (%d recorded, %d to make), %d px, %s with %d vertices",
                 n_total, len(tasks), len(done), len(todo), cfg.size, fm.source, fm.n_vertices)
    start = time.perf_counter()
    from dfmvr.facemodel import build_face_model

    model = build_face_model(fm)
    current = model_digest(model)
    stale = sorted(n for n, d in done.items() if d.extra["model"] != current)
    if stale:
        _logger.warning("%d recorded shards were made by a different face model; making them again: %s",
                        len(stale), ", ".join(stale))
        for name in stale:
            progress.forget(name)
        todo = [t for t in tasks if t.name not in done]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_total, initial=n_total - sum(len(t.items) for t in todo), unit="triplet",
                   file=sys.stderr, desc="synth")
    generated: list[str] = []
    try:
        if todo:
            generated = _make_shards(cfg, model, todo, progress, bar)
            digests = {done[n].extra["model"] for n in generated}
            if digests != {current}:
                raise RuntimeError(f"worker processes hold face models {sorted(digests)}, the parent built "
                                   f"{current} from {fm}: the shards would not be reproducible")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    n_made = sum(len(by_name[n].items) for n in generated)
    models = sorted({d.extra["model"] for d in done.values()})
    extra = {
        "source": "synthetic",
        "synth": {
            "fingerprint": cfg.fingerprint(), "version": SYNTH_VERSION, "n_subjects": cfg.n_subjects,
            "n_captures": cfg.n_captures, "yaw_deg": list(cfg.yaw_deg), "seed": cfg.seed,
            "splits": list(cfg.splits),
            "facemodel": {"source": fm.source, "n_vertices_requested": fm.n_vertices, "seed": fm.seed,
                          "name": model.name, "n_vertices": model.n_vertices, "digest": models[0]},
            "sampling": cfg.sampling.to_dict(),
            "lm3d_frame": "face-model frame, before the per-view pose (decimetres)",
        },
    }
    manifest = write_manifest(cfg.out, [done[t.name].info for t in tasks], image_size=cfg.size, extra=extra,
                              endpoint=cfg.endpoint)
    per_split: dict[str, int] = {}
    subjects: dict[str, set] = {}
    for t in tasks:
        per_split[t.split] = per_split.get(t.split, 0) + len(t.items)
        subjects.setdefault(t.split, set()).update(s for s, _ in t.items)
    return SynthSummary(
        manifest=manifest, n_samples=n_total, per_split=per_split,
        subjects_per_split={k: len(v) for k, v in subjects.items()},
        generated=sorted(set(generated)), kept=sorted(kept_before - set(generated)), seconds=seconds,
        triplets_per_s=(n_made / seconds) if n_made and seconds > 0 else 0.0, n_vertices=model.n_vertices,
    )


# ---------------------------------------------------------------------------------------------
# reading back and previews


def iter_shard_samples(url: str, *, endpoint: str | None = None) -> Iterator[Sample]:
    """Decode the samples of one shard in order (streams the tar; local or ``s3://``), through
    the one shard reader, :func:`dfmvr.data.shards.shard_samples`, with its evaluation companion's
    entries when it has one."""
    companion = eval_companion_url(url)
    companions = [companion] if storage.exists(companion, endpoint=endpoint) else []
    with shard_samples(url, endpoint=endpoint, companions=companions) as raws:
        for raw in raws:
            yield decode_sample(raw)


PALETTE = np.array([
    [0, 0, 0], [230, 190, 160], [40, 120, 255], [255, 120, 40], [0, 220, 255],
    [255, 220, 0], [60, 200, 60], [200, 0, 200], [255, 60, 90], [150, 40, 40],
], dtype=np.uint8)
"""RGB colour per parse class for previews."""


def preview_image(samples: list[Sample], *, scale: int = 1) -> np.ndarray:
    """A grid: one row per sample, the three views, then their masks over the images; landmarks drawn.

    Returns:
        ``[rows * S * scale, 6 * S * scale, 3]`` uint8 RGB.
    """
    import cv2

    rows = []
    for s in samples:
        tiles = []
        for with_mask in (False, True):
            for i, v in enumerate(VIEWS):
                img = s.images[v].copy()
                if with_mask and s.masks is not None:
                    colour = PALETTE[s.masks[v]]
                    face = s.masks[v][..., None] > 0
                    img = np.where(face, (0.35 * img + 0.65 * colour).astype(np.uint8), (img * 0.5).astype(np.uint8))
                img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
                radius = max(1, round(scale * s.image_size / 224))
                for k, (x, y) in enumerate(s.lmk2d[i]):
                    colour = (255, 0, 0) if k in (30, 36, 45, 48, 54) else (0, 255, 0)
                    cv2.circle(img, (int(round(x * scale - 0.5)), int(round(y * scale - 0.5))), radius, colour, -1,
                               lineType=cv2.LINE_AA)
                tiles.append(img)
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def write_preview(root: str, path: str, *, count: int = 4, scale: int | None = None,
                  endpoint: str | None = None) -> str:
    """Read the first ``count`` samples (train split first) back from the shards and save a preview PNG."""
    from dfmvr.data.shards import read_manifest

    manifest = read_manifest(root, endpoint=endpoint)
    samples: list[Sample] = []
    for split in [s for s in SPLIT_NAMES if s in manifest.splits] + sorted(set(manifest.splits) - set(SPLIT_NAMES)):
        for url in manifest.shard_urls(split):
            for sample in iter_shard_samples(url, endpoint=endpoint):
                samples.append(sample)
                if len(samples) >= count:
                    break
            if len(samples) >= count:
                break
        if len(samples) >= count:
            break
    if scale is None:
        scale = max(1, round(160 / manifest.image_size))
    grid = preview_image(samples, scale=scale)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")
    return str(path)
