"""Where the paper step's time goes: ``torch.profiler`` tables of one training step of the
``paper`` preset (224 px, fusion backbone, RedNet-50, the 35k-vertex face model, every loss
term of ``reconstruction_losses`` and the Adam update), by part of the step and by operator.

    .venv/bin/python benchmarks/profile_step.py [--json] [--preset paper] [--batch 2] [--threads 2]
        [--steps 2] [--device cpu|cuda] [--bf16] [--channels-last] [--rows 15]

The step is the one ``benchmarks/train_step.py`` times (random tensors with a real batch's
shapes, the untrained model rendering the mean face at the nominal yaws); one warm-up step,
then ``--steps`` profiled steps. Parts are ``record_function`` ranges around the backbone, the
regressor, the decoder (face model, shading, rasteriser, landmarks), each loss term
(``reconstruction_losses``), ``backward`` and the optimiser step; the operator table is
``key_averages()`` sorted by self time (CPU, or CUDA with ``--device cuda``), so each
microsecond counts once. On a GPU the same command gives the kernels' table (the device
script ``benchmarks/gpu_check.sh`` runs it).

It also counts the step's arithmetic (``torch.utils.flop_counter``: convolutions and matrix
products, forward and backward) and times a float32 2048 x 2048 matrix product on the same
threads: the step's floor at that rate, against today's step.

``--json`` prints one JSON object as the last line (docs/design.md "Machine-readable results"):
``units`` "s" and "%"; ``parts`` (seconds per step and share), ``ops`` (the top rows: name,
self seconds per step, share, calls per step), ``step_s``, ``step_gflop``, ``gemm_gflops``,
``floor_s_at_gemm_rate``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402
from train_step import random_batch  # noqa: E402  (benchmarks/train_step.py: the same step)
from dfmvr.config import apply_overrides  # noqa: E402
from dfmvr.facemodel import build_face_model  # noqa: E402
from dfmvr.model import build_model  # noqa: E402
from dfmvr.presets import get_preset  # noqa: E402
from dfmvr.train.objective import reconstruction_losses  # noqa: E402

PARTS = ("backbone", "regressor", "decode", "losses", "backward", "optimizer")


def build(preset: str, batch: int, device: torch.device, bf16: bool, channels_last: bool = False):
    cfg = apply_overrides(get_preset(preset), {"render.backend": "torch"})
    face_model = build_face_model(cfg.facemodel)
    torch.manual_seed(0)
    model = build_model(cfg, device=device, face_model=face_model).train()
    if channels_last:  # train.channels_last
        model = model.to(memory_format=torch.channels_last)
    model.amp_dtype = torch.bfloat16 if bf16 else None
    data = random_batch(cfg, face_model, batch).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    # the parts as ranges: forward hooks open and close them around the two networks
    ranges: dict[str, torch.autograd.profiler.record_function] = {}

    def opener(name):
        def hook(*_):
            ranges[name] = torch.autograd.profiler.record_function(name)
            ranges[name].__enter__()
        return hook

    def closer(name):
        def hook(*_):
            ranges.pop(name).__exit__(None, None, None)
        return hook

    for name in ("backbone", "regressor"):
        module = getattr(model, name)
        module.register_forward_pre_hook(opener(name))
        module.register_forward_hook(closer(name))
    model.regressor.register_forward_hook(opener("decode"))  # the decoder runs from here to the forward's end

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(data.images, data.masks)
        if "decode" in ranges:
            ranges.pop("decode").__exit__(None, None, None)
        with torch.autograd.profiler.record_function("losses"):
            total, _ = reconstruction_losses(model, out, data, cfg.loss, step=10**6)
        with torch.autograd.profiler.record_function("backward"):
            total.backward()
        with torch.autograd.profiler.record_function("optimizer"):
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return step


def gemm_rate(device: torch.device, n: int = 2048, repeat: int = 10) -> float:
    """GFLOP/s of a float32 ``n x n`` matrix product on this device and thread count (the best of
    ``repeat``): what the machine's math library sustains on the friendliest shape."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the network part")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--channels-last", action="store_true", help="the network in channels-last (train.channels_last)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step = build(args.preset, args.batch, device, args.bf16, args.channels_last)
    step()  # warm-up: allocations, oneDNN primitives, the rasteriser's buffers
    # the step's arithmetic against the machine's own float32 matrix-multiply rate: how far from
    # the floor the step runs (a same-numbers speed-up cannot pass the floor)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    step_gflop = counter.get_total_flops() / 1e9
    gemm_gflops = gemm_rate(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    walls = []
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            walls.append(step())
    n = args.steps
    events = prof.key_averages()
    time_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total_attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    by_name = {e.key: e for e in events}
    step_s = sum(walls) / n
    parts = {}
    for name in PARTS:
        e = by_name.get(name)
        if e is not None:
            seconds = getattr(e, total_attr) / 1e6 / n
            parts[name] = {"s": round(seconds, 4), "pct": round(100 * seconds / step_s, 1)}
    ops = sorted((e for e in events if e.key not in PARTS and not e.key.startswith("ProfilerStep")),
                 key=lambda e: -getattr(e, time_attr))
    all_self = sum(getattr(e, time_attr) for e in events if e.key not in PARTS) / 1e6 / n
    top = [{"op": e.key, "self_s": round(getattr(e, time_attr) / 1e6 / n, 4),
            "pct": round(100 * getattr(e, time_attr) / 1e6 / n / max(all_self, 1e-12), 1),
            "calls": e.count // n} for e in ops[:args.rows]]
    print(f"{args.preset} step, batch {args.batch}, {args.threads} threads, {device.type}"
          f"{' bf16' if args.bf16 else ''}: {step_s:.3f} s a step ({args.batch / step_s:.2f} triplets/s)")
    floor_s = step_gflop / gemm_gflops
    print(f"arithmetic: {step_gflop:.1f} GFLOP a step (convolutions and matrix products, forward and backward); "
          f"float32 matrix multiply here {gemm_gflops:.0f} GFLOP/s: the step at that rate would take {floor_s:.2f} s, "
          f"{floor_s / step_s:.0%} of today's")
    print(f"{'part':<12}{'s / step':>10}{'share':>8}")
    for name, v in parts.items():
        print(f"{name:<12}{v['s']:>10.3f}{v['pct']:>7.1f}%")
    print(f"\n{'operator (self time)':<44}{'s / step':>10}{'share':>8}{'calls':>8}")
    for row in top:
        print(f"{row['op'][:43]:<44}{row['self_s']:>10.4f}{row['pct']:>7.1f}%{row['calls']:>8}")
    if args.json:
        print(json.dumps({"benchmark": "profile_step", "units": {"time": "s", "share": "%"}, "preset": args.preset,
                          "batch": args.batch, "threads": args.threads, "device": device.type, "bf16": args.bf16,
                          "channels_last": args.channels_last,
                          "step_s": round(step_s, 4), "triplets_per_s": round(args.batch / step_s, 3),
                          "parts": parts, "ops": top, "step_gflop": round(step_gflop, 2),
                          "gemm_gflops": round(gemm_gflops, 1), "floor_s_at_gemm_rate": round(floor_s, 3),
                          "machine": machine_record(device=device.type)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
