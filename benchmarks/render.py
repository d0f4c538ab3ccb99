"""Renderer speed: forward + backward seconds per image for each backend, on a BFM-sized face.

    .venv/bin/python benchmarks/render.py [--json] [--batch 4] [--size 224] [--backends torch,pytorch3d] [--repeat N]

The mesh is the procedural face model at 35709 vertices (BFM's count) when
``dfmvr.facemodel.procedural`` is importable, else a stand-in of the same size (the front of an
ellipsoid, 189 x 189 grid: 35721 vertices, 70688 faces); the output says which. ``--batch``
near-frontal views (yaw spread over +-15 degrees) at the camera of docs/design.md ("Camera":
distance 10, focal 1015 at 224 px) fill a realistic part of the image. One timed step is:
render (image with gradients to vertex positions and colours), an L2 photometric loss against
a fixed target, ``backward()``. The torch backend gets one warm-up step and ``--repeat`` timed
steps (median reported); pytorch3d's CPU rasteriser is naive (seconds per image), so it runs
``--pytorch3d-repeat`` (default 1) timed steps after a warm-up at 16 px.

With ``--json`` the last stdout line is one JSON object (docs/design.md "Machine-readable results"):
``results.torch_s_per_image``, ``results.pytorch3d_s_per_image`` (seconds, forward+backward),
``results.speedup_torch_over_pytorch3d`` and forward-only, process-CPU-time (all threads) and
agreement figures. Wall times on a shared machine depend on its load, which is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.facemodel.geometry import rigid_transform  # noqa: E402
from dfmvr.render import Camera, Renderer  # noqa: E402
from dfmvr.render import pytorch3d_backend  # noqa: E402

BFM_VERTICES = 35709


def stand_in_mesh(n: int = 189) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Front of a head-sized ellipsoid (decimetres): vertices [n*n, 3], faces, smooth colours."""
    t = torch.linspace(-80.0, 80.0, n, dtype=torch.float64) * math.pi / 180
    lat, lon = torch.meshgrid(t, t, indexing="ij")
    verts = torch.stack([0.78 * lat.cos() * lon.sin(), lat.sin(), 0.65 * lat.cos() * lon.cos()], -1)
    verts = verts.reshape(-1, 3).float()
    idx = torch.arange(n * n).view(n, n)
    q0, q1, q2, q3 = idx[:-1, :-1], idx[:-1, 1:], idx[1:, 1:], idx[1:, :-1]
    tri = torch.cat([torch.stack([q0, q2, q1], -1).view(-1, 3), torch.stack([q0, q3, q2], -1).view(-1, 3)])
    colors = 0.5 + 0.4 * torch.stack([(9 * verts[:, 0]).sin(), (7 * verts[:, 1]).cos(), (5 * verts[:, 2]).sin()], -1)
    return verts, tri, colors


