"""The tiny and paper presets on one GPU: triplets/s (float32 and bfloat16) and val gain against triplets seen.

    python benchmarks/gpu_presets.py [--presets tiny,paper] [--seconds 90,150] [--subjects 2000,1200]
        [--parse-net work/parsenet/parsenet.pt] [--workers 14] [--json]

For each preset: synthetic data at the preset's resolution and face-model size
(``dfmvr.data.synth``, 2 captures per subject, 85/15 train/val split), held in host memory;
a throughput probe of the full training step (forward, every loss term, backward, Adam) in
float32 and with ``train.amp``'s bfloat16 autocast; then one learning curve
(:func:`dfmvr.train.curve.learning_curve`: the preset's model, loss weights, batch and
schedule stretched to the curve's length) for about ``--seconds`` seconds of training steps in the
faster precision, validated on 200 val triplets with the training metric (aligned vertex RMSE
against the mean face's). The renderer's backend is the one ``render.backend=auto`` picks on the
device (pytorch3d where it imports, else dfmvr's PyTorch rasteriser); both are timed on one
batch when both are there.

Made for the few minutes of a lent GPU (docs/notes/training-readings.md, "On a GPU"); runs on the CPU too
(``--device cpu``, small ``--seconds`` and ``--subjects``: the test does this). ``--json`` prints
one JSON object as the last line: ``results`` (per preset ``<preset>_triplets_per_s_fp32``,
``<preset>_triplets_per_s_bf16``, ``<preset>_val_gain_pct_last``), every curve's points, the
device and the versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.config import apply_overrides  # noqa: E402
from dfmvr.data.synth import generate  # noqa: E402
from dfmvr.nets import read_parsenet_file  # noqa: E402
from dfmvr.presets import get_preset  # noqa: E402
from dfmvr.train.curve import learning_curve, load_split  # noqa: E402
from dfmvr.train.masks import ensure_mask_cache  # noqa: E402

PROBE_STEPS = 30
"""Steps per throughput probe (``--probe-steps``); the rate is taken over the last two thirds (after warm-up)."""


def probe(cfg, train, val, device: torch.device, amp: bool, steps: int = PROBE_STEPS) -> float:
    """Triplets per second of the full training step after warm-up (three points of ``steps // 3``)."""
    bs = cfg.data.batch_size
    every = bs * max(1, steps // 3)
    pts = learning_curve(cfg, train, val, triplets=bs * 3 * max(1, steps // 3), every=every, device=device, amp=amp)
    first, last = pts[0], pts[-1]
    return (last.triplets - first.triplets) / max(1e-9, last.train_s - first.train_s)


def time_renderers(cfg, device: torch.device) -> dict[str, float]:
    """Milliseconds per render of one batch of three views per triplet, for each importable backend."""
    from dfmvr.facemodel import build_face_model
    from dfmvr.render import pytorch3d_backend
    from dfmvr.render.renderer import Camera, Renderer

    face = build_face_model(cfg.facemodel).to(device)
    n = cfg.data.batch_size * 3
    verts = face.mean_shape.reshape(1, -1, 3).expand(n, -1, -1).contiguous()
    colors = torch.full_like(verts, 0.6)
    camera = Camera.from_config(cfg.render)
    result = {}
    backends = ["torch"] + (["pytorch3d"] if pytorch3d_backend.available() else [])
    for name in backends:
        renderer = Renderer(camera, backend=name, device=device)
        for _ in range(3 if device.type == "cuda" else 1):
            renderer(verts, face.tri, colors, face.region)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, reps = time.perf_counter(), 0
        while reps < 10 and (reps == 0 or time.perf_counter() - t0 < 1.0):  # pytorch3d's CPU path takes seconds
            renderer(verts, face.tri, colors, face.region)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            reps += 1
        result[name] = 1000 * (time.perf_counter() - t0) / reps
    return result


def run_preset(name: str, *, subjects: int, seconds: float, workers: int, root: Path, device: torch.device,
               parse_net: str | None, val: int, batch_sizes: list[int], probe_steps: int = PROBE_STEPS) -> dict:
    cfg = get_preset(name)
    t0 = time.perf_counter()
    data = root / name
    generate(str(data), n_subjects=subjects, n_captures=2, size=cfg.data.image_size, seed=3, workers=workers,
             n_vertices=cfg.facemodel.n_vertices, splits=(0.85, 0.15, 0.0))
    gen_s = time.perf_counter() - t0
    # with a parse net the network reads its masks (every preset's default); without one, the shards' own
    overrides = {"data.url": str(data), "data.num_workers": 0, "model.parse_net": parse_net or "",
                 "model.input_masks": "parse_net" if parse_net else "given"}
    cfg = apply_overrides(cfg, overrides)
    t0 = time.perf_counter()
    cache = ensure_mask_cache(cfg, read_parsenet_file(parse_net), source=parse_net)[0] if parse_net else None
    train = load_split(cfg, "train", mask_cache=cache)
    val_split = load_split(cfg, "val", limit=val, with_gt=True, mask_cache=cache)
    load_s = time.perf_counter() - t0
    print(f"{name}: {len(train)} train / {len(val_split)} val triplets ({gen_s:.0f} s to make, {load_s:.0f} s to load)",
          flush=True)
    out: dict = {"train_triplets": len(train), "val_triplets": len(val_split), "generate_s": gen_s,
                 "mask_loss": bool(parse_net), "batch_size": cfg.data.batch_size}
    try:
        out["render_ms"] = time_renderers(cfg, device)
    except Exception as e:  # a timing, not the point: report and go on
        out["render_ms"] = {"error": repr(e)}
    rates = {}
    for amp in ([False, True] if device.type == "cuda" else [False]):
        rates["bf16" if amp else "fp32"] = probe(cfg, train, val_split, device, amp, probe_steps)
        print(f"{name}: {rates} triplets/s", flush=True)
    out["triplets_per_s"] = rates
    for bs in batch_sizes:  # the same step at other batch sizes: how far batch 8 is from filling the device
        big = apply_overrides(cfg, {"data.batch_size": bs})
        for amp in ([False, True] if device.type == "cuda" else [False]):
            out.setdefault("triplets_per_s_by_batch", {})[f"{bs}_{'bf16' if amp else 'fp32'}"] = rate = probe(
                big, train, val_split, device, amp, probe_steps)
            print(f"{name}: batch {bs} {'bf16' if amp else 'fp32'} {rate:.1f} triplets/s", flush=True)
    if seconds <= 0:
        return out
    amp = rates.get("bf16", 0) > rates["fp32"]
    planned = max(cfg.data.batch_size * 10, int(rates["bf16" if amp else "fp32"] * seconds))
    every = max(cfg.data.batch_size, planned // 6)

    def show(p) -> None:
        print(f"{name} ({'bf16' if amp else 'fp32'}): {p.triplets} triplets, {p.gain_pct:.1f}% below the mean face "
              f"({p.rmse_mm:.3f} vs {p.mean_face_rmse_mm:.3f} mm), nonfinite {p.nonfinite}, "
              f"{p.triplets / p.train_s:.1f} triplets/s", flush=True)

    pts = learning_curve(cfg, train, val_split, triplets=planned, every=every, device=device, amp=amp,
                         max_seconds=1.3 * seconds, on_point=show)
    out["curve"] = {"amp": amp, "planned_triplets": planned,
                    "points": [{k: v for k, v in p.to_dict().items() if k != "grad_split"} for p in pts]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,paper")
    ap.add_argument("--seconds", default="90,150", help="seconds of training steps per preset's curve (0: none)")
    ap.add_argument("--subjects", default="2000,1200", help="synthetic subjects per preset")
    ap.add_argument("--workers", type=int, default=max(1, (torch.get_num_threads() or 2) - 2))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--parse-net", help="frozen parse-net file for the tiny preset's mask loss "
                                        "(make train writes work/parsenet/parsenet.pt)")
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--batch-sizes", default="", help="also probe the step's triplets/s at these batch sizes "
                                                       "(comma-separated; --seconds 0 probes only)")
    ap.add_argument("--probe-steps", type=int, default=PROBE_STEPS)
    ap.add_argument("--threads", type=int, help="torch threads (CPU runs)")
    ap.add_argument("--out", help="folder for the synthetic data (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    names = [n for n in args.presets.split(",") if n]
    seconds = [float(s) for s in args.seconds.split(",")]
    subjects = [int(s) for s in args.subjects.split(",")]
    if not len(names) == len(seconds) == len(subjects):
        raise SystemExit(f"--presets {args.presets!r}, --seconds {args.seconds!r} and --subjects {args.subjects!r} "
                         "need one value per preset")
    for n in names:
        get_preset(n)  # unknown names fail before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    root = Path(args.out or tempfile.mkdtemp(prefix="dfmvr-gpu-"))
    results: dict[str, float] = {}
    presets: dict[str, dict] = {}
    for name, secs, subj in zip(names, seconds, subjects):
        parse_net = args.parse_net if name == "tiny" else None
        try:
            presets[name] = r = run_preset(name, subjects=subj, seconds=secs, workers=args.workers, root=root,
                                           device=device, parse_net=parse_net, val=args.val,
                                           batch_sizes=[int(b) for b in args.batch_sizes.split(",") if b],
                                           probe_steps=args.probe_steps)
        except Exception as e:  # one preset's failure must not lose the other's numbers
            import traceback

            traceback.print_exc()
            presets[name] = {"error": repr(e)}
            continue
        for prec, rate in r["triplets_per_s"].items():
            results[f"{name}_triplets_per_s_{prec}"] = rate
        for key, rate in r.get("triplets_per_s_by_batch", {}).items():
            results[f"{name}_triplets_per_s_batch{key}"] = rate
        if "curve" in r:
            results[f"{name}_val_gain_pct_last"] = r["curve"]["points"][-1]["gain_pct"]
    if args.json:
        print(json.dumps({"benchmark": "gpu_presets", "results": results, "presets": presets,
                          "machine": machine_record(device=str(device))}))


if __name__ == "__main__":
    main()
