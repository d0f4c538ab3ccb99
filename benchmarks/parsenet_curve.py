"""Parse-net curves: validation mIoU (and every class's IoU) against training seconds, side by side.

    .venv/bin/python benchmarks/parsenet_curve.py --data work/shards [--steps 600] [--val-every 200]
        [--variant NAME=KEY=VALUE;KEY=VALUE ...] [--threads 2] [--json]

Every variant trains with :func:`dfmvr.train.parsing.train_parsenet` on the same shards from the same
seed, in this one process, on the tiny preset's parse-net settings with the variant's overrides
(``--variant unet_w=parsenet.arch=unet;parsenet.class_weights=0.3,0.5,3,3,3,3,1.5,3,2,2``; without
``--variant``, the four of docs/parsenet.md's table). Validation runs on the whole val split; its
time is left out of the seconds.

Every validation also scores the val views degraded as photos are (``parsenet.robustness``:
framing, background, colour, blur, noise, JPEG at full strength, the same views every time):
``miou_photo``, the robustness figure.

Each variant's network is also timed where training uses it frozen, at one thread (a training
worker's): ``fwd_img_per_s`` (eval forward without gradients: the network's input masks) and
``fwdbwd_img_per_s`` (forward, then backward to the input: the mask loss), at batch 24 (8 triplets).

``--json`` prints one JSON object as the last line: per variant ``{name}_miou``,
``{name}_min_class_iou``, ``{name}_miou_photo``, ``{name}_seconds``, ``{name}_fwd_img_per_s``, ``{name}_fwdbwd_img_per_s``,
every validation under ``curves`` and the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.config import apply_overrides, parse_cli_overrides  # noqa: E402
from dfmvr.facemodel.model import PARSE_CLASSES  # noqa: E402
from dfmvr.nets import create_parsenet  # noqa: E402
from dfmvr.train.parsing import train_parsenet  # noqa: E402
from dfmvr.presets import tiny  # noqa: E402

WEIGHTS = "0.3,0.5,3,3,3,3,1.5,3,2,2"
DEFAULT_VARIANTS = {
    "bisenet": "parsenet.arch=bisenet",
    "bisenet_weighted": f"parsenet.arch=bisenet;parsenet.class_weights={WEIGHTS}",
    "unet": "parsenet.arch=unet",
    "unet_weighted": f"parsenet.arch=unet;parsenet.class_weights={WEIGHTS}",
}


def throughput(cfg, *, batch: int = 24, repeats: int = 10) -> dict[str, float]:
    """Images per second of the variant's frozen net at one thread: forward, and forward+backward to the input."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = create_parsenet(cfg.parsenet.arch, width=cfg.parsenet.width).freeze()
        x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size)
        with torch.no_grad():
            net(x)
            t = time.perf_counter()
            for _ in range(repeats):
                net(x)
            fwd = batch * repeats / (time.perf_counter() - t)
        xg = x.clone().requires_grad_(True)
        net(xg).logsumexp(1).mean().backward()
        t = time.perf_counter()
        for _ in range(repeats):
            net(xg).logsumexp(1).mean().backward()
        fwdbwd = batch * repeats / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return {"fwd_img_per_s": fwd, "fwdbwd_img_per_s": fwdbwd}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="work/shards", help="shard root with train and val splits (masks)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE;KEY=VALUE (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else DEFAULT_VARIANTS

    results: dict[str, float] = {}
    curves: dict[str, list[dict]] = {}
    for name, text in variants.items():
        overrides = parse_cli_overrides([kv for kv in text.split(";") if kv])
        cfg = apply_overrides(tiny(), {"data.url": str(Path(args.data).resolve()), "seed": args.seed,
                                       "parsenet.steps": args.steps, "parsenet.val_every": args.val_every,
                                       **overrides})
        out = train_parsenet(cfg, device="cpu")
        curve = []
        for step, val in out.val_history:
            iou = {c: val[f"val/iou_{c}"] for c in PARSE_CLASSES}
            photo = val.get("val_photo/miou", math.nan)
            curve.append({"step": step, "seconds": round(val["val/train_seconds"], 1), "miou": round(val["val/miou"], 4),
                          "iou": {c: round(v, 4) for c, v in iou.items()}, "miou_photo": round(photo, 4),
                          "iou_photo": {c: round(val.get(f"val_photo/iou_{c}", math.nan), 4) for c in PARSE_CLASSES}})
            print(f"{name:>20} step {step:5d} {val['val/train_seconds']:7.1f} s  mIoU {val['val/miou']:.4f} "
                  f"(photo-degraded {photo:.4f})  " + " ".join(f"{c} {v:.2f}" for c, v in iou.items()), flush=True)
        curves[name] = curve
        last = curve[-1]
        finite = [v for v in last["iou"].values() if math.isfinite(v)]
        results.update({f"{name}_miou": last["miou"], f"{name}_min_class_iou": min(finite),
                        f"{name}_miou_photo": last["miou_photo"], f"{name}_seconds": last["seconds"]})
        results.update({f"{name}_{k}": round(v, 1) for k, v in throughput(cfg).items()})
    if args.json:
        units = {k: ("s" if k.endswith("_seconds") else "images/s" if k.endswith("_per_s") else "IoU") for k in results}
        print(json.dumps({"benchmark": "parsenet_curve", "results": results, "units": units, "curves": curves,
                          "variants": variants, "steps": args.steps,
                          "machine": machine_record(torch_threads=args.threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
