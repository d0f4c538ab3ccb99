"""BatchNorm statistics at validation: a trained checkpoint's running statistics against recomputed ones.

    .venv/bin/python benchmarks/precise_bn.py --checkpoint PATH_OR_URI [--data work/shards]
        [--batches 8x200,16x100,64x50] [--val 200] [--threads 2] [--json]

Training keeps BatchNorm's running statistics as an exponential average (momentum 0.1) over
batches of 8 per worker while the weights move; validation, evaluation and export use them in
eval mode. "Precise BatchNorm" recomputes them after training, with the weights fixed, as the
plain average over many training batches. This script measures what that would change: the
checkpoint's validation RMSE (the training metric: aligned vertex RMSE against the mean face's,
eval mode, the first ``--val`` triplets of the val split) with its own statistics, then with
statistics recomputed over ``N`` random training batches of ``B`` triplets for each ``BxN`` of
``--batches``. The checkpoint is not changed.

``--json`` prints one JSON object as the last line with ``running_stats_val_gain_pct`` and, per
setting, ``precise_<B>x<N>_val_gain_pct``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.config import apply_overrides  # noqa: E402
from dfmvr.model import network_masks, uses_parse_net_masks  # noqa: E402
from dfmvr.presets import tiny  # noqa: E402
from dfmvr.serving import load  # noqa: E402
from dfmvr.train.curve import load_split, val_gain  # noqa: E402
from dfmvr.train.masks import ensure_mask_cache  # noqa: E402


class Encoder(torch.nn.Module):
    """The network part of :class:`DFMVR` (no face model, no render): what BatchNorm sees."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.encode(batch["images"], batch["masks"])


def parse_batches(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise SystemExit(f"--batches {text!r}: expected BxN[,BxN...] with B, N >= 1 (e.g. 8x200,64x50)")
    return pairs  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="checkpoint directory or model URI (as jobs/evaluate.py)")
    ap.add_argument("--data", default="work/shards", help="shard root whose train and val splits are used")
    ap.add_argument("--batches", default="8x200,16x100,64x50")
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    settings = parse_batches(args.batches)
    torch.set_num_threads(args.threads)

    rec = load(args.checkpoint)
    model = rec.model
    cfg = apply_overrides(tiny(), {"data.url": args.data, "data.image_size": model.image_size})
    cache = None
    if uses_parse_net_masks(rec.cfg.model) and rec.payload.get("parse_net") is not None:
        # the masks the model trained on and reads: its bundled parse net's
        cache = ensure_mask_cache(cfg, rec.payload["parse_net"], source=f"bundled in {args.checkpoint}")[0]
    train = load_split(cfg, "train", mask_cache=cache)
    val = load_split(cfg, "val", limit=args.val, with_gt=True, mask_cache=cache)
    results: dict[str, float] = {}

    def record(key: str, rmse: float, mean: float, nonfinite: int) -> None:
        gain = 100 * (1 - rmse / mean)
        results[f"{key}_val_rmse_mm"], results[f"{key}_val_gain_pct"] = rmse, gain
        print(f"{key}: {rmse:.4f} mm against the mean face's {mean:.4f} ({gain:.2f}% below), "
              f"{nonfinite} non-finite", flush=True)

    record("running_stats", *val_gain(model, val))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise SystemExit(f"{args.checkpoint}: the model has no BatchNorm layer")
    encoder = Encoder(model)
    for bs, n in settings:
        gen = torch.Generator().manual_seed(args.seed)
        batches = (train.batch(torch.randperm(len(train), generator=gen)[:bs]) for _ in range(n))
        # torch's own precise-BatchNorm pass: resets the statistics, averages them over the
        # batches (momentum None), restores the momenta and the mode
        update_bn(({"images": b.images, "masks": network_masks(model, b)} for b in batches), encoder)
        record(f"precise_{bs}x{n}", *val_gain(model, val))
    if args.json:
        print(json.dumps({
            "benchmark": "precise_bn", "results": results,
            "settings": {"checkpoint": args.checkpoint, "data": args.data, "val": args.val, "batches": args.batches,
                         "batchnorm_layers": len(norms)},
            "machine": machine_record(),
        }))


if __name__ == "__main__":
    main()
