"""Learning curves: validation gain over the mean face against triplets seen, side by side.

    .venv/bin/python benchmarks/learning_curve.py --data work/shards [--triplets 16000] [--every 2000]
        [--curves ceiling,full,lm3d] [--seeds 1] [--grad-split] [--json]

Every curve trains in this one process on the same data (the shard root's train split held in
memory) from the same seeds, and validates on the same first ``--val`` triplets of the val
split with the training metric (aligned vertex RMSE against the mean face's): the percentage
below the mean face after each ``--every`` triplets.

Curves (``--curves``, comma-separated):

- ``ceiling``: ``benchmarks/identity_ceiling.py``'s plain CNN (three views stacked, lm3d only,
  batch 16, Adam 1e-3): what the synthetic data gives per triplet to the most direct learner.
- ``full``: the ``tiny`` preset's full model with every loss term and its loss weights and
  schedule (stretched to the curve's own length), batch 8 per step.
- ``lm3d``: the same model with the photometric and 2D-landmark weights at 0.
- ``before``: the tiny preset as it was before the training-efficiency work (reference loss
  weights photo 24 and lm2d 0.02, Adam 3e-3 with cosine decay from step 500, BatchNorm in the
  involution kernel generators).
- ``v1`` ... ``v6``: the ablation variants (``dfmvr.tune.presets.ablation``) on the tiny preset.
- ``KEY=VALUE[;KEY=VALUE...]``: any other overrides on the tiny preset (label = the text).

``--json`` prints one JSON object as the last line with ``full_val_gain_pct_16k``,
``ceiling_val_gain_pct_16k`` (gains at 16k triplets, or at the last point when shorter; the
keys keep their names) and ``tiny_triplets_per_s`` (the full model's training steps in this
single process at ``--threads``), every curve's points under ``curves`` and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from identity_ceiling import ceiling_curve  # noqa: E402

from dfmvr.config import apply_overrides  # noqa: E402
from dfmvr.presets import tiny  # noqa: E402
from dfmvr.train.curve import learning_curve, load_split  # noqa: E402
from dfmvr.tune.presets import ablation  # noqa: E402

BEFORE = {"loss.photo": 24.0, "loss.lm2d": 2e-2, "optim.lr": 3e-3, "optim.ema_decay": 0.0,
                 "optim.warmup_steps": 0, "optim.cosine_after": 500, "model.regressor_blocks": "[3,4,6,3]",
                 "model.involution_norm": "batch"}
"""The tiny preset's training settings before the training-efficiency work (issue #11)."""


def curve_overrides(name: str) -> dict[str, object] | None:
    """Overrides on the tiny preset for the curve ``name`` (None for the ceiling)."""
    if name == "ceiling":
        return None
    if name == "full":
        return {}
    if name == "lm3d":
        return {"loss.photo": 0.0, "loss.lm2d": 0.0}
    if name == "before":
        return dict(BEFORE)
    variants = {v.name: v.overrides for v in ablation().variants}
    if name in variants:
        return dict(variants[name])
    if "=" in name:
        return dict(kv.split("=", 1) for kv in name.split(";"))
    raise SystemExit(f"--curves: unknown curve {name!r}; expected ceiling, full, lm3d, before, "
                     f"{', '.join(variants)} or KEY=VALUE[;KEY=VALUE]")


def print_grad_split(name: str, seed: int, points: list[dict]) -> None:
    """One line per point: each weighted term's gradient norms and its cosine with lm3d's."""
    for p in points:
        terms = "; ".join(f"{term} {g['head_id']:.3f} / {g['head_pose']:.3f} / {g['backbone']:.3f}, "
                          f"{g.get('cos_lm3d', float('nan')):+.2f}" for term, g in p["grad_split"].items())
        print(f"{name} seed {seed} {p['triplets']} triplets, gradient norms (identity rows / pose rows / backbone, "
              f"cosine with lm3d on the backbone): {terms}")


