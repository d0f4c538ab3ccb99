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
mean face in percent; with ``--json`` the last stdout line is one JSON object (DESIGN.md
"Machine-readable results") with ``final_val_gain_pct`` and ``final_train_gain_pct``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfmvr.config import apply_overrides  # noqa: E402
from dfmvr.data.loader import make_loader  # noqa: E402
from dfmvr.facemodel import build_face_model  # noqa: E402
from dfmvr.presets import tiny  # noqa: E402
from dfmvr.train.metrics import aligned_vertex_rmse_mm  # noqa: E402


def load_split(cfg, split: str) -> dict[str, torch.Tensor]:
    """Every triplet of ``split`` in memory: ``x [T, 12, S, S]``, ``lmk3d [T, K, 3]``, ``gt [T, N, 3]``."""
    xs, lms, gts = [], [], []
    for b in make_loader(cfg.data, split, rank=0, world_size=1, resampled=False, with_gt=True, shuffle=False,
                         batch_size=32):
        mask = b.masks.unsqueeze(2).float() / 9 * 2 - 1  # class ids -> [-1, 1], as the model's mask channel
        xs.append(torch.cat([b.images, mask], 2).flatten(1, 2))
        lms.append(b.lmk3d)
        gts.append(torch.stack(b.gt_vertices))
    return {"x": torch.cat(xs), "lmk3d": torch.cat(lms), "gt": torch.cat(gts).double()}


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
    fm = build_face_model(cfg.facemodel)
    t0 = time.perf_counter()
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    load_s = time.perf_counter() - t0
    n_id, n_exp = fm.id_base.shape[1], fm.exp_base.shape[1]
    n_v = fm.mean_shape.shape[0]

    def shape(c: torch.Tensor) -> torch.Tensor:
        return fm.mean_shape + (c[:, :n_id] @ fm.id_base.T + c[:, n_id:] @ fm.exp_base.T).reshape(-1, n_v, 3)

    def rmse(net: nn.Module, split: dict, n: int) -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            gt = split["gt"][:n]
            pred = torch.cat([shape(net(x)) for x in split["x"][:n].split(64)]).double()
            mean = fm.mean_shape.double().expand_as(gt)
            out = float(aligned_vertex_rmse_mm(pred, gt).mean()), float(aligned_vertex_rmse_mm(mean, gt).mean())
        net.train()
        return out

    net = make_net(args.width, cfg.data.image_size, n_id + n_exp)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    rng = np.random.default_rng(0)
    n_eval = len(val["x"])
    history = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.from_numpy(rng.choice(len(train["x"]), args.batch_size, replace=False))
        lm = shape(net(train["x"][idx]))[:, fm.lm3d_index]
        loss = ((lm - train["lmk3d"][idx]).norm(dim=-1) * 100).mean()  # mm (face-model units are decimetres)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            v, vm = rmse(net, val, n_eval)
            t, tm = rmse(net, train, n_eval)
            row = {"step": step, "triplets_seen": step * args.batch_size, "lm3d_mm": float(loss),
                   "val_rmse_mm": v, "val_mean_face_mm": vm, "val_gain_pct": 100 * (1 - v / vm),
                   "train_rmse_mm": t, "train_mean_face_mm": tm, "train_gain_pct": 100 * (1 - t / tm)}
            history.append(row)
            print(f"step {step:5d} ({row['triplets_seen']} triplets, {time.perf_counter() - t0:.0f} s): "
                  f"val {v:.3f} mm vs mean face {vm:.3f} ({row['val_gain_pct']:.0f}% better), "
                  f"train {t:.3f} vs {tm:.3f} ({row['train_gain_pct']:.0f}%)", flush=True)
    last = history[-1]
    summary = {
        "benchmark": "identity_ceiling",
        "results": {"train_triplets": float(len(train["x"])), "final_val_gain_pct": last["val_gain_pct"],
                    "final_train_gain_pct": last["train_gain_pct"], "final_val_rmse_mm": last["val_rmse_mm"],
                    "triplets_seen": float(last["triplets_seen"]), "load_s": load_s},
        "units": {"train_triplets": "triplets", "final_val_gain_pct": "%",
                  "final_train_gain_pct": "%", "final_val_rmse_mm": "mm", "triplets_seen": "triplets",
                  "load_s": "s"},
        "history": history,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg": os.getloadavg()},
    }
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
