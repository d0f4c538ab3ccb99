"""torch.compile on the network part of the step: eager against compiled, side by side in one process.

    .venv/bin/python benchmarks/compile_encode.py [--preset tiny] [--batch 8] [--threads 1]
        [--steps 30] [--mode default] [--json]

Times ``DFMVR.encode`` (backbone and regressor; the face model, renderer and losses are left
out: their rasteriser has data-dependent shapes) forward, backward and an Adam step on random
views and masks: eager, then ``torch.compile(model.encode)`` on a second model built from the
same seed, then eager again (the machine's drift over the run). Reported: median milliseconds
per step, the compiled model's first three steps (compilation included) and the ratio
eager / compiled. ``--json`` prints one JSON object as the last line with ``eager_ms``,
``compiled_ms``, ``eager_again_ms``, ``compile_s`` and ``speedup``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.model import DFMVR, build_model  # noqa: E402
from dfmvr.train.parsing import N_PARSE_CLASSES  # noqa: E402
from dfmvr.presets import get_preset  # noqa: E402


def bench(model: DFMVR, encode, images: torch.Tensor, masks: torch.Tensor, steps: int) -> tuple[float, float]:
    """``(median seconds per step, seconds for the first three steps)``."""
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step() -> None:
        loss = encode(images, masks).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, max-autotune)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    size = cfg.data.image_size
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, 3, size, size) * 2 - 1
    masks = torch.randint(0, N_PARSE_CLASSES, (args.batch, 3, size, size))

    def fresh() -> DFMVR:
        torch.manual_seed(1)
        return build_model(cfg)

    eager_model = fresh()
    eager, _ = bench(eager_model, eager_model.encode, images, masks, args.steps)
    print(f"eager: {1000 * eager:.1f} ms/step", flush=True)
    compiled_model = fresh()
    encode = torch.compile(compiled_model.encode, mode=None if args.mode == "default" else args.mode)
    compiled, first = bench(compiled_model, encode, images, masks, args.steps)
    print(f"compiled ({args.mode}): {1000 * compiled:.1f} ms/step, first three steps {first:.1f} s "
          f"(compilation included); eager / compiled {eager / compiled:.2f}x", flush=True)
    again, _ = bench(eager_model, eager_model.encode, images, masks, args.steps)
    print(f"eager again: {1000 * again:.1f} ms/step", flush=True)
    if args.json:
        results = {"eager_ms": 1000 * eager, "compiled_ms": 1000 * compiled, "eager_again_ms": 1000 * again,
                   "compile_s": first, "speedup": eager / compiled}
        print(json.dumps({"benchmark": "compile_encode", "results": results, "settings": vars(args),
                          "machine": machine_record()}))


if __name__ == "__main__":
    main()
