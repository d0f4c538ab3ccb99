"""Train DF-MVR with Ray Train, tracked in MLflow.

Cluster:   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
               python jobs/train.py preset=paper data.url=s3://BUCKET/dfmvr/synth
One machine (embedded defaults: synthetic shards, local Ray with 2 CPU workers, SQLite MLflow
under ./work):   python jobs/train.py        (what `make train` runs)

Usage: python jobs/train.py [preset=tiny|paper] [--config FILE.yaml] [key=value ...]
                            [--summary-json PATH]
Overrides are dotted config keys (dfmvr/config.py), e.g. optim.lr=1e-4 model.backbone=unet;
unknown keys and bad values fail here, before Ray starts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

STARTED = time.time()  # train.time_budget_s counts from here, imports included

# idle OpenMP threads sleep instead of spinning: with DataLoader workers and Ray workers sharing
# a few cores, spinning threads cost up to 10x (docs/benchmarks.md, "Renderer")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dfmvr.cli import parse_job_args, print_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args, cfg, note = parse_job_args(__doc__, argv)

    from dfmvr.train.launch import PreflightError, train
    from dfmvr.train.resume import ResumeMismatchError

    try:
        summary = train(cfg, overrides_note=note, started=STARTED)
    except (PreflightError, ResumeMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary("training", {k: v for k, v in summary.items() if k != "parse_net_iou"})
    if summary.get("parse_net_iou"):
        print("  parse net per-class IoU: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a"
                                                        for k, v in summary["parse_net_iou"].items()))
    if summary.get("registered_model_uri"):
        if summary.get("champion"):
            print(f"\n{summary['champion_uri']} now names {summary['registered_model_uri']}"
                  + (f" (it beats version {summary['previous_champion']})" if summary.get("previous_champion") else ""))
        else:
            print(f"\n{summary['champion_uri']} stays at version {summary['previous_champion']}: its val RMSE is lower "
                  f"than this run's; use {summary['registered_model_uri']} to reconstruct with this one")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if summary.get("status") == "FINISHED" else 1


if __name__ == "__main__":
    sys.exit(main())
