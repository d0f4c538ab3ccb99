"""The training job's steps per second against an earlier revision's, side by side on this machine.

    .venv/bin/python benchmarks/job_speed.py --baseline-rev 8ed3304 [--data work/shards] [--steps 200]
        [--warmup 25] [--rounds 2] [--baseline-overrides K=V ...] [--overrides K=V ...] [--work DIR] [--json]

Both jobs are ``python jobs/train.py`` as ``make train`` runs it (the tiny preset, 2 Ray Train
workers x 1 thread, DDP over gloo, MLflow), each from its own tree: this checkout, and a git
worktree of ``--baseline-rev`` (made under ``--work``; its Ray workers import its own code:
``PYTHONPATH`` names the worktree). They train the same shards for exactly ``--steps`` steps
(``train.time_budget_s=0``; validation and checkpoints only after the last step) and take the
same parse net as it comes out of each tree's own ``jobs/train_parsenet.py`` on those shards
(the baseline's preset, e.g. BiSeNet at 8ed3304; this tree's preset, e.g. the U-Net), trained
once per ``--work``. So each side runs exactly what its ``make train`` runs, minus data
generation and parse-net training; this tree's job also makes its mask cache before Ray starts
(reported, not counted).

The rate is rank 0's step journal (``<work_dir>/runs/<run>/steps.jsonl``): steps between the
end of step ``--warmup`` and the last, over their wall time, in steps per second (a step is 2 x 8
triplets on both sides). Runs alternate baseline, this tree, ``--rounds`` times, so both see the
same machine; the keys hold the medians and ``runs`` lists every run with the load average.

``--json`` prints one JSON object as the last line: ``baseline_steps_per_s``, ``steps_per_s``,
``steps_per_s_ratio`` (this tree over the baseline), ``mask_cache_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402


def worktree(rev: str, work: Path) -> Path:
    """A detached git worktree of ``rev`` under ``work`` (made once)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    path = work / f"tree-{sha}"
    if not (path / "jobs" / "train.py").exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=REPO, check=True,
                       capture_output=True)
    return path


def run(tree: Path, args: list[str], log: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_WAIT_POLICY="PASSIVE", RAY_USAGE_STATS_ENABLED="0",
               MPLBACKEND="Agg")
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} in {tree} failed ({proc.returncode}); see {log}")
    return proc


def parse_net(tree: Path, data: str, work: Path, name: str) -> str:
    """The tree's own parse net trained on ``data`` with its preset (once per ``work``)."""
    out = work / f"parsenet-{name}.pt"
    if not out.exists():
        run(tree, ["jobs/train_parsenet.py", f"work_dir={work / name}", f"data.url={data}", f"parsenet.out={out}",
                   f"tracking.tracking_uri=sqlite:///{work / name / 'mlflow.db'}"], work / f"parsenet-{name}.log")
    return str(out)


def journal_rate(path: Path, warmup: int) -> float:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    t = [r["t"] for r in records][warmup - 1:]
    return (len(t) - 1) / (t[-1] - t[0])


def job(tree: Path, data: str, pnet: str, work: Path, name: str, steps: int, warmup: int,
        overrides: list[str]) -> dict:
    run_dir = work / name
    summary = run_dir / "summary.json"
    load = os.getloadavg()[0]
    t0 = time.time()
    run(tree, ["jobs/train.py", f"work_dir={run_dir}", f"data.url={data}", f"model.parse_net={pnet}",
               f"train.steps={steps}", "train.time_budget_s=0", f"train.val_every={steps}",
               f"train.ckpt_every={steps}", "tracking.registered_model=", f"train.run_name={name}",
               *overrides, "--summary-json", str(summary)], work / f"{name}.log")
    result = json.loads(summary.read_text())
    return {"name": name, "steps_per_s": journal_rate(run_dir / "runs" / name / "steps.jsonl", warmup),
            "mask_cache_s": result.get("mask_cache_seconds"), "wall_s": time.time() - t0, "load_before": load,
            "load_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", required=True, help="git revision of the baseline job (e.g. 8ed3304)")
    ap.add_argument("--data", default="work/shards", help="shard root both jobs train on")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--overrides", nargs="*", default=[], help="key=value for this tree's job")
    ap.add_argument("--baseline-overrides", nargs="*", default=[], help="key=value for the baseline's job")
    ap.add_argument("--work", default="/tmp/dfmvr-job-speed")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = str(Path(args.data).resolve())
    base_tree = worktree(args.baseline_rev, work)
    trees = {"baseline": (base_tree, args.baseline_overrides), "current": (REPO, args.overrides)}
    nets = {name: parse_net(tree, data, work, name) for name, (tree, _) in trees.items()}
    runs: list[dict] = []
    for r in range(args.rounds):
        for name, (tree, overrides) in trees.items():
            rec = job(tree, data, nets[name], work, f"{name}-{r}", args.steps, args.warmup, overrides)
            rec["tree"] = name
            runs.append(rec)
            print(f"{rec['name']}: {rec['steps_per_s']:.3f} steps/s (load {rec['load_before']:.1f} -> "
                  f"{rec['load_after']:.1f})", flush=True)
    base = statistics.median(r["steps_per_s"] for r in runs if r["tree"] == "baseline")
    cur = statistics.median(r["steps_per_s"] for r in runs if r["tree"] == "current")
    caches = [r["mask_cache_s"] for r in runs if r["tree"] == "current" and r["mask_cache_s"]]
    results = {"baseline_steps_per_s": base, "steps_per_s": cur, "steps_per_s_ratio": cur / base,
               "mask_cache_s": max(caches) if caches else 0.0}
    print(f"baseline {args.baseline_rev}: {base:.3f} steps/s; this tree: {cur:.3f} steps/s ({cur / base:.3f}x)")
    if args.json:
        print(json.dumps({"benchmark": "job_speed", "results": results,
                          "units": {"baseline_steps_per_s": "steps/s", "steps_per_s": "steps/s",
                                    "steps_per_s_ratio": "x", "mask_cache_s": "s"},
                          "settings": {"baseline_rev": args.baseline_rev, "steps": args.steps, "warmup": args.warmup,
                                       "rounds": args.rounds, "data": data, "overrides": args.overrides,
                                       "baseline_overrides": args.baseline_overrides},
                          "runs": runs,
                          "machine": machine_record()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
