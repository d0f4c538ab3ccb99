"""Ray Train scaling on one CPU box: 1 worker vs 2 DDP (gloo) workers, and job-submit latency.

    .venv/bin/python benchmarks/scaling.py [--json] [--steps N] [--warmup K] [--repeat R]
        [--omp-wait-policy default|PASSIVE|ACTIVE] [--work DIR] [--no-submit] [--submit-steps N]

Part 1, throughput. The tiny preset (64 px, 2500-vertex face model, batch 8 per worker, mask
loss off) trains through the real driver, ``dfmvr.train.launch.train`` (MLflow run,
``TorchTrainer``, DDP via ``prepare_model``), on a Ray started in this process, in three cases
run in turn (``--repeat`` rounds of all three):

- ``train.num_workers=1 train.cpus_per_worker=2`` (one process, 2 intra-op threads);
- ``train.num_workers=1 train.cpus_per_worker=1`` (one process, 1 thread: the per-rank work of
  the next case without DDP; the step-time ratio ``ddp_step_over_single_1thread_step`` is DDP's
  cost plus two ranks sharing the two cores);
- ``train.num_workers=2 train.cpus_per_worker=1`` (two processes, 1 thread each, gradients
  all-reduced over gloo every step).

The worker's torch thread count is ``train.cpus_per_worker`` (``ray_worker.py``).
``--omp-wait-policy PASSIVE`` exports ``OMP_WAIT_POLICY`` to every Ray process started here:
with more runnable processes than cores (DataLoader workers, other jobs) libgomp's spin-waiting
threads make the 2-thread case slow and erratic (docs/benchmarks.md, Renderer and Scaling).

Rank 0 appends ``{"pid", "step", "t"}`` to ``<work_dir>/runs/<run_name>/steps.jsonl`` after
every completed optimiser step. The steady-state rate is taken between the journal times of
step ``--warmup`` and of the last step: ``(last - warmup) * batch * workers / (t_last -
t_warmup)`` triplets per second, so start-up (Ray workers, process group, DataLoader workers,
shuffle buffer fill) and the final validation / checkpoint / model registration are left out.
Validation and checkpoints happen only after the last step. With ``--repeat R`` the keys hold
the median over rounds and ``config.runs`` in the JSON lists every run.

Part 2, DDP's communication alone: one gloo all-reduce of the tiny model's gradients (float32,
all trainable parameters) between two processes on 127.0.0.1, median of 20
(``gloo_allreduce_grad_ms``); DDP overlaps its buckets with backward, so this bounds what the
all-reduce adds to a step.

Part 3, ``ray job submit`` latency. ``ray start --head`` on 127.0.0.1 with its own temp dir
(timed: ``ray_start_s``), then ``ray job submit --working-dir <repo> -- python jobs/train.py
preset=tiny train.steps=20 ...`` (2 workers, the same shards). ``submit_to_first_step_s`` runs
from the moment the submit command starts to the journal time of step 1: working-dir upload,
job driver start, config checks, MLflow run, Ray Train controller and worker group, process
group, model build, DataLoader start and the first step. The head is stopped afterwards by
signalling only the processes tied to its temp dir (command line, environment or open files
name it; ``ray stop`` would stop every Ray process on the machine).

Shards are made once, with ``dfmvr.data.synth.generate(size=64, n_vertices=2500)``, under
``<work>/shards`` (default ``/tmp/dfmvr-scaling-work``) and reused by later invocations with the
same ``--work``. The tiny preset's own loader settings apply (``data.num_workers`` DataLoader
workers per rank).

``--json`` prints one JSON object as the last line (docs/design.md "Machine-readable results") with
``tiny_1worker_triplets_per_s``, ``tiny_2worker_triplets_per_s``, ``submit_to_first_step_s``
and ``ray_start_s`` among its results. The machine is shared: the load average before and
after every run is reported, and wall times swing with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

_logger = logging.getLogger("benchmarks.scaling")

N_SUBJECTS = 40
N_CAPTURES = 3
SHARD_SIZE = 8
"""96 train triplets in 12 shards, 12 validation triplets in 2: enough shards for every rank x
DataLoader worker here (resampled training draws shards with replacement anyway)."""


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def make_shards(work: Path) -> str:
    """``<work>/shards`` with the tiny preset's image size and face model (made once)."""
    from dfmvr.data.synth import generate

    root = work / "shards"
    if (root / "manifest.json").exists():
        _logger.info("reusing shards in %s", root)
        return str(root)
    t0 = time.perf_counter()
    generate(str(root), n_subjects=N_SUBJECTS, n_captures=N_CAPTURES, size=64, n_vertices=2500, seed=0,
             workers=1, max_count=SHARD_SIZE)
    _logger.info("made shards in %s in %.1f s", root, time.perf_counter() - t0)
    return str(root)