def gain_at(points: list[dict], triplets: int) -> float:
    """The gain at the first point at or after ``triplets`` (the last point when none is)."""
    for p in points:
        if p["triplets"] >= triplets:
            return p["gain_pct"]
    return points[-1]["gain_pct"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="work/shards", help="shard root with a manifest (made by make train)")
    ap.add_argument("--triplets", type=int, default=16000)
    ap.add_argument("--every", type=int, default=2000)
    ap.add_argument("--val", type=int, default=200, help="validation triplets (the first of the val split)")
    ap.add_argument("--val-data", help="shard root whose val split validates (default: --data's); compares "
                                       "training sets on the same validation triplets. Make it with another "
                                       "--seed (python -m sharding.synth): a subject's identity comes from "
                                       "(seed, subject index), so same-seed sets share identities")
    ap.add_argument("--curves", default="ceiling,full,lm3d")
    ap.add_argument("--seeds", type=int, default=1, help="seeds per curve (0, 1, ...); gains are averaged")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grad-split", action="store_true",
                    help="print each term's gradient on the head's identity and pose rows and on the backbone "
                         "(and its cosine with lm3d's) at every point (dfmvr.train.curve.gradient_split)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (Path(args.data) / "manifest.json").exists() and not args.data.startswith("s3://"):
        raise SystemExit(f"--data {args.data}: no manifest.json (run `make train` or `python -m sharding.synth` first)")
    if args.val_data and not (Path(args.val_data) / "manifest.json").exists() and not args.val_data.startswith("s3://"):
        raise SystemExit(f"--val-data {args.val_data}: no manifest.json")
    torch.set_num_threads(args.threads)
    # commas inside brackets belong to a value (model.regressor_blocks=[1,1,1,1])
    names = [c for c in re.split(r",(?![^\[]*\])", args.curves) if c]
    for name in names:
        curve_overrides(name)  # unknown names fail before the data is loaded

    # batch 8 per step in this one process (make train's 2 workers take 8 each, 16 per step; in one
    # process batch 8 learned more per triplet than 16: docs/training.md)
    base = apply_overrides(tiny(), {"data.url": str(args.data), "data.num_workers": 0, "data.batch_size": 8})
    t0 = time.perf_counter()
    val_base = apply_overrides(base, {"data.url": str(args.val_data)}) if args.val_data else base
    train, val = load_split(base, "train"), load_split(val_base, "val", limit=args.val, with_gt=True)
    print(f"loaded {len(train)} train and {len(val)} val triplets in {time.perf_counter() - t0:.0f} s", flush=True)

    curves: dict[str, dict] = {}
    for name in names:
        overrides = curve_overrides(name)
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            if overrides is None:
                pts = ceiling_curve(base, train, val, triplets=args.triplets, every=args.every, seed=seed)
            else:
                cfg = apply_overrides(base, overrides)
                pts = [p.to_dict() for p in learning_curve(cfg, train, val, triplets=args.triplets,
                                                           every=args.every, seed=seed,
                                                           with_grad_split=args.grad_split)]
                if args.grad_split:
                    print_grad_split(name, seed, pts)
            runs.append(pts)
            print(f"{name} seed {seed} ({time.perf_counter() - t0:.0f} s): "
                  + ", ".join(f"{p['triplets'] // 1000}k {p['gain_pct']:.1f}%" for p in pts), flush=True)
        mean_pts = [{"triplets": p["triplets"], "gain_pct": float(np.mean([r[i]["gain_pct"] for r in runs])),
                     "gain_pct_std": float(np.std([r[i]["gain_pct"] for r in runs])),
                     "nonfinite": int(sum(r[i].get("nonfinite", 0) for r in runs)),
                     "triplets_per_s": float(np.mean([r[i]["triplets"] / r[i]["train_s"] for r in runs]))}
                    for i, p in enumerate(runs[0])]
        curves[name] = {"overrides": overrides, "points": mean_pts, "seeds": runs}

    results: dict[str, float] = {}
    units: dict[str, str] = {}
    for name, c in curves.items():
        key = name if name.replace("-", "").isalnum() else f"custom{list(curves).index(name)}"
        results[f"{key}_val_gain_pct_16k"] = gain_at(c["points"], 16000)
        units[f"{key}_val_gain_pct_16k"] = "%"
    if "full" in curves:
        results["tiny_triplets_per_s"] = curves["full"]["points"][-1]["triplets_per_s"]
        units["tiny_triplets_per_s"] = "triplets/s"
    print("\n| curve | " + " | ".join(f"{p['triplets'] // 1000}k" for p in next(iter(curves.values()))["points"])
          + " |")
    for name, c in curves.items():
        print(f"| {name} | " + " | ".join(f"{p['gain_pct']:.1f}%" for p in c["points"]) + " |")
    if args.json:
        print(json.dumps({
            "benchmark": "learning_curve", "results": results, "units": units,
            "settings": {"triplets": args.triplets, "every": args.every, "val": args.val, "seeds": args.seeds,
                         "data": str(args.data), "val_data": str(args.val_data or args.data),
                         "train_triplets": len(train)},
            "curves": curves,
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "loadavg": os.getloadavg()},
        }))


if __name__ == "__main__":
    main()
