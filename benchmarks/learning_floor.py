"""The learning test's gains over seeds, thread counts and the parse net's precision: where its floors come from.

    .venv/bin/python benchmarks/learning_floor.py [--seeds 4] [--work /tmp/dfmvr-floor] [--json]

Runs ``tests/integration/test_learning.py``'s setting (its data, the builtin parse net's masks
from the mask cache, the tiny preset, :data:`LEARN_TRIPLETS` triplets with a validation half way)
under: seeds 0..``--seeds``-1 at one thread (the test's), seeds 0 and 1 at two threads (another
summation order, as another machine has), and seeds 0 and 1 with float32 masks (what a CPU
without native bf16 makes the cache with). The test's floors sit well under the lowest of these
(its docstrings say how far).

``--json`` prints one JSON object as the last line: ``min_gain_pct``, ``min_early_gain_pct`` and
every run under ``runs``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.config import apply_overrides  # noqa: E402
from dfmvr.nets import read_parsenet_file  # noqa: E402
from dfmvr.train.curve import learning_curve, load_split  # noqa: E402
from dfmvr.train.masks import ensure_mask_cache  # noqa: E402
from tests.integration.test_learning import LEARN_EARLY_TRIPLETS, LEARN_TRIPLETS, identity_setup  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--work", default="/tmp/dfmvr-floor")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.work) / "identity"
    shutil.rmtree(root, ignore_errors=True)
    torch.set_num_threads(1)
    cfg, train, val, parse = identity_setup(root)
    print(f"parse net mIoU {parse['miou']:.4f} on the test's validation views", flush=True)
    settings = ([(True, 1, s) for s in range(args.seeds)] + [(True, 2, s) for s in (0, 1)]
                + [(False, 1, s) for s in (0, 1)])
    splits = {True: (cfg, train, val)}
    runs = []
    for bf16, threads, seed in settings:
        if bf16 not in splits:
            c = apply_overrides(cfg, {"train.parse_net_amp": bf16, "data.parsed_masks_root": str(root / "float32")})
            cache, _ = ensure_mask_cache(c, read_parsenet_file(c.model.parse_net), device="cpu")
            splits[bf16] = (c, load_split(c, "train", mask_cache=cache),
                            load_split(c, "val", limit=200, with_gt=True, mask_cache=cache))
        c, tr, va = splits[bf16]
        torch.set_num_threads(threads)
        t0 = time.time()
        points = learning_curve(c, tr, va, triplets=LEARN_TRIPLETS, every=LEARN_EARLY_TRIPLETS, seed=seed)
        run = {"bf16_masks": bf16, "threads": threads, "seed": seed, "early_gain_pct": points[0].gain_pct,
               "gain_pct": points[-1].gain_pct, "seconds": time.time() - t0}
        runs.append(run)
        print(json.dumps(run), flush=True)
    results = {"min_gain_pct": min(r["gain_pct"] for r in runs),
               "min_early_gain_pct": min(r["early_gain_pct"] for r in runs)}
    print(f"lowest: {results['min_gain_pct']:.2f}% after {LEARN_TRIPLETS} triplets, "
          f"{results['min_early_gain_pct']:.2f}% after {LEARN_EARLY_TRIPLETS}")
    if args.json:
        print(json.dumps({"benchmark": "learning_floor", "results": results,
                          "units": {k: "%" for k in results}, "runs": runs,
                          "machine": machine_record()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