def _overrides(work_dir: Path, data_url: str, steps: int, run_name: str) -> dict[str, object]:
    """The benchmark's common settings on top of the tiny preset (validation and checkpoint at
    the end only, no registered model: none of that is inside the timed window; the library's
    default learning rate for these short runs)."""
    return {
        "work_dir": str(work_dir),
        "data.url": data_url,
        "loss.mask_loss": False,
        # the rate does not depend on the learning rate; at the preset's 3e-3 (sized for 1000
        # steps) a 60-step run's final validation met non-finite eval-mode predictions and the
        # run failed, so the short runs here use the library default
        "optim.lr": 1e-4,
        "optim.cosine_after": 0,
        "train.steps": steps,
        "train.val_every": steps,
        "train.ckpt_every": steps,
        "train.use_gpu": "false",
        "train.max_failures": 0,
        "train.run_name": run_name,
        "tracking.registered_model": "",
        "tracking.tracking_uri": f"sqlite:///{work_dir / 'mlflow.db'}",
    }


def read_journal(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no step journal (did rank 0 start training?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_rate(records: list[dict], warmup: int, triplets_per_step: int) -> dict[str, float]:
    """Triplets per second between step ``warmup`` and the last step, from the journal times.

    Args:
        records: journal lines ``{"pid", "step", "t"}`` of one attempt (no restarts).
        warmup: steps left out at the start (>= 1: the rate runs from step ``warmup``'s end).
        triplets_per_step: batch size x workers.
    """
    steps = [r["step"] for r in records]
    if steps != list(range(1, len(steps) + 1)):
        raise ValueError(f"step journal: expected steps 1..N once each (no restart), got {steps[:5]}...{steps[-5:]}")
    if warmup < 1 or len(records) <= warmup + 1:
        raise ValueError(f"step journal: {len(records)} steps, need more than warmup={warmup} + 1")
    t = [r["t"] for r in records][warmup - 1:]  # from the end of step ``warmup``
    gaps = [b - a for a, b in zip(t[:-1], t[1:])]
    return {"triplets_per_s": len(gaps) * triplets_per_step / (t[-1] - t[0]),
            "median_step_s": statistics.median(gaps), "max_step_s": max(gaps)}


CASES = (("tiny_1worker", 1, 2, "1 worker x 2 threads"),
         ("tiny_1worker_1thread", 1, 1, "1 worker x 1 thread"),
         ("tiny_2worker", 2, 1, "2 workers x 1 thread (DDP, gloo)"))
"""Result key prefix, Ray Train workers, CPUs (= torch threads) per worker, label."""


def run_throughput(work: Path, data_url: str, *, workers: int, cpus: int, steps: int, warmup: int,
                   tag: str) -> dict:
    """One training run through the real driver; its steady-state rate and wall times."""
    from dfmvr.config import apply_overrides
    from dfmvr.presets import tiny
    from dfmvr.train.launch import train

    run_name = f"scaling-{workers}w{cpus}c-{tag}"
    run_dir = work / run_name
    over = _overrides(run_dir, data_url, steps, run_name)
    over.update({"train.num_workers": workers, "train.cpus_per_worker": cpus})
    cfg = apply_overrides(tiny(), over)
    load_before = _load()
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    if summary["status"] != "FINISHED":
        raise RuntimeError(f"{run_name}: training ended {summary['status']}")
    records = read_journal(run_dir / "runs" / run_name / "steps.jsonl")
    rate = steady_rate(records, warmup, cfg.data.batch_size * workers)
    out = {"triplets_per_s": rate["triplets_per_s"], "median_step_s": rate["median_step_s"],
           "max_step_s": rate["max_step_s"], "call_to_first_step_s": records[0]["t"] - t0,
           "wall_s": wall, "load_before": load_before, "load_after": _load()}
    _logger.info("%s: %.1f triplets/s (median step %.3f s), first step %.1f s after the call, %.1f s in all, "
                 "load %.1f -> %.1f", run_name, out["triplets_per_s"], out["median_step_s"],
                 out["call_to_first_step_s"], wall, load_before, out["load_after"])
    return out


# ---- gloo all-reduce of one step's gradients, alone


def tiny_gradient_numel() -> int:
    """Trainable parameters of the tiny preset's model (what DDP all-reduces every step)."""
    from dfmvr.model import build_model
    from dfmvr.presets import tiny

    cfg = tiny()
    model = build_model(cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _allreduce_worker(rank: int, port: int, numel: int, repeat: int, out) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        grad = torch.randn(numel)
        times = []
        for _ in range(repeat + 2):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(grad)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            out.put(times[2:])
    finally:
        dist.destroy_process_group()


def gloo_allreduce(numel: int, repeat: int = 20) -> dict[str, float]:
    """Median and minimum seconds of one gloo all-reduce of ``numel`` float32 values between two
    processes on 127.0.0.1: DDP's communication per step (it overlaps buckets with backward, so
    this is an upper bound of what it adds)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, numel, repeat, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    times = out.get(timeout=300)
    for proc in procs:
        proc.join(timeout=60)
    return {"median_s": statistics.median(times), "min_s": min(times)}


# ---- ray job submit against our own head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(proc: Path, marker: str) -> bool:
    """Whether the process names ``marker`` in its command line or environment or holds a file
    under it (Ray's agents retitle themselves, so their command line alone does not tell)."""
    try:
        for name in ("cmdline", "environ"):
            if marker.encode() in (proc / name).read_bytes():
                return True
        return any(os.readlink(fd).startswith(marker) for fd in (proc / "fd").iterdir())
    except OSError:
        return False


def _stop_processes_mentioning(marker: str) -> int:
    """Stop our own Ray head: every process tied to our temp dir (``ray stop`` would stop every
    Ray process on the machine). Returns how many were signalled."""
    seen: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        pids = [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and int(p.name) != os.getpid() and _ours(p, marker)]
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        seen.update(pids)
        if not pids:
            break
        time.sleep(2)
    return len(seen)


def run_submit(work: Path, data_url: str, *, steps: int) -> dict:
    """``ray start --head`` (timed), then ``ray job submit`` of ``jobs/train.py``; seconds from the
    submit command's start to the first completed training step."""
    scratch = Path("/tmp") / f"dfmvr-scaling-head-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               RAY_TMPDIR=str(scratch))
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    port, dash = _free_port(), _free_port()
    run_name = "scaling-submit"
    run_dir = work / f"submit-{int(time.time())}"
    load_before = _load()
    t0 = time.time()
    head = subprocess.run(
        [ray_bin, "start", "--head", "--num-cpus=3", "--disable-usage-stats", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={scratch}", "--include-dashboard=true"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    ray_start_s = time.time() - t0
    if head.returncode != 0:
        _stop_processes_mentioning(str(scratch))
        raise RuntimeError(f"ray start --head failed ({head.returncode}): {head.stderr[-3000:]}")
    try:
        over = _overrides(run_dir, data_url, steps, run_name)
        over.update({"train.num_workers": 2, "train.cpus_per_worker": 1})
        args = [f"{k}={v}" for k, v in over.items()]
        cmd = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
               "--", sys.executable, "jobs/train.py", "preset=tiny", *args,
               "--summary-json", str(run_dir / "summary.json")]
        t_submit = time.time()
        job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
        job_s = time.time() - t_submit
        if job.returncode != 0:
            raise RuntimeError(f"ray job submit failed ({job.returncode}):\n{job.stdout[-4000:]}\n{job.stderr[-2000:]}")
        records = read_journal(run_dir / "runs" / run_name / "steps.jsonl")
        summary = json.loads((run_dir / "summary.json").read_text())
    finally:
        stopped = _stop_processes_mentioning(str(scratch))
        _logger.info("stopped %d processes of our Ray head", stopped)
        shutil.rmtree(scratch, ignore_errors=True)
    out = {"ray_start_s": ray_start_s, "submit_to_first_step_s": records[0]["t"] - t_submit,
           "submit_to_last_step_s": records[-1]["t"] - t_submit, "submit_total_s": job_s,
           "submit_steps": float(summary["steps"]), "load_before": load_before, "load_after": _load()}
    _logger.info("ray start %.1f s; submit -> first step %.1f s, -> step %d %.1f s, job done %.1f s",
                 ray_start_s, out["submit_to_first_step_s"], records[-1]["step"], out["submit_to_last_step_s"], job_s)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--steps", type=int, default=60, help="training steps per throughput run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady-state rate")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the three cases, run in turn")
    parser.add_argument("--submit-steps", type=int, default=20, help="steps of the submitted job")
    parser.add_argument("--no-submit", action="store_true", help="skip the ray job submit part")
    parser.add_argument("--omp-wait-policy", choices=("default", "PASSIVE", "ACTIVE"), default="default",
                        help="OMP_WAIT_POLICY for every Ray process this script starts (default: inherit)")
    # not under the checkout's work/: `make train` and cleanups there must not pull it away mid-run
    parser.add_argument("--work", default="/tmp/dfmvr-scaling-work",
                        help="work dir (shards made once here and reused; one subfolder per run)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 1 or args.warmup < 1:
        parser.error(f"--steps must exceed --warmup + 1 and --warmup must be >= 1, got {args.steps}, {args.warmup}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.omp_wait_policy != "default":
        # read by libgomp when a process loads it: Ray's raylet and workers inherit it from here
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_start = _load()
    data_url = make_shards(work)

    import ray

    # Ray's scratch on a short path (unix socket paths are limited to about 107 bytes)
    scratch = Path("/tmp") / f"dfmvr-scaling-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(scratch)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=3, include_dashboard=False, _temp_dir=str(scratch), configure_logging=False)
    tag = time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, list[dict]] = {name: [] for name, *_ in CASES}
    try:
        for r in range(args.repeat):
            for name, workers, cpus, _ in CASES:
                runs[name].append(run_throughput(work, data_url, workers=workers, cpus=cpus, steps=args.steps,
                                                 warmup=args.warmup, tag=f"{tag}-{r}"))
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)

    numel = tiny_gradient_numel()
    allreduce = gloo_allreduce(numel)
    _logger.info("gloo all-reduce of %.2f MiB between 2 processes: median %.1f ms, min %.1f ms",
                 numel * 4 / 2**20, allreduce["median_s"] * 1e3, allreduce["min_s"] * 1e3)

    submit = None if args.no_submit else run_submit(work, data_url, steps=args.submit_steps)

    results: dict[str, float] = {}
    units: dict[str, str] = {}
    for name, *_ in CASES:
        for key, unit in (("triplets_per_s", "triplets/s"), ("median_step_s", "s"), ("max_step_s", "s"),
                          ("call_to_first_step_s", "s"), ("wall_s", "s")):
            results[f"{name}_{key}"] = statistics.median(x[key] for x in runs[name])
            units[f"{name}_{key}"] = unit
    results["two_over_one_worker"] = results["tiny_2worker_triplets_per_s"] / results["tiny_1worker_triplets_per_s"]
    units["two_over_one_worker"] = "ratio"
    # DDP's cost per step: the 2-worker step against one process doing the same per-rank work alone
    results["ddp_step_over_single_1thread_step"] = (results["tiny_2worker_median_step_s"]
                                                    / results["tiny_1worker_1thread_median_step_s"])
    units["ddp_step_over_single_1thread_step"] = "ratio"
    results["gloo_allreduce_grad_ms"] = allreduce["median_s"] * 1e3
    results["gloo_allreduce_grad_min_ms"] = allreduce["min_s"] * 1e3
    results["grad_mib"] = numel * 4 / 2**20
    units.update({"gloo_allreduce_grad_ms": "ms", "gloo_allreduce_grad_min_ms": "ms", "grad_mib": "MiB"})
    if submit:
        for key in ("ray_start_s", "submit_to_first_step_s", "submit_to_last_step_s", "submit_total_s"):
            results[key] = submit[key]
            units[key] = "s"

    print("\nScaling (tiny preset, 64 px, batch 8 per worker, CPU gloo; steady state after "
          f"{args.warmup} of {args.steps} steps)")
    print(f"{'run':<34}{'triplets/s':>12}{'median step s':>15}{'first step s':>14}{'load':>14}")
    for name, _, _, label in CASES:
        for x in runs[name]:
            print(f"{label:<34}{x['triplets_per_s']:>12.1f}{x['median_step_s']:>15.3f}"
                  f"{x['call_to_first_step_s']:>14.1f}{x['load_before']:>7.1f}->{x['load_after']:<6.1f}")
    print(f"2 workers / 1 worker x 2 threads (triplets/s): {results['two_over_one_worker']:.2f}; "
          f"2-worker step / 1 worker x 1 thread step: {results['ddp_step_over_single_1thread_step']:.2f}")
    print(f"gloo all-reduce of the tiny model's gradients ({results['grad_mib']:.2f} MiB, 2 processes, loopback): "
          f"median {results['gloo_allreduce_grad_ms']:.1f} ms, min {results['gloo_allreduce_grad_min_ms']:.1f} ms")
    if submit:
        print(f"ray start --head: {submit['ray_start_s']:.1f} s; ray job submit -> first step: "
              f"{submit['submit_to_first_step_s']:.1f} s, -> step {int(submit['submit_steps'])}: "
              f"{submit['submit_to_last_step_s']:.1f} s, job finished: {submit['submit_total_s']:.1f} s "
              f"(load {submit['load_before']:.1f} -> {submit['load_after']:.1f})")

    if args.json:
        record = {
            "benchmark": "scaling",
            "results": results,
            "units": units,
            "machine": machine_record(ray=ray.__version__, backend="gloo",
                                      omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
                                      load_average_start=load_start),
            "config": {"preset": "tiny", "steps": args.steps, "warmup": args.warmup, "repeat": args.repeat,
                       "submit_steps": args.submit_steps, "shards": data_url,
                       "runs": runs, "submit": submit},
        }
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
