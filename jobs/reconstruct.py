"""Reconstruct new captures: per capture an OBJ, PLYs with albedo and shaded vertex colours, the
coefficients, the 68 3D landmarks and an overlay PNG; a contact sheet for the run
(docs/evaluation.md, "Jobs"; the formats are in dfmvr/reconstruct.py).

One machine:  python jobs/reconstruct.py --checkpoint models:/dfmvr/1 --input captures/ --out meshes/
From shards:  python jobs/reconstruct.py --checkpoint runs:/RUN_ID/model --shards work/shards --split test
(runs in this process, on a GPU when there is one; outputs are local files)

Usage: python jobs/reconstruct.py --checkpoint URI (--input DIR | --shards URL [--split test])
           [--aligned] [--largest-face] [--out DIR] [--batch-size 8] [--max-samples N]
           [--device cpu|cuda|auto] [--fit-steps N [--fit-from network|mean]]
           [--summary-json PATH] [--config FILE.yaml] [key=value ...]
DIR holds one folder per capture with left/front/right.png (or .jpg) and optionally
left/front/right.mask.png. The views are photos of any size: the face in each is found and
aligned to the model's crop (needs the 'detect' extra: pip install 'dfmvr[detect]'); a side view
where no face is found takes the front view's alignment (the summary says so per view), and
photo_overlay.png shows the fit on the photos. With --aligned the views are square, aligned
crops (as in the shards), resized to the model's size. Captures without masks get them from the
parse net (model.parse_net=PATH overrides the checkpoint's).
--fit-steps N refines each capture after the network: identity and albedo shared by the views,
per-view pose, expression and lighting, against every view's landmarks (given, or the face
mesh's on photos), the photometric and mask terms and the regulariser (dfmvr/fit.py); the
summary has each term before and after, overlays show the network and the fitted result.
Overrides (dotted config keys) apply on top of the checkpoint's own config.
Exit status: 0 done (skipped captures are listed), 1 nothing could be reconstructed, 2 bad input.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dfmvr.cli import finish_batch_job, overrides_of, parse_job_args  # noqa: E402


def _options(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="path, s3://, runs:/RUN_ID/model or models:/NAME/VERSION")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="folder of capture folders (left/front/right images)")
    source.add_argument("--shards", help="shard root (local or s3://) to read --split from")
    parser.add_argument("--split", default="test", help="split of --shards (default test)")
    parser.add_argument("--aligned", action="store_true", help="--input holds aligned square crops: no face detection")
    parser.add_argument("--largest-face", action="store_true",
                        help="photos with several faces: take the largest (default: skip the capture)")
    parser.add_argument("--out", help="output folder (default <work_dir>/reconstruct/<input name>)")
    parser.add_argument("--batch-size", type=int, default=8, help="captures per forward pass")
    parser.add_argument("--max-samples", type=int, default=0, help="with --shards: only the first N (0: all)")
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--fit-steps", type=int, default=0,
                        help="after the network, fit each capture to its views for N steps (0: off; 200 is the default fit)")
    parser.add_argument("--fit-from", default="network", choices=("network", "mean"),
                        help="start fitting from the network's prediction or the mean face (fitting alone)")


def main(argv: list[str] | None = None) -> int:
    args, cli_cfg, _ = parse_job_args(__doc__, argv, add_arguments=_options)
    from dfmvr import tracking
    from dfmvr.detect import DetectExtraMissing
    from dfmvr.evaluate.run import resolve_device
    from dfmvr.reconstruct import ReconstructConfig, reconstruct_folder, reconstruct_shards
    from dfmvr.serving import load

    work = Path(cli_cfg.work_dir)
    tracking.use(tracking.resolve_tracking_uri(cli_cfg.tracking, work))
    name = Path((args.input or f"{args.shards}-{args.split}").rstrip("/")).name
    try:
        cfg = ReconstructConfig(out=args.out or str(work / "reconstruct" / name), batch_size=args.batch_size,
                                aligned=args.aligned, largest_face=args.largest_face, fit_steps=args.fit_steps,
                                fit_from=args.fit_from)
        recon = load(args.checkpoint, resolve_device(args.device), overrides_of(args))
        if args.input:
            summary = reconstruct_folder(recon, args.input, cfg)
        else:
            summary = reconstruct_shards(recon, args.shards, args.split, cfg, endpoint=recon.cfg.data.s3_endpoint or None,
                                         max_samples=args.max_samples)
    except (FileNotFoundError, ValueError, KeyError, DetectExtraMissing) as e:  # ManifestError is a ValueError
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    result = summary.to_dict()
    finish_batch_job("reconstruction", {"checkpoint": result["checkpoint"], "done": result["n_done"],
                                        "skipped": result["n_skipped"], "out": result["out"],
                                        "contact_sheet": result["contact_sheet"]},
                     summary.skipped, "capture", args.summary_json, result)
    return 0 if summary.done else 1


if __name__ == "__main__":
    sys.exit(main())
