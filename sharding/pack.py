"""Pack real multi-view captures into dfmvr shards.

    python -m sharding.pack --input DIR --out ROOT [--layout generic|pixelface|multipie|bosphorus]
        [--size 224] [--splits 0.8,0.1,0.1] [--seed 0] [--workers 2]

Every capture (three views of one subject) is read through a layout (:mod:`sharding.layouts`),
each view is cropped and aligned to the model's input size by a 5-point similarity to the
face model's template at that view's yaw (:mod:`dfmvr.data.align`), and the landmarks and masks
go through the same warp. Optional 3D landmarks and scans are converted to decimetres; point
clouds are meshed by Delaunay triangulation in the frontal x-y plane. Captures that cannot be
read (a missing view, an unreadable landmark file) are refused with a message naming the file
and listed at the end; the rest are packed. ``--out`` may be ``s3://bucket/prefix``. An
interrupted run publishes nothing partial, and the same command again resumes from the shards
it did publish (``shard-progress.json``).

Landmarks come from files beside the images (``--landmarks files``, the default), from the
detector for every view (``--landmarks detect``), or from files where they exist and the detector
elsewhere (``--landmarks auto``). The detector (the ``detect`` extra, :mod:`dfmvr.detect`) finds
the face with dlib and its 68 points with a landmarker (``--landmarker``): MediaPipe's face mesh
(Apache 2.0, the 68 points taken from its 468, :mod:`dfmvr.facemesh`), or dlib's iBUG-68
predictor, which is trained on non-commercial data and needs ``--accept-ibug-68``. Without
``--landmarker`` it is the iBUG predictor when ``--accept-ibug-68`` is given (as before the face
mesh came) and the face mesh otherwise. A view where no face is found (or several, without
``--largest-face``) refuses its capture, named. See docs/packing.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal


from dfmvr.config import FaceModelConfig, check_at_least
from dfmvr.data.shards import Sample, ShardWriter, write_manifest
from dfmvr.data.splits import SPLIT_NAMES, assign_splits, parse_fractions
from dfmvr.data.align import AlignmentTemplate
from sharding.progress import (
    PackedSummary,
    RootBusyError,
    SplitWriters,
    add_pack_options,
    add_run_options,
    face_model_from_args,
    load_progress,
    log_to_stderr,
    ordered_map,
    progress_bar,
    report,
    root_lock,
    save_progress,
)
from sharding.captures import DM_PER_UNIT, load_capture, safe_name
from sharding.layouts import (
    DEFAULT_YAW_DEG,
    LAYOUTS,
    PIXELFACE_LM3D_DROP,
    CaptureSource,
    InputError,
    discover,
    parse_view_map,
)

_logger = logging.getLogger(__name__)

MASKLESS_HINT = ("run the parse-net job to fill them in "
                 "(python -m sharding.fill_masks --input ROOT --out ROOT2 --parse-net CKPT)")


@dataclass(kw_only=True, slots=True)
class PackConfig:
    """What to pack and how."""

    input: str
    """Dataset folder."""
    out: str
    """Shard root: a local directory or ``s3://bucket/prefix``."""
    layout: Literal["generic", "pixelface", "multipie", "bosphorus"] = "generic"
    """Folder layout of ``input`` (docs/packing.md)."""
    size: int = 224
    """Output crop side in pixels."""
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/val/test fractions by subject (layouts with split folders keep theirs)."""
    seed: int = 0
    """Seed of the subject shuffle before the split."""
    yaw_deg: tuple[float, float, float] = DEFAULT_YAW_DEG
    """Nominal yaw of the left, front and right views (selects each view's template)."""
    max_count: int = 200
    """Samples per shard."""
    image_format: Literal["png", "jpg"] = "png"
    """Encoding of the aligned views in the shards."""
    scan_units: Literal["mm", "cm", "dm", "m"] = "mm"
    """Length unit of scans and meshes in the input (converted to decimetres)."""
    lm3d_units: Literal["mm", "cm", "dm", "m"] = "mm"
    """Length unit of 3D-landmark files in the input (converted to decimetres)."""
    workers: int = 1
    """Processes reading and aligning captures (1: in this process)."""
    facemodel: FaceModelConfig = field(default_factory=lambda: FaceModelConfig(n_vertices=4000))
    """Face model whose mean face defines the alignment templates."""
    layout_options: dict = field(default_factory=dict)
    """Layout-specific options (``view_dirs``, ``cameras``, ``poses``, ``lm3d_drop``, ``transpose``)."""
    endpoint: str | None = None
    """S3 endpoint (else ``AWS_ENDPOINT_URL``)."""
    landmarks: Literal["files", "detect", "auto"] = "files"
    """Where 68-point landmarks come from: files beside the images, the detector for every view,
    or files where present and the detector elsewhere."""
    accept_ibug_68: bool = False
    """Accept the non-commercial terms of dlib's iBUG-68 model (needed by ``landmarker="ibug68"``)."""
    landmarker: Literal["mesh", "ibug68"] | None = None
    """What finds the 68 points of a detected face: the face mesh or dlib's iBUG-68 predictor.
    None: ``"ibug68"`` when ``accept_ibug_68``, else ``"mesh"`` (set in ``__post_init__``)."""
    largest_face: bool = False
    """Views with several faces: take the largest instead of refusing the capture."""

    def fingerprint(self) -> str:
        """Hash of every setting that decides what the shards hold (not ``workers``, ``endpoint``)."""
        doc = {k: v for k, v in asdict(self).items() if k not in ("workers", "endpoint")}
        if self.landmarks == "files" or self.landmarker == "ibug68":
            del doc["landmarker"]  # as packs made before the face mesh came: their fingerprints stay
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def __post_init__(self) -> None:
        if self.landmarks not in ("files", "detect", "auto"):
            raise ValueError(f"landmarks: expected 'files', 'detect' or 'auto', got {self.landmarks!r}")
        if self.landmarker is None:
            self.landmarker = "ibug68" if self.accept_ibug_68 else "mesh"
        if self.landmarker not in ("mesh", "ibug68"):
            raise ValueError(f"landmarker: expected 'mesh' or 'ibug68', got {self.landmarker!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {self.layout!r}")
        check_at_least("size", self.size, 16, " px")
        if len(self.yaw_deg) != 3:
            raise ValueError(f"yaw_deg: expected 3 angles (left, front, right), got {self.yaw_deg!r}")
        check_at_least("max_count", self.max_count, 1)
        for name in ("scan_units", "lm3d_units"):
            if getattr(self, name) not in DM_PER_UNIT:
                raise ValueError(f"{name}: expected one of {sorted(DM_PER_UNIT)}, got {getattr(self, name)!r}")
        self.splits = parse_fractions(self.splits)


@dataclass(kw_only=True, slots=True)
class PackSummary(PackedSummary):
    """What a pack run did: captures (``skipped``: ``(folder, reason)``)."""

    unit = "captures"

    without_masks: int
    """Captures packed with no masks."""

    def notes(self) -> list[str]:
        return [f"{self.without_masks} captures packed without masks: {MASKLESS_HINT}"] if self.without_masks else []


# ---------------------------------------------------------------------------------------------
# workers

_worker_state: dict = {}


def _init_worker(template: AlignmentTemplate, cfg: PackConfig) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker_state["template"] = template
    _worker_state["cfg"] = cfg


def _load_one(src: CaptureSource) -> tuple[Sample | None, list[str], str | None]:
    try:
        sample, notes = load_capture(src, _worker_state["template"], _worker_state["cfg"])
        return sample, notes, None
    except (InputError, ValueError) as e:
        return None, [], str(e)


def _iter_loaded(sources: list[CaptureSource], template: AlignmentTemplate, cfg: PackConfig
                 ) -> Iterator[tuple[CaptureSource, Sample | None, list[str], str | None]]:
    for src, result in ordered_map(_load_one, sources, workers=cfg.workers, initializer=_init_worker,
                                   initargs=(template, cfg), chunksize=4):
        yield (src, *result)


# ---------------------------------------------------------------------------------------------
# the run


def build_template(cfg: PackConfig) -> AlignmentTemplate:
    """The alignment templates for ``cfg.yaw_deg`` at ``cfg.size`` from ``cfg.facemodel``'s mean face."""
    from dfmvr.facemodel import build_face_model

    model = build_face_model(cfg.facemodel)
    return AlignmentTemplate.from_face_model(model, cfg.yaw_deg, cfg.size)


def pack(cfg: PackConfig, *, progress: bool = False) -> PackSummary:
    """Pack every capture under ``cfg.input`` into shards under ``cfg.out`` and write the manifest.

    Refused captures are logged with the reason (naming the file) and listed in the summary;
    the rest are packed. No manifest is written when nothing could be packed. Two packers on one
    root: the second fails fast with :class:`RootBusyError`.
    """
    with root_lock(cfg.out, cfg.endpoint):
        return _pack(cfg, progress=progress)


def _sample_key(src: CaptureSource) -> str:
    return f"{safe_name(src.subject)}-{safe_name(src.capture)}"


def _pack(cfg: PackConfig, *, progress: bool) -> PackSummary:
    options = dict(cfg.layout_options)
    options.setdefault("yaw_deg", tuple(cfg.yaw_deg))
    sources = discover(cfg.layout, Path(cfg.input), **options)
    template = build_template(cfg)
    fixed = {s.split for s in sources if s.split is not None}
    split_of = assign_splits([s.subject for s in sources if s.split is None], cfg.splits, cfg.seed)
    for s in sources:
        if s.split is not None and s.split not in SPLIT_NAMES:
            _logger.info("%s: split folder %r kept as the split name", s.folder, s.split)
    if fixed:
        _logger.info("layout %s fixes the splits from its folders: %s", cfg.layout, sorted(fixed))

    # an interrupted run of the same command left shards: keep them, pack the rest
    recorded, maskless = load_progress(cfg)
    done_keys = {k for i in recorded for k in i.keys}
    if recorded:
        _logger.info("resuming: %d shards (%d captures) of an interrupted run kept; packing the rest",
                     len(recorded), len(done_keys))
        sources = [s for s in sources if _sample_key(s) not in done_keys]
    skipped: list[tuple[str, str]] = []
    # on an error or Ctrl-C the unfinished shards are discarded, never published half full;
    # without a manifest the root lists nothing of this run
    with (progress_bar(progress, total=len(sources), unit="capture", desc="pack") as tick,
          SplitWriters(cfg, recorded, ShardWriter, without_masks=maskless) as writers):
        for src, sample, notes, error in _iter_loaded(sources, template, cfg):
            tick()
            for note in notes:
                _logger.warning(note)
            if sample is None:
                _logger.error("skipping %s: %s", src.folder, error)
                skipped.append((str(src.folder), str(error)))
                continue
            if sample.masks is None:  # counted with the captures of an interrupted run's kept shards
                maskless.add(sample.key)
                _logger.info("%s: packed without masks (%s)", src.folder, MASKLESS_HINT)
            writers.write(src.split or split_of[src.subject], sample)
        infos = writers.close()
        save_progress(cfg, infos, maskless)
    per_split = writers.per_split
    manifest = None
    without_masks = len(maskless)
    packed = sum(per_split.values())
    if packed:
        extra = {
            "source": f"pack:{cfg.layout}",
            "pack": {
                "input": str(cfg.input), "layout": cfg.layout, "seed": cfg.seed, "splits": list(cfg.splits),
                "yaw_deg": list(cfg.yaw_deg), "scan_units": cfg.scan_units, "lm3d_units": cfg.lm3d_units,
                "layout_options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.layout_options.items()},
            },
            "alignment_template": template.to_dict(),
            "without_masks": without_masks,
            "skipped": [folder for folder, _ in skipped],
        }
        manifest = write_manifest(cfg.out, infos, image_size=cfg.size, extra=extra, endpoint=cfg.endpoint)
    if without_masks:
        _logger.warning("%d captures packed without masks: %s", without_masks, MASKLESS_HINT)
    if skipped:
        _logger.warning("skipped %d captures: %s", len(skipped), ", ".join(f for f, _ in skipped))
    return PackSummary(packed=packed, per_split=per_split, skipped=skipped, without_masks=without_masks,
                       manifest=manifest, shards=[i.url for i in infos])


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding.pack", description=__doc__.split("\n\n")[0])
    add_pack_options(p, max_count=200, workers_help="processes reading and aligning captures",
                     facemodel_help="face model whose mean face gives the alignment templates")
    p.add_argument("--layout", default="generic", choices=sorted(LAYOUTS))
    p.add_argument("--yaw", default="-45,0,45", help="nominal yaw of left,front,right in degrees")
    p.add_argument("--scan-units", default="mm", choices=sorted(DM_PER_UNIT), help="unit of scans/meshes in the input")
    p.add_argument("--lm3d-units", default="mm", choices=sorted(DM_PER_UNIT), help="unit of 3D landmarks in the input")
    p.add_argument("--view-dirs", default=None, help="pixelface: e.g. left=0,front=1,right=2")
    p.add_argument("--lm3d-drop", default=None,
                   help=f"pixelface: 0-based indices dropped from the 106 3D landmarks (default {PIXELFACE_LM3D_DROP})")
    p.add_argument("--no-transpose", action="store_true", help="pixelface: the images are stored upright")
    p.add_argument("--cameras", default=None, help="multipie: e.g. left=08_0,front=05_1,right=19_0")
    p.add_argument("--poses", default=None, help="bosphorus: e.g. left=YR_R45,front=N_N,right=YR_L45")
    p.add_argument("--landmarks", default="files", choices=("files", "detect", "auto"),
                   help="68-point landmarks from files beside the images, the detector (every view), "
                        "or files where present and the detector elsewhere (detector: the 'detect' extra)")
    p.add_argument("--landmarker", default=None, choices=("mesh", "ibug68"),
                   help="the detector's 68 points: from MediaPipe's face mesh (Apache 2.0) or dlib's iBUG-68 "
                        "predictor (non-commercial, needs --accept-ibug-68); default: ibug68 with "
                        "--accept-ibug-68, else mesh")
    p.add_argument("--accept-ibug-68", action="store_true",
                   help="accept the non-commercial terms of dlib's iBUG 300-W 68-point model (--landmarker ibug68)")
    p.add_argument("--largest-face", action="store_true",
                   help="views with several faces: take the largest (default: refuse the capture)")
    add_run_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log_to_stderr()
    options: dict = {}
    if args.view_dirs:
        options["view_dirs"] = parse_view_map(args.view_dirs, "--view-dirs")
    if args.lm3d_drop is not None:
        options["lm3d_drop"] = tuple(int(v) for v in args.lm3d_drop.split(",") if v.strip())
    if args.no_transpose:
        options["transpose"] = False
    if args.cameras:
        options["cameras"] = parse_view_map(args.cameras, "--cameras")
    if args.poses:
        options["poses"] = parse_view_map(args.poses, "--poses")
    cfg = PackConfig(
        input=args.input, out=args.out, layout=args.layout, size=args.size,
        splits=parse_fractions(args.splits), seed=args.seed,
        yaw_deg=tuple(float(v) for v in args.yaw.split(",")), max_count=args.max_count,
        image_format=args.image_format, scan_units=args.scan_units, lm3d_units=args.lm3d_units,
        workers=args.workers, facemodel=face_model_from_args(args), layout_options=options,
        landmarks=args.landmarks, accept_ibug_68=args.accept_ibug_68, landmarker=args.landmarker,
        largest_face=args.largest_face,
    )
    try:
        if cfg.landmarks != "files":  # fail before reading anything: extra missing, terms not accepted
            from dfmvr.detect import require
            require(landmarks68=cfg.landmarker == "ibug68", accept_noncommercial=cfg.accept_ibug_68,
                    mesh=cfg.landmarker == "mesh")
        summary = pack(cfg, progress=not args.no_progress)
    except (RootBusyError, ImportError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return report(summary, args)


if __name__ == "__main__":
    sys.exit(main())
