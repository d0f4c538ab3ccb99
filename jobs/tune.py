"""Ray Tune sweeps over the training job: the paper's ablation, loss weights, view angles, any space.

Cluster:   ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
               python jobs/tune.py --preset ablation --seeds 3 preset=paper data.url=s3://BUCKET/dfmvr/synth \
               tune.gpus_per_worker=0.5 tune.storage_path=s3://BUCKET/dfmvr/tune
One machine (local Ray, synthetic shards, SQLite MLflow under ./work):
           python jobs/tune.py --preset ablation --seeds 3 tune.name=ablation-tiny
           python jobs/tune.py tune.space.loss.photo=loguniform(4,64) tune.space.model.backbone=choice(cnn,unet,fusion) \
               tune.num_samples=4 tune.max_concurrent_trials=2
Resume an interrupted sweep (finished trials are kept):   python jobs/tune.py --resume tune.name=ablation-tiny

Usage: python jobs/tune.py [--preset ablation|loss-weights|angles] [--seeds N] [--resume]
                           [preset=tiny|paper] [--config FILE.yaml] [key=value ...] [--summary-json PATH]
The search space is written in config keys (docs/tuning.md): tune.space.KEY=grid(a,b) | choice(a,b) |
uniform(lo,hi) | loguniform(lo,hi) | randint(lo,hi) | VALUE. An unknown key or distribution fails here,
before Ray starts. The table (trial, variant, seeds, val RMSE mean ± std, train time) is printed at the end
and written with a bar chart to work/sweeps/<tune.name>/.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# idle OpenMP threads sleep instead of spinning (docs/benchmarks.md, "Renderer")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dfmvr.cli import overrides_of, parse_job_args, print_summary  # noqa: E402


def _options(parser) -> None:
    parser.add_argument("--preset", dest="sweep", default="none",
                        help="named sweep: ablation, loss-weights, angles (default: none, tune.space only)")
    parser.add_argument("--seeds", type=int, help="seeds per variant (tune.seeds)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep tune.name in work_dir")


def main(argv: list[str] | None = None) -> int:
    args, cfg, note = parse_job_args(__doc__, argv, add_arguments=_options)

    from dfmvr.train.launch import PreflightError
    from dfmvr.tune.presets import get_sweep
    from dfmvr.tune.sweep import SweepError, check_sweep, run_sweep, with_plan

    try:
        plan = get_sweep(args.sweep)
        user = overrides_of(args)
        if args.seeds is not None:
            user["tune.seeds"] = args.seeds
        cfg = with_plan(cfg, plan, user)
        if not args.resume:
            check_sweep(cfg, plan)  # bad keys and distributions fail here, before Ray and MLflow start
        elif set(user) - {"work_dir", "tune.name"}:
            print(f"warning: --resume continues with the sweep's saved configuration; ignoring "
                  f"{sorted(set(user) - {'work_dir', 'tune.name'})}", file=sys.stderr)
    except (KeyError, ValueError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    try:
        summary = run_sweep(cfg, plan, resume=args.resume, note=f"--preset {args.sweep} {note}")
    except (SweepError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(Path(summary["table"]).read_text())
    print_summary("sweep", summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if summary["status"] == "FINISHED" else 1


if __name__ == "__main__":
    sys.exit(main())
