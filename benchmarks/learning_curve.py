"""Learning curves: validation gain over the mean face against triplets seen, side by side.

    .venv/bin/python benchmarks/learning_curve.py --data work/shards [--triplets 16000] [--every 2000]
        [--curves ceiling,full,lm3d] [--seeds 1] [--grad-split] [--replicas 1] [--device cpu]
        [--parse-net FILE] [--image-size PX] [--parallel 1] [--progress-dir DIR] [--json]

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

Masks: with ``--parse-net FILE`` every curve reads that frozen parse net's masks (every preset's
default, ``model.input_masks=parse_net``: its mask cache is made beside the shards when missing)
and trains its mask loss with it; a curve with ``model.input_masks=given`` reads the shards' own
masks instead, side by side on the same triplets. Without ``--parse-net`` every curve reads the
shards' own masks and trains without the mask loss.

``--replicas 2`` takes ``make train``'s step (two workers' batches of 8, BatchNorm over each,
gradients averaged; :func:`dfmvr.train.curve.learning_curve`) instead of one batch of 8, so
``--replicas 2 --triplets 25600 --every 6400`` is the job's optimisation without Ray, the
loader or MLflow. ``--parallel P`` trains up to P curves (each curve and seed) at once in
their own processes, for a machine with cores or a GPU to spare; ``--progress-dir`` gets each
one's points as JSON lines while they run.

``--json`` prints one JSON object as the last line with ``full_val_gain_pct_16k``,
``ceiling_val_gain_pct_16k`` (gains at 16k triplets, or at the last point when shorter; the
keys keep their names) and ``tiny_triplets_per_s`` (the full model's training steps in this
single process at ``--threads``), every curve's points under ``curves`` and the machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from identity_ceiling import ceiling_curve  # noqa: E402
from machine import machine_record  # noqa: E402

from dfmvr.config import apply_overrides  # noqa: E402
from dfmvr.nets import read_parsenet_file  # noqa: E402
from dfmvr.presets import tiny  # noqa: E402
from dfmvr.train.curve import learning_curve, load_split  # noqa: E402
from dfmvr.train.masks import ensure_mask_cache  # noqa: E402
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


_SPLITS: dict = {}


def _load_splits(path: str, threads: int) -> None:
    """Process initialiser of ``--parallel``: the splits the parent saved, and the thread count."""
    torch.set_num_threads(threads)
    _SPLITS.update(torch.load(path, weights_only=False))


def masks_of(name: str, base) -> str:
    """Whose masks curve ``name`` trains on: its config's ``model.input_masks`` (the ceiling: given)."""
    overrides = curve_overrides(name)
    return "given" if overrides is None else apply_overrides(base, overrides).model.input_masks


def run_curve(name: str, seed: int, base, args, splits=None) -> list[dict]:
    """The points of curve ``name`` under ``seed`` (in a ``--parallel`` worker: on its loaded splits)."""
    train, val = (splits or _SPLITS)[masks_of(name, base)]
    overrides = curve_overrides(name)
    progress = None
    if args.progress_dir:
        path = Path(args.progress_dir) / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', name)}-seed{seed}.jsonl"

        def progress(p) -> None:
            with open(path, "a") as f:
                f.write(json.dumps({k: v for k, v in p.to_dict().items() if k != "grad_split"}) + "\n")
    t0 = time.perf_counter()
    if overrides is None:
        pts = ceiling_curve(base, train, val, triplets=args.triplets, every=args.every, seed=seed)
    else:
        cfg = apply_overrides(base, overrides)
        pts = [p.to_dict() for p in learning_curve(cfg, train, val, triplets=args.triplets, every=args.every,
                                                   seed=seed, with_grad_split=args.grad_split,
                                                   device=args.device, replicas=args.replicas,
                                                   on_point=progress)]
        if args.grad_split:
            print_grad_split(name, seed, pts)
    print(f"{name} seed {seed} ({time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{p['triplets'] / 1000:g}k {p['gain_pct']:.1f}%" for p in pts), flush=True)
    return pts


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
    ap.add_argument("--replicas", type=int, default=1,
                    help="batches of 8 per step, each normalised on its own and their gradients averaged: "
                         "2 is make train's step of two DDP workers")
    ap.add_argument("--image-size", type=int, default=0,
                    help="views and renders at this many px for every curve (0: the tiny preset's 64); the "
                         "shards are resized as the loader does")
    ap.add_argument("--device", default="cpu", help="where the model trains (cpu, cuda)")
    ap.add_argument("--parse-net", help="frozen parse-net file for every curve's mask loss, as make train's "
                                        "(work/parsenet/parsenet.pt after it)")
    ap.add_argument("--parallel", type=int, default=1, help="curves trained at once, each in its own process")
    ap.add_argument("--progress-dir", help="folder for each curve's points as JSON lines while it runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.replicas < 1 or args.parallel < 1:
        raise SystemExit(f"--replicas {args.replicas} / --parallel {args.parallel}: expected >= 1")
    if args.progress_dir:
        Path(args.progress_dir).mkdir(parents=True, exist_ok=True)
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
    # process batch 8 learned more per triplet than 16: docs/notes/training-readings.md, "Training efficiency")
    size = {"data.image_size": args.image_size, "render.image_size": args.image_size} if args.image_size else {}
    # without a parse net, no curve can read its masks: the shards' own are the default then
    base = apply_overrides(tiny(), {"data.url": str(args.data), "data.num_workers": 0, "data.batch_size": 8,
                                    "model.parse_net": args.parse_net or "",
                                    "model.input_masks": "parse_net" if args.parse_net else "given", **size})
    t0 = time.perf_counter()
    val_base = apply_overrides(base, {"data.url": str(args.val_data)}) if args.val_data else base
    splits = {}
    for kind in sorted({masks_of(name, base) for name in names}):
        caches = [None, None]
        if kind == "parse_net":
            if not args.parse_net:
                raise SystemExit("a curve reads the parse net's masks (model.input_masks=parse_net): pass --parse-net")
            bundle = read_parsenet_file(args.parse_net)
            caches = [ensure_mask_cache(c, bundle, splits=(split,), source=args.parse_net)[0]
                      for c, split in ((base, "train"), (val_base, "val"))]
        splits[kind] = (load_split(base, "train", mask_cache=caches[0]),
                        load_split(val_base, "val", limit=args.val, with_gt=True, mask_cache=caches[1]))
    train, val = next(iter(splits.values()))
    print(f"loaded {len(train)} train and {len(val)} val triplets ({', '.join(splits)} masks) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    tasks = [(name, seed) for seed in range(args.seeds) for name in names]
    if args.parallel > 1:
        import tempfile
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        with tempfile.TemporaryDirectory(prefix="dfmvr-curves-") as tmp:
            saved = str(Path(tmp) / "splits.pt")
            torch.save(splits, saved)
            with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn"), initializer=_load_splits,
                                     initargs=(saved, args.threads)) as pool:
                futures = {task: pool.submit(run_curve, *task, base, args) for task in tasks}
                done = {task: f.result() for task, f in futures.items()}
    else:
        done = {task: run_curve(*task, base, args, splits) for task in tasks}

    curves: dict[str, dict] = {}
    for name in names:
        overrides = curve_overrides(name)
        runs = [done[(name, seed)] for seed in range(args.seeds)]
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
                         "replicas": args.replicas, "device": args.device, "parallel": args.parallel,
                         "data": str(args.data), "val_data": str(args.val_data or args.data),
                         "train_triplets": len(train)},
            "curves": curves,
            "machine": machine_record(device=args.device),
        }))


if __name__ == "__main__":
    main()
