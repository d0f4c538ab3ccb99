"""Pack face-parsing datasets (CelebAMask-HQ, LaPa) into single-view parsing shards for the parse net.

    python -m sharding.pack_parsing --layout celebamask-hq|lapa --input DIR --out ROOT [--size 224]
        [--splits 0.8,0.1,0.1] [--seed 0] [--limit N] [--image-format png|jpg] [--max-count 1000]
        [--workers 1] [--endpoint URL] [--summary-json PATH]

Layouts (the datasets as their authors distribute them; never shipped with dfmvr, both licensed
for non-commercial research):

``celebamask-hq``
    ``DIR/CelebA-HQ-img/<id>.jpg`` (1024 x 1024, ids 0..29999) and
    ``DIR/CelebAMask-HQ-mask-anno/<k>/<id:05d>_<part>.png`` (``k = id // 2000``; 512 x 512 binary
    masks, white = the part; one file per part present; the 18 part names of
    :data:`CELEBAMASK_HQ_CLASSES`). The faces are already aligned (centred by CelebA-HQ's own
    crop): the image and the composed class map are resized to ``--size``, nothing is warped.
    CelebA-HQ's crop shows the whole head, so its faces are framed a little smaller and lower
    than the model's crop. With ``DIR/CelebA-HQ-to-CelebA-mapping.txt`` and CelebA's
    ``identity_CelebA.txt`` (in DIR, or ``--identities FILE``) the splits are by identity;
    without them every image is its own subject.
``lapa``
    ``DIR/images/<name>.jpg``, ``DIR/labels/<name>.png`` (single-channel, LaPa's 11 classes) and
    ``DIR/landmarks/<name>.txt`` (the count 106, then ``x y`` per line), or the same three
    folders under ``DIR/train``, ``DIR/val``, ``DIR/test``: then LaPa's own split is kept. Each
    image and its label map are aligned to the model's frontal crop by a 5-point similarity
    (eye centres, nose tip, mouth corners: :data:`LAPA_FIVE_POINTS`) onto the frontal template of
    :mod:`dfmvr.data.align` (the face model's mean face at yaw 0), the label map with nearest
    neighbour. LaPa has no identities: every image is its own subject.

Classes are mapped onto dfmvr's ten (:data:`dfmvr.facemodel.model.PARSE_CLASSES`, left/right the
subject's own) by one table per layout (:data:`CELEBAMASK_HQ_CLASSES`, :data:`LAPA_CLASSES`,
:func:`class_table`), recorded in the manifest. Splits: by subject, deterministic from ``--seed``
(:func:`dfmvr.data.splits.assign_splits`), unless the layout fixes them.

Bad input never stops a run: a missing or wrongly sized label file, an unknown part name in a
CelebAMask-HQ mask file name, an unreadable image, a landmark file with the wrong count, ... skip
that one sample with a message naming the file and what was expected; the skipped samples are
counted and listed at the end (and in ``--summary-json``) and the rest is packed. Exit status: 0
when something was packed, 1 when nothing could be, 2 for bad arguments (unknown layout, missing
input folder, a folder without the layout's sub-folders), found before anything is written.

``--out`` may be ``s3://bucket/prefix``. Resumable as ``sharding.pack``: every published shard is
recorded in ``shard-progress.json`` under the root (with a fingerprint of the settings), an
interrupted run publishes nothing partial, and the same command again keeps the recorded shards
that are still intact and packs only the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal

import numpy as np

from dfmvr.config import FaceModelConfig, check_at_least
from dfmvr.data.align import AlignmentTemplate
from dfmvr.data.parsing_shards import (
    ParsingSample,
    ParsingShardWriter,
    write_parsing_manifest,
)
from dfmvr.data.splits import assign_splits, parse_fractions
from dfmvr.facemodel.model import PARSE_CLASSES
from sharding.layouts import InputError
from sharding.progress import (PackedSummary, RootBusyError, SplitWriters, add_pack_options, add_run_options,
                               face_model_from_args, load_progress, log_to_stderr,
                               ordered_map, progress_bar, report, root_lock, save_progress)
from sharding.parsing_layouts import (LAPA_FIVE_POINTS, LAYOUT_NAMES, ParsingSource, class_table, discover_parsing,
                                      load_celebamask_hq, load_lapa)

_logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# config, workers


@dataclass(kw_only=True, slots=True)
class ParsingPackConfig:
    """What to pack and how."""

    input: str
    """Dataset folder."""
    out: str
    """Shard root: a local directory or ``s3://bucket/prefix``."""
    layout: Literal["celebamask-hq", "lapa"]
    """Folder layout of ``input``."""
    size: int = 224
    """Output side in pixels (the loader resizes to the model's size when they differ)."""
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/val/test fractions by subject (LaPa's split folders, when present, are kept instead)."""
    seed: int = 0
    """Seed of the subject shuffle before the split."""
    limit: int = 0
    """Pack only the first ``limit`` samples found (0: all)."""
    image_format: Literal["png", "jpg"] = "png"
    """Encoding of the images in the shards."""
    max_count: int = 1000
    """Samples per shard."""
    workers: int = 1
    """Processes reading the samples (1: in this process)."""
    identities: str = ""
    """CelebAMask-HQ: CelebA's ``identity_CelebA.txt`` (default: in ``input`` when present)."""
    facemodel: FaceModelConfig = field(default_factory=lambda: FaceModelConfig(n_vertices=4000))
    """Face model whose mean face gives LaPa's frontal alignment template."""
    endpoint: str | None = None
    """S3 endpoint (else ``AWS_ENDPOINT_URL``)."""

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_NAMES:
            raise ValueError(f"layout: expected one of {list(LAYOUT_NAMES)}, got {self.layout!r}")
        check_at_least("size", self.size, 16, " px")
        check_at_least("limit", self.limit, 0, " (0: everything)")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format: expected 'png' or 'jpg', got {self.image_format!r}")
        if self.max_count < 1 or self.workers < 1:
            raise ValueError(f"max_count and workers: expected >= 1, got {self.max_count}, {self.workers}")
        self.splits = parse_fractions(self.splits)

    def fingerprint(self) -> str:
        """Hash of every setting that decides what the shards hold (not ``workers``, ``endpoint``)."""
        doc = {k: v for k, v in asdict(self).items() if k not in ("workers", "endpoint")}
        doc["packer"] = "pack_parsing"
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_template(cfg: ParsingPackConfig) -> AlignmentTemplate:
    """The frontal alignment template at ``cfg.size`` from ``cfg.facemodel``'s mean face."""
    from dfmvr.facemodel import build_face_model

    return AlignmentTemplate.from_face_model(build_face_model(cfg.facemodel), (0.0,), cfg.size)


_worker_state: dict = {}


def _init_worker(cfg: ParsingPackConfig, template: np.ndarray | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker_state["cfg"] = cfg
    _worker_state["template"] = template


def load_sample(src: ParsingSource, cfg: ParsingPackConfig, template: np.ndarray | None) -> ParsingSample:
    """One sample of ``cfg.layout``, validated; raises InputError/ValueError naming the file."""
    if cfg.layout == "celebamask-hq":
        sample = load_celebamask_hq(src, cfg.size, cfg.image_format)
    else:
        assert template is not None
        sample = load_lapa(src, cfg.size, cfg.image_format, template)
    sample.validate()
    return sample


def _load_one(src: ParsingSource) -> tuple[ParsingSample | None, str | None]:
    try:
        return load_sample(src, _worker_state["cfg"], _worker_state["template"]), None
    except (InputError, ValueError) as exn:
        return None, str(exn)


def _iter_loaded(sources: list[ParsingSource], cfg: ParsingPackConfig, template: np.ndarray | None
                 ) -> Iterator[tuple[ParsingSource, ParsingSample | None, str | None]]:
    for src, result in ordered_map(_load_one, sources, workers=cfg.workers, initializer=_init_worker,
                                   initargs=(cfg, template), chunksize=8):
        yield (src, *result)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass(kw_only=True, slots=True)
class ParsingPackSummary(PackedSummary):
    """What a run did: samples (``skipped``: ``(file, reason)``)."""

    layout: str
    n_skipped: int
    """``len(skipped)``."""
    resumed: int = 0
    """Samples kept from the shards of an interrupted run of the same command."""
    class_table: dict[str, str] = field(default_factory=dict)
    """Source label -> dfmvr class (:func:`class_table`)."""

    def packed_what(self) -> str:
        return f"{self.layout} samples"

    def notes(self) -> list[str]:
        return [f"{self.resumed} of them kept from an interrupted run"] if self.resumed else []


def pack(cfg: ParsingPackConfig, *, sources: list[ParsingSource] | None = None,
         progress: bool = False) -> ParsingPackSummary:
    """Pack every sample under ``cfg.input`` into parsing shards under ``cfg.out`` and write the manifest.

    Args:
        cfg: the run's settings.
        sources: what :func:`discover_parsing` found (discovered here when None).
        progress: show a progress bar on stderr.

    Returns:
        The summary; refused samples are listed with their reasons, the rest packed. No manifest
        is written when nothing could be packed.

    Raises:
        LayoutError: the input is not in the layout (before anything is written).
        sharding.pack.RootBusyError: another packer holds the root's lock.
    """
    if sources is None:
        sources = discover_parsing(cfg.layout, cfg.input, identities=cfg.identities or None)
    with root_lock(cfg.out, cfg.endpoint):
        return _pack(cfg, sources, progress=progress)


def _pack(cfg: ParsingPackConfig, sources: list[ParsingSource], *, progress: bool) -> ParsingPackSummary:
    if cfg.limit:
        sources = sources[:cfg.limit]
    template = build_template(cfg) if cfg.layout == "lapa" else None
    template_points = template.points(0.0) if template is not None else None
    split_of = assign_splits([s.subject for s in sources if s.split is None], cfg.splits, cfg.seed)
    if any(s.split is not None for s in sources):
        _logger.info("layout %s keeps its split folders: %s", cfg.layout,
                     sorted({s.split for s in sources if s.split is not None}))

    # an interrupted run of the same command left shards: keep them, pack the rest
    recorded, _ = load_progress(cfg)
    done = {k for info in recorded for k in info.keys}
    if recorded:
        _logger.info("resuming: %d shards (%d samples) of an interrupted run kept; packing the rest",
                     len(recorded), len(done))
    skipped: list[tuple[str, str]] = []
    todo: list[ParsingSource] = []
    seen: dict[str, str] = {}
    for src in sources:
        if src.key in seen:  # two file names that differ only in characters a key cannot hold
            skipped.append((src.where, f"{src.where}: sample key {src.key!r} already taken by {seen[src.key]}; "
                                       "expected unique names (letters, digits, '_' and '-')"))
            continue
        seen[src.key] = src.where
        if src.key not in done:
            todo.append(src)
    # on an error or Ctrl-C the unfinished shards are discarded, never published half full
    with (progress_bar(progress, total=len(todo), unit="sample", desc=f"pack {cfg.layout}") as tick,
          SplitWriters(cfg, recorded, ParsingShardWriter) as writers):
        for src, sample, error in _iter_loaded(todo, cfg, template_points):
            tick()
            if sample is None:
                _logger.error("skipping %s: %s", src.where, error)
                skipped.append((src.where, str(error)))
                continue
            writers.write(src.split or split_of[src.subject], sample)
        infos = writers.close()
        if infos:
            save_progress(cfg, infos, set())
    per_split = writers.per_split
    packed = sum(per_split.values())
    manifest = None
    table = class_table(cfg.layout)
    if infos:
        extra = {
            "source": f"pack_parsing:{cfg.layout}",
            "pack_parsing": {
                "input": str(cfg.input), "layout": cfg.layout, "seed": cfg.seed, "splits": list(cfg.splits),
                "limit": cfg.limit, "image_format": cfg.image_format,
                "split_by": "folders" if any(s.split for s in sources) else (
                    "identity" if any(s.identity for s in sources) else "image"),
            },
            "parse_classes": list(PARSE_CLASSES),
            "class_table": table,
            "skipped": [where for where, _ in skipped],
        }
        if template is not None:
            extra["alignment_template"] = template.to_dict()
            extra["alignment_landmarks"] = list(LAPA_FIVE_POINTS)
        manifest = write_parsing_manifest(cfg.out, infos, image_size=cfg.size, extra=extra, endpoint=cfg.endpoint)
    if skipped:
        _logger.warning("skipped %d samples: %s", len(skipped), ", ".join(where for where, _ in skipped[:20])
                        + (" ..." if len(skipped) > 20 else ""))
    return ParsingPackSummary(layout=cfg.layout, packed=packed, per_split=per_split, skipped=skipped,
                              n_skipped=len(skipped), manifest=manifest, shards=[i.url for i in infos],
                              resumed=len(done), class_table=table)


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding.pack_parsing", description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", required=True, help=f"one of {', '.join(LAYOUT_NAMES)}")
    add_pack_options(p, max_count=1000, workers_help="processes reading the samples",
                     facemodel_help="lapa: face model whose mean face gives the alignment template")
    p.add_argument("--limit", type=int, default=0, help="pack only the first N samples found (0: all)")
    p.add_argument("--identities", default="", help="celebamask-hq: CelebA's identity_CelebA.txt (default: in --input)")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    add_run_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the packer; returns the exit status (0 packed, 1 nothing packed, 2 bad arguments)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exn:  # argparse: a missing or malformed option (it printed why)
        return int(exn.code or 0)
    log_to_stderr()
    try:
        cfg = ParsingPackConfig(
            input=args.input, out=args.out, layout=args.layout, size=args.size,
            splits=parse_fractions(args.splits), seed=args.seed, limit=args.limit,
            image_format=args.image_format, max_count=args.max_count, workers=args.workers,
            identities=args.identities,
            facemodel=face_model_from_args(args),
            endpoint=args.endpoint,
        )
        # every argument error surfaces here, before anything is written
        sources = discover_parsing(cfg.layout, cfg.input, identities=cfg.identities or None)
    except ValueError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    try:
        summary = pack(cfg, sources=sources, progress=not args.no_progress)
    except RootBusyError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    return report(summary, args)


if __name__ == "__main__":
    sys.exit(main())
