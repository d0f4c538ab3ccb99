"""Train the face parse net (10 classes; ``parsenet.arch``) on shards with masks, tracked in MLflow.

Cluster:   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
               python jobs/train_parsenet.py preset=paper data.url=s3://BUCKET/dfmvr/synth
One machine (embedded defaults: synthetic shards under ./work/shards, made when missing;
SQLite MLflow under ./work):   python jobs/train_parsenet.py

Usage: python jobs/train_parsenet.py [preset=tiny|paper] [--config FILE.yaml] [key=value ...]
                                     [--summary-json PATH]
Overrides are dotted config keys (dfmvr/config.py, section ``parsenet``), e.g.
parsenet.steps=5000 parsenet.width=32; unknown keys and bad values fail here, before any work.

This is one process running a plain PyTorch loop on the driver (GPU when it has one, else
CPU), not Ray Train: a ResNet-18-sized segmentation net (BiSeNet, the paper's; the tiny preset's
is a small U-Net) on a few thousand views does not need data parallelism, and under ``ray job submit`` the driver runs on the head node. Validation
reports per-class IoU (``val/iou_<class>``) and ``val/miou`` on ``data.val_split``. The
exported checkpoint goes to ``<work_dir>/parsenet/parsenet.pt`` (or ``parsenet.out``); pass it
to the reconstruction job as ``model.parse_net=<path>`` or to
``python -m sharding.fill_masks --parse-net <path>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: its spin-waiting threads made this job's CPU training 7x slower
# here when other processes shared the two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dfmvr.cli import parse_job_args, print_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args, cfg, note = parse_job_args(__doc__, argv)

    from dfmvr.train.parsing import run_job

    summary = run_job(cfg, overrides_note=note)
    print_summary("parse net", {k: v for k, v in summary.items() if k not in ("iou", "iou_photo")})
    print("  per-class IoU: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a"
                                          for k, v in summary["iou"].items()))
    if summary.get("miou_photo") is not None:
        print("  the same views degraded as photos (parsenet.robustness): " + ", ".join(
            f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in summary["iou_photo"].items()))
    print(f"\n{summary['checkpoint']}")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if summary.get("status") == "FINISHED" else 1


if __name__ == "__main__":
    sys.exit(main())
