"""``python -m sharding.synth``: synthetic (left, front, right) triplets of procedural faces,
written as dfmvr shards.

    python -m sharding.synth --out ROOT [--subjects 40] [--captures 3] [--size 224]
        [--yaw -45,0,45] [--seed 0] [--splits 0.8,0.1,0.1] [--workers 2] [--n-vertices N]
        [--max-count 200] [--preview preview.png]

The generator itself is :mod:`dfmvr.data.synth` (the training job makes the embedded default's
data with it, and the library does not import ``sharding``); its docstring says what a sample
holds, how it is made deterministic and how a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from dfmvr.config import FaceModelConfig
from dfmvr.data.splits import parse_fractions
from dfmvr.data.synth import SynthConfig, run, write_preview
from sharding.progress import add_run_options, log_to_stderr


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="shard root: a directory or s3://bucket/prefix")
    p.add_argument("--subjects", type=int, default=40)
    p.add_argument("--captures", type=int, default=3, help="captures (expressions) per subject; the first is neutral")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--yaw", default="-45,0,45", help="nominal yaw of left,front,right in degrees")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,val,test fractions of the subjects")
    p.add_argument("--workers", type=int, default=2, help="rendering processes")
    p.add_argument("--n-vertices", type=int, default=None,
                   help="procedural model size (default: 35709 at >= 160 px, 12000 at >= 96 px, else 4000)")
    p.add_argument("--model-seed", type=int, default=0, help="procedural face model seed")
    p.add_argument("--facemodel", default="procedural", choices=("procedural", "bfm"))
    p.add_argument("--bfm-path", default="", help="BFM_model_front.mat when --facemodel bfm")
    p.add_argument("--max-count", type=int, default=200, help="samples per shard")
    p.add_argument("--image-format", default="png", choices=("png", "jpg"))
    p.add_argument("--preview", default=None, help="write a PNG of the first samples (masks, landmarks) here")
    p.add_argument("--preview-count", type=int, default=4)
    add_run_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log_to_stderr()
    facemodel = None
    if args.facemodel == "bfm":
        facemodel = FaceModelConfig(source="bfm", bfm_path=args.bfm_path)
    cfg = SynthConfig(
        out=args.out, n_subjects=args.subjects, n_captures=args.captures, size=args.size,
        yaw_deg=tuple(float(v) for v in args.yaw.split(",")), seed=args.seed,
        splits=parse_fractions(args.splits), workers=args.workers, n_vertices=args.n_vertices,
        model_seed=args.model_seed, facemodel=facemodel, max_count=args.max_count, image_format=args.image_format,
    )
    summary = run(cfg, progress=not args.no_progress)
    print(f"{summary.n_samples} triplets ({', '.join(f'{k} {v}' for k, v in summary.per_split.items())}) "
          f"of {sum(summary.subjects_per_split.values())} subjects at {cfg.size} px, {summary.n_vertices} vertices")
    print(f"made {len(summary.generated)} shards, kept {len(summary.kept)}; "
          f"{summary.seconds:.1f} s, {summary.triplets_per_s:.2f} triplets/s")
    print(f"manifest: {summary.manifest}")
    if args.preview:
        print(f"preview: {write_preview(cfg.out, args.preview, count=args.preview_count, endpoint=cfg.endpoint)}")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(asdict(summary), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