def benchmark_mesh() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(vertices [N, 3], tri [F, 3], colours [N, 3], description)."""
    try:
        from dfmvr.facemodel.procedural import make_procedural_model
    except ImportError:
        verts, tri, colors = stand_in_mesh()
        return verts, tri, colors, f"stand-in ellipsoid grid ({verts.shape[0]} vertices, {tri.shape[0]} faces)"
    model = make_procedural_model(n_vertices=BFM_VERTICES)
    verts, tri = model.mean_shape.float(), model.tri.long()
    colors = model.mean_tex.float().view(-1, 3)
    return verts, tri, colors, f"procedural face model ({verts.shape[0]} vertices, {tri.shape[0]} faces)"


def posed_batch(verts: torch.Tensor, colors: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    yaws = torch.linspace(-15.0, 15.0, batch) if batch > 1 else torch.zeros(1)
    angles = torch.stack([torch.zeros(batch), yaws * math.pi / 180, torch.zeros(batch)], -1)
    posed = rigid_transform(verts.expand(batch, -1, -1), angles, torch.zeros(batch, 3))
    return posed.contiguous(), colors.expand(batch, -1, -1).contiguous()


def step(renderer: Renderer, verts: torch.Tensor, tri: torch.Tensor, colors: torch.Tensor,
         target: torch.Tensor) -> tuple[float, float, float, object]:
    """One forward + backward; returns (forward s, total s, process CPU s, rendered)."""
    verts = verts.detach().requires_grad_()
    colors = colors.detach().requires_grad_()
    sync = torch.cuda.synchronize if verts.is_cuda else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = renderer(verts, tri, colors)
    loss = (out.image - target).square().mean()
    sync()
    forward = time.perf_counter() - start
    loss.backward()
    sync()
    total = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    assert verts.grad is not None and colors.grad is not None
    return forward, total, cpu, out


def run_backend(name: str, camera: Camera, verts, tri, colors, target, repeat: int, warmup: bool) -> dict:
    renderer = Renderer(camera, backend=name, device=verts.device)
    if warmup:
        step(renderer, verts, tri, colors, target)
    else:  # first-call costs (imports, allocations) paid on a tiny image only
        Renderer(Camera.at_size(16), backend=name, device=verts.device)(verts[:1], tri, colors[:1])
    forwards, totals, cpus, out = [], [], [], None
    for _ in range(repeat):
        forward, total, cpu, out = step(renderer, verts, tri, colors, target)
        forwards.append(forward)
        totals.append(total)
        cpus.append(cpu)
    batch = verts.shape[0]
    return {"s_per_image": statistics.median(totals) / batch, "min_s_per_image": min(totals) / batch,
            "forward_s_per_image": statistics.median(forwards) / batch,
            "cpu_s_per_image": statistics.median(cpus) / batch, "out": out, "runs": len(totals)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--batch", type=int, default=4, help="images per step")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--backends", default="torch,pytorch3d", help="comma-separated: torch, pytorch3d")
    parser.add_argument("--repeat", type=int, default=10, help="timed steps for the torch backend")
    parser.add_argument("--pytorch3d-repeat", type=int, default=1, help="timed steps for pytorch3d")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for name in backends:
        if name not in ("torch", "pytorch3d"):
            parser.error(f"--backends: unknown backend {name!r}; expected torch and/or pytorch3d")

    verts, tri, colors, mesh_name = benchmark_mesh()
    camera = Camera.at_size(args.size)
    verts, colors = posed_batch(verts, colors, args.batch)
    verts, tri, colors = verts.to(device), tri.to(device), colors.to(device)
    target = torch.full((args.batch, 3, args.size, args.size), 0.5, device=device)
    print(f"mesh: {mesh_name}; batch {args.batch} at {args.size} px on {device} "
          f"({torch.get_num_threads()} threads), forward + backward")

    results: dict[str, float] = {}
    outs = {}
    rows = []
    for name in backends:
        if name == "pytorch3d" and not pytorch3d_backend.available():
            print(f"pytorch3d: skipped ({pytorch3d_backend.INSTALL_HINT})")
            continue
        is_torch = name == "torch"
        res = run_backend(name, camera, verts, tri, colors, target,
                          args.repeat if is_torch else args.pytorch3d_repeat, warmup=is_torch or device.type == "cuda")
        outs[name] = res.pop("out")
        results[f"{name}_s_per_image"] = res["s_per_image"]
        results[f"{name}_min_s_per_image"] = res["min_s_per_image"]
        results[f"{name}_forward_s_per_image"] = res["forward_s_per_image"]
        results[f"{name}_cpu_s_per_image"] = res["cpu_s_per_image"]
        rows.append((name, res))

    coverage = next(iter(outs.values())).mask.mean().item() if outs else float("nan")
    results["covered_fraction"] = coverage
    if "torch" in outs and "pytorch3d" in outs:
        a, b = outs["torch"], outs["pytorch3d"]
        results["speedup_torch_over_pytorch3d"] = results["pytorch3d_s_per_image"] / results["torch_s_per_image"]
        both = (a.mask * b.mask)[:, 0].bool()
        results["mask_mismatch_fraction"] = (a.mask != b.mask).float().sum().item() / max(1.0, a.mask.sum().item())
        err = (a.image - b.image).abs().amax(1)[both]
        results["colour_mismatch_fraction"] = (err > 1 / 255).float().mean().item()

    print(f"covered pixels: {coverage:.1%} of the image")
    print(f"{'backend':<10} {'s/image (median)':>17} {'min':>9} {'forward':>9} {'CPU s/image':>12} {'runs':>5}")
    for name, res in rows:
        print(f"{name:<10} {res['s_per_image']:>17.4f} {res['min_s_per_image']:>9.4f} "
              f"{res['forward_s_per_image']:>9.4f} {res['cpu_s_per_image']:>12.4f} {res['runs']:>5}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "speedup_torch_over_pytorch3d" in results:
        print(f"torch is {results['speedup_torch_over_pytorch3d']:.0f}x faster than pytorch3d; "
              f"{results['mask_mismatch_fraction']:.3%} coverage and {results['colour_mismatch_fraction']:.3%} "
              f"colour (> 1/255) mismatches")
    if args.json:
        units = {k: ("s" if k.endswith("_s_per_image") else "ratio" if k.startswith("speedup") else "fraction")
                 for k in results}
        record = {
            "benchmark": "render",
            "results": results,
            "units": units,
            "machine": machine_record(device=str(device)),
            "config": {"mesh": mesh_name, "batch": args.batch, "size": args.size, "backends": backends,
                       "repeat": args.repeat, "pytorch3d_repeat": args.pytorch3d_repeat},
        }
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
