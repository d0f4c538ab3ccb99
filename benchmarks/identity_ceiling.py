"""How far below the mean face can a model get per triplet seen? A learning-efficiency ceiling.

    .venv/bin/python benchmarks/identity_ceiling.py --data work/shards [--steps 2000] [--json]

The embedded default (`make train`) must learn identity from 64 px images in a few minutes of
2 CPU cores. This measures what is achievable with the most direct supervision the synthetic
data offers: a small plain CNN (three views stacked as 12 channels, five stride-2 conv+BN+ReLU
blocks, two linear layers, about 7 ms per triplet here) regresses the identity and expression
coefficients, trained only on the sparse 3D landmarks (mean Euclidean distance in mm, the
``lm3d`` term) with Adam, batch ``--batch-size``. Every ``--every`` steps it reports the aligned
vertex RMSE (the training validation metric) on the val split and on as many training triplets,
next to the mean face's. No rendering, no pose, no photometric term: a ceiling for what the full
network can extract from the same number of triplets, not a model we ship.

Results: per checkpoint step, ``val_rmse_mm``, ``train_rmse_mm`` and the improvement over the
mean face in percent; with ``--json`` the last stdout line is one JSON object (docs/design.md
"Machine-readable results") with ``final_val_gain_pct`` and ``final_train_gain_pct``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.config import apply_overrides  # noqa: E402
from dfmvr.facemodel import build_face_model  # noqa: E402
from dfmvr.presets import tiny  # noqa: E402
from dfmvr.train.curve import MemorySplit, load_split  # noqa: E402
from dfmvr.train.metrics import aligned_vertex_rmse_mm  # noqa: E402


def make_net(width: int, size: int, n_out: int) -> nn.Sequential:
    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.BatchNorm2d(o), nn.ReLU())

    w = width
    side = size // 32
    net = nn.Sequential(block(12, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 8 * w), block(8 * w, 8 * w),
                        nn.Flatten(), nn.Linear(8 * w * side * side, 256), nn.ReLU(), nn.Linear(256, n_out))
    nn.init.zeros_(net[-1].weight)  # starts at the mean face, like the model's head
    nn.init.zeros_(net[-1].bias)
    return net


def ceiling_curve(cfg, train: MemorySplit, val: MemorySplit, *, triplets: int, every: int, seed: int = 0,
                  batch_size: int = 16, lr: float = 1e-3, width: int = 32,
                  train_eval: MemorySplit | None = None) -> list[dict]:
    """Train the ceiling CNN on ``train`` for ``triplets`` triplets; every ``every`` triplets the
    aligned vertex RMSE on ``val`` (and ``train_eval`` when given) beside the mean face's.

    Returns:
        ``[{triplets, step, lm3d_mm, val_rmse_mm, val_mean_face_mm, val_gain_pct, gain_pct, train_s,
        (train_rmse_mm, train_mean_face_mm, train_gain_pct)}]``; ``gain_pct`` repeats ``val_gain_pct``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    fm = build_face_model(cfg.facemodel)
    n_id, n_exp, n_v = fm.id_base.shape[1], fm.exp_base.shape[1], fm.mean_shape.shape[0]

    def stacked(split: MemorySplit, idx: torch.Tensor) -> torch.Tensor:
        t = split.tensors
        mask = t["masks"][idx].unsqueeze(2).float() / 9 * 2 - 1  # class ids -> [-1, 1], the model's mask channel
        return torch.cat([t["images"][idx], mask], 2).flatten(1, 2)  # [B, 12, S, S]

    def shape(c: torch.Tensor) -> torch.Tensor:
        return fm.mean_shape + (c[:, :n_id] @ fm.id_base.T + c[:, n_id:] @ fm.exp_base.T).reshape(-1, n_v, 3)

    def rmse(net: nn.Module, split: MemorySplit) -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            pred = torch.cat([shape(net(stacked(split, torch.arange(i, min(i + 64, len(split))))))
                              for i in range(0, len(split), 64)]).double()
        net.train()
        gt = split.gt.double()
        mean = fm.mean_shape.double().expand_as(gt)
        return float(aligned_vertex_rmse_mm(pred, gt).mean()), float(aligned_vertex_rmse_mm(mean, gt).mean())

    net = make_net(width, cfg.data.image_size, n_id + n_exp)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    points, seen, step, train_s = [], 0, 0, 0.0
    while seen < triplets:
        idx = torch.from_numpy(rng.choice(len(train), batch_size, replace=False))
        t0 = time.perf_counter()
        lm = shape(net(stacked(train, idx)))[:, fm.lm3d_index]
        loss = ((lm - train.tensors["lmk3d"][idx]).norm(dim=-1) * 100).mean()  # mm (decimetre units)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        seen += batch_size
        step += 1
        if seen // every > (seen - batch_size) // every or seen >= triplets:
            v, vm = rmse(net, val)
            row = {"triplets": seen, "step": step, "lm3d_mm": float(loss), "val_rmse_mm": v, "val_mean_face_mm": vm,
                   "val_gain_pct": 100 * (1 - v / vm), "gain_pct": 100 * (1 - v / vm), "train_s": train_s}
            if train_eval is not None:
                t, tm = rmse(net, train_eval)
                row.update(train_rmse_mm=t, train_mean_face_mm=tm, train_gain_pct=100 * (1 - t / tm))
            points.append(row)
            print(f"{seen} triplets ({train_s:.0f} s): val {v:.3f} mm vs mean face {vm:.3f} "
                  f"({row['val_gain_pct']:.0f}% better)"
                  + (f", train {row['train_rmse_mm']:.3f} vs {row['train_mean_face_mm']:.3f} "
                     f"({row['train_gain_pct']:.0f}%)" if train_eval is not None else ""), flush=True)
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="shard root with a manifest (e.g. work/shards after make train)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = apply_overrides(tiny(), {"data.url": str(args.data), "data.num_workers": 0})
    t0 = time.perf_counter()
    train = load_split(cfg, "train", with_gt=True)
    val = load_split(cfg, "val", with_gt=True)
    load_s = time.perf_counter() - t0
    # training-set error on as many triplets as validation has: how much of the gain generalises
    train_eval = MemorySplit({k: v[:len(val)] for k, v in train.tensors.items()}, train.gt[:len(val)])
    history = ceiling_curve(cfg, train, val, triplets=args.steps * args.batch_size, every=args.every * args.batch_size,
                            batch_size=args.batch_size, lr=args.lr, width=args.width, train_eval=train_eval)
    last = history[-1]
    summary = {
        "benchmark": "identity_ceiling",
        "results": {"train_triplets": float(len(train)), "final_val_gain_pct": last["val_gain_pct"],
                    "final_train_gain_pct": last["train_gain_pct"], "final_val_rmse_mm": last["val_rmse_mm"],
                    "triplets_seen": float(last["triplets"]), "load_s": load_s},
        "units": {"train_triplets": "triplets", "final_val_gain_pct": "%",
                  "final_train_gain_pct": "%", "final_val_rmse_mm": "mm", "triplets_seen": "triplets",
                  "load_s": "s"},
        "history": history,
        "machine": machine_record(),
    }
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
