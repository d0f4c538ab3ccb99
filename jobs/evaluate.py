"""Evaluate a checkpoint on a shard split: NoW, point-to-plane and vertex errors in mm, beside
the mean-face and single-view baselines (docs/evaluation.md).

Cluster:   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
               python jobs/evaluate.py --checkpoint models:/dfmvr/3 data.url=s3://BUCKET/dfmvr/synth
One machine (after python jobs/train.py; MLflow in ./work/mlflow.db):
           python jobs/evaluate.py --checkpoint models:/dfmvr/1

Usage: python jobs/evaluate.py --checkpoint URI [--split test] [--out DIR] [--ray-threshold 256]
           [--chunk-size 64] [--overlays 4] [--max-samples N] [--icp-iters 60] [--device cpu|cuda|auto]
           [--fit-steps N [--fit-from network|mean] [--fit-landmarks given|mesh]]
           [--no-mlflow] [--summary-json PATH] [--config FILE.yaml] [key=value ...]
URI: a checkpoint directory, s3://bucket/prefix, runs:/RUN_ID/model or models:/NAME/VERSION.
Overrides (dotted config keys) apply on top of the checkpoint's own config, e.g. data.url=ROOT
(default: the shards it was trained on), facemodel.bfm_path=..., tracking.tracking_uri=...
Splits above --ray-threshold samples are spread over Ray tasks (ray.init(): the cluster under
ray job submit, else a local Ray). Metrics are logged to the checkpoint's MLflow run as
eval/<split>/... when it has one. Exit status: 0 done (skipped samples are listed), 1 no sample
could be scored, 2 bad input (checkpoint, shards, options).
With --fit-steps N each sample is fitted to its views after the network (dfmvr/fit.py) and the
fit is scored; the network alone is reported beside it (baselines.network), with each term
before and after (fit.before/after); --fit-from mean starts from the mean face instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dfmvr.cli import finish_batch_job, overrides_of, parse_job_args  # noqa: E402


def _options(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="path, s3://, runs:/RUN_ID/model or models:/NAME/VERSION")
    parser.add_argument("--split", default="test", help="manifest split (default test)")
    parser.add_argument("--out", help="output folder (default <work_dir>/eval/<checkpoint>-<split>)")
    parser.add_argument("--ray-threshold", type=int, default=256, help="use Ray above this many samples")
    parser.add_argument("--chunk-size", type=int, default=64, help="most samples per Ray task")
    parser.add_argument("--overlays", type=int, default=4, help="best and worst samples drawn, each")
    parser.add_argument("--max-samples", type=int, default=0, help="only the first N samples (0: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--icp-iters", type=int, default=60, help="most ICP iterations per alignment")
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to the checkpoint's MLflow run")
    parser.add_argument("--fit-steps", type=int, default=0,
                        help="fit each sample to its views for N steps after the network and score the fit (0: off)")
    parser.add_argument("--fit-from", default="network", choices=("network", "mean"),
                        help="start fitting from the network's prediction or the mean face (fitting alone)")
    parser.add_argument("--fit-landmarks", default="given", choices=("given", "mesh"),
                        help="landmarks the fit reads: the samples' own 68, or the face mesh landmarker's")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args, cli_cfg, _ = parse_job_args(__doc__, argv, add_arguments=_options)

    from dfmvr import tracking
    from dfmvr.evaluate.report import format_table, log_to_mlflow
    from dfmvr.evaluate.run import EvalConfig, checkpoint_slug, evaluate, resolve_device
    from dfmvr.serving import load

    overrides = overrides_of(args)
    work = Path(cli_cfg.work_dir)
    tracking_uri = tracking.resolve_tracking_uri(cli_cfg.tracking, work)
    tracking.use(tracking_uri)
    try:
        cfg = EvalConfig(split=args.split, out=args.out or str(work / "eval" / f"{checkpoint_slug(args.checkpoint)}-{args.split}"),
                         batch_size=args.batch_size, ray_threshold=args.ray_threshold, chunk_size=args.chunk_size,
                         n_overlays=args.overlays, max_samples=args.max_samples, device=args.device,
                         icp_iters=args.icp_iters, fit_steps=args.fit_steps, fit_from=args.fit_from,
                         fit_landmarks=args.fit_landmarks)
        recon = load(args.checkpoint, resolve_device(args.device), overrides)
        report = evaluate(recon, cfg, overrides=overrides)
    except (FileNotFoundError, ValueError, KeyError) as e:  # ManifestError and CaptureError are ValueErrors
        return _error(e.args[0] if e.args else str(e))

    summary = report.summary
    run_id, how = tracking.run_of_checkpoint(args.checkpoint, recon.payload) if not args.no_mlflow else (None, "--no-mlflow")
    if run_id:
        logged = log_to_mlflow(report, run_id, summary["checkpoint_step"])
        summary["mlflow"] = {"run_id": run_id, "found": how, "tracking_uri": tracking.redact(tracking_uri),
                             "metrics": len(logged)}
    else:
        summary["mlflow"] = {"run_id": None, "note": f"not logged to MLflow: {how}"}
    (report.out / "summary.json").write_text(json.dumps(summary, indent=1))

    print("\n" + format_table(summary))
    finish_batch_job("evaluation", {"checkpoint": summary["checkpoint"], "split": summary["split"],
                                    "input_masks": summary["input_masks"],
                                    "samples": summary["samples"], "skipped": summary["n_skipped"],
                                    "ray": summary["ray"], "seconds": summary["seconds"], "out": summary["out"],
                                    "mlflow_run_id": run_id or summary["mlflow"]["note"]},
                     report.skipped, "sample", args.summary_json, summary)
    return 0 if summary["samples"] else 1


if __name__ == "__main__":
    sys.exit(main())
