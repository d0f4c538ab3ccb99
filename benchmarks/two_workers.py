"""Two Ray Train workers on one machine's accelerator (or its CPU): DDP through NCCL (or gloo),
a few training steps of a preset's model, and the all-reduce checked.

    python benchmarks/two_workers.py [--json] [--preset tiny] [--steps 5] [--batch 4]
        [--backend nccl|gloo] [--gpus-per-worker 0.5] [--cpu]

Each worker builds the preset's :class:`dfmvr.model.DFMVR` from the same seed, wraps it with
``ray.train.torch.prepare_model`` (DDP), and trains ``--steps`` steps of Adam on random batches
that differ by rank (:func:`train_step.random_batch`: a real batch's shapes). Checked on every
worker: an ``all_reduce`` of the rank (must give 0 + 1), and the weights' checksum after the
steps (DDP averages the gradients, so both ranks must hold the same weights: equal checksums to
the last bit, gathered with ``all_gather_object``). Reported: seconds per step, triplets per
second of the pair, the backend, the device each rank ran on.

On one GPU the two workers ask Ray for ``--gpus-per-worker`` 0.5 each, so both land on the same
card. NCCL refuses two ranks of one communicator on one device in its recent versions
("Duplicate GPU detected"); the script then says so and ``--backend gloo`` runs the same check
with gloo's all-reduce over the two processes (slower, host memory). ``--cpu`` runs it on the
CPU with gloo (what the test here and the docs' CPU line do).

``--json`` prints one JSON object as the last line (docs/design.md "Machine-readable results").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(config: dict) -> None:
    import hashlib

    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model
    from train_step import random_batch

    from dfmvr.config import apply_overrides
    from dfmvr.facemodel import build_face_model
    from dfmvr.model import build_model
    from dfmvr.presets import get_preset
    from dfmvr.train.objective import reconstruction_losses

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    cfg = apply_overrides(get_preset(config["preset"]), {"render.backend": "torch"})
    face_model = build_face_model(cfg.facemodel)
    torch.manual_seed(0)
    model = prepare_model(build_model(cfg, face_model=face_model).train())
    device = get_device()
    data = random_batch(cfg, face_model, config["batch"], seed=rank).to(device)
    core = model.module if hasattr(model, "module") else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for _ in range(config["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(data.images, data.masks)
        total, _ = reconstruction_losses(core, out, data, cfg.loss, step=10**6)
        total.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ranks = torch.tensor([float(rank)], device=device)
    dist.all_reduce(ranks)
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in core.parameters())).hexdigest()
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    record = {"rank": rank, "all_reduce_sum": float(ranks.item()), "same_weights": len(set(digests)) == 1,
              "s_per_step": sorted(times)[len(times) // 2], "device": str(device), "backend": dist.get_backend()}
    # every rank writes its record (Ray Train 2.60 keeps no metrics reported without a checkpoint)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))
    ray.train.report(record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--backend", default="nccl", choices=("nccl", "gloo"))
    p.add_argument("--gpus-per-worker", type=float, default=0.5)
    p.add_argument("--cpu", action="store_true", help="on the CPU with gloo")
    args = p.parse_args(argv)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    backend = "gloo" if args.cpu else args.backend
    out = tempfile.mkdtemp(prefix="dfmvr-two-workers-")
    resources = {"CPU": 1} if args.cpu else {"CPU": 1, "GPU": args.gpus_per_worker}
    ray.init(include_dashboard=False, configure_logging=False)
    result: dict = {"benchmark": "two_workers", "units": {"time": "s"}, "preset": args.preset, "backend": backend,
                    "batch_per_worker": args.batch, "steps": args.steps, "gpus_per_worker": None if args.cpu
                    else args.gpus_per_worker}
    try:
        trainer = TorchTrainer(worker, train_loop_config={**vars(args), "out": out},
                               scaling_config=ScalingConfig(num_workers=2, use_gpu=not args.cpu,
                                                            resources_per_worker=resources),
                               torch_config=TorchConfig(backend=backend),
                               run_config=RunConfig(name="two-workers", storage_path=str(Path("work").resolve())))
        trainer.fit()
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
        step_s = max(r["s_per_step"] for r in ranks)
        result.update({"ok": all(r["same_weights"] and r["all_reduce_sum"] == 1.0 for r in ranks),
                       "ranks": ranks, "s_per_step": step_s, "triplets_per_s": 2 * args.batch / step_s})
    except Exception as exn:  # NCCL's "Duplicate GPU detected" on one card lands here: report it
        result.update({"ok": False, "error": " ".join(str(exn).split())[:1500]})
    finally:
        ray.shutdown()
    print(f"two workers, {backend}: " + ("ok" if result["ok"] else "FAILED") + f" {result}")
    if args.json:
        print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
