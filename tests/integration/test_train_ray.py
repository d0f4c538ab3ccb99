"""Ray Train end to end on loopback: shards and checkpoints on a moto S3 server, MLflow in a
temporary SQLite store, a real local Ray; worker failure and resume; ``ray job submit``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _tiny_overrides(work: Path, data_url: str, **extra) -> dict:
    base = {
        "work_dir": str(work),
        "data.url": data_url,
        "data.batch_size": 4,
        "data.num_workers": 1,
        "data.epoch_samples": 64,
        "data.shuffle_buffer": 16,
        "train.steps": 12,
        "train.val_every": 6,
        "train.ckpt_every": 3,
        "train.log_every": 3,
        "train.val_samples": 8,
        "train.num_workers": 2,
        "train.use_gpu": "false",
        "train.max_failures": 0,
        "tracking.registered_model": "dfmvr-test",
        "loss.mask_loss": False,
        # the parse-net-first pipeline (the parse net's masks, its mask cache, the mask loss):
        # tests/integration/test_model_bundle.py; here the shards' own masks
        "train.parse_net_first": False,
        "model.input_masks": "given",
        "model.parse_net": "",
    }
    base.update(extra)
    return base


def _train_with_fault(cfg, fault, timeout: float = 300) -> dict:
    """``train(cfg)`` while a thread calls ``fault()`` every 0.2 s until it returns True (it has
    done its damage: killed a process, removed a node, stopped a server)."""
    from dfmvr.train.launch import train

    def watch() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not fault():
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    summary = train(cfg)
    thread.join(timeout=5)
    return summary


def _checkpointed_and_past(journal: Path, snapshot: Path, step: int) -> int | None:
    """The run's last step once Ray's controller has registered a checkpoint (its snapshot on
    storage names one; a checkpoint reported a moment before a crash may never be registered)
    and the run has reached ``step``; else None."""
    if not (journal.exists() and snapshot.exists() and '"step"' in snapshot.read_text()):
        return None
    steps = [json.loads(line)["step"] for line in journal.read_text().splitlines() if line.strip()]
    return max(steps) if steps and max(steps) >= step else None


@pytest.fixture
def local_ray(tmp_path, monkeypatch):
    import ray

    # Ray's scratch goes to a short path (unix socket paths are limited to about 107 bytes)
    scratch = Path("/tmp") / f"dfmvr-ray-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    scratch.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", str(scratch))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=3, include_dashboard=False, _temp_dir=str(scratch), configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_reruns_are_new_runs_and_a_named_resume_must_train_the_same(synth_root, tmp_path, local_ray):
    """A rerun never silently resumes: without train.run_name each job is a new run; naming a run
    resumes it, and only the step budget (and where things go) may change."""
    from dfmvr.config import apply_overrides
    from dfmvr.presets import tiny
    from dfmvr.train.launch import train
    from dfmvr.train.resume import ResumeMismatchError

    def cfg(**extra):
        return apply_overrides(tiny(), _tiny_overrides(tmp_path / "work", str(synth_root), **{
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.registered_model": "",
            "train.num_workers": 1, "train.steps": 4, "train.val_every": 4, "train.ckpt_every": 4,
            "train.log_every": 2, "train.val_samples": 4, **extra}))

    first = train(cfg())
    second = train(cfg(**{"optim.lr": 1e-4}))
    assert first["run_name"] != second["run_name"]
    assert first["steps"] == second["steps"] == 4
    assert first["resumed_from"] is None and second["resumed_from"] is None

    resumed = train(cfg(**{"train.run_name": first["run_name"], "train.steps": 6}))
    assert resumed["run_name"] == first["run_name"] and resumed["steps"] == 6
    assert resumed["resumed_from"] and resumed["mlflow_run_id"] == first["mlflow_run_id"]
    with pytest.raises(ResumeMismatchError, match=r"optim\.lr: checkpoint 0\.001, now 0\.0001") as err:
        train(cfg(**{"train.run_name": first["run_name"], "train.steps": 8, "optim.lr": 1e-4}))
    assert first["run_name"] in str(err.value)


def test_mlflow_outage_mid_run_keeps_the_run_and_says_how_to_register(synth_root, tmp_path, local_ray, monkeypatch):
    """A tracking server that dies after the first checkpoint: training finishes, metrics are
    retried then dropped, the checkpoint and the summary are written, and the summary says the
    model was not registered and how to register it later."""
    from dfmvr.config import apply_overrides
    from dfmvr.presets import tiny

    # the driver's own MLflow calls give up quickly (the workers cut their retries themselves)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen(
        [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "server-artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import urllib.request

        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the loopback MLflow server did not start")
        work = tmp_path / "work"
        cfg = apply_overrides(tiny(), _tiny_overrides(work, str(synth_root), **{
            "tracking.tracking_uri": f"http://127.0.0.1:{port}", "train.num_workers": 1,
            "train.steps": 12, "train.ckpt_every": 3, "train.val_every": 6, "train.log_every": 6,
            "train.run_name": "outage-test"}))
        journal = work / "runs" / "outage-test" / "steps.jsonl"

        def stop_server() -> bool:
            if journal.exists() and len(journal.read_text().splitlines()) >= 4:
                os.killpg(server.pid, signal.SIGKILL)
                return True
            return False

        summary = _train_with_fault(cfg, stop_server)
        assert server.poll() is not None, "the server was never stopped"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)

    assert summary["status"] == "FINISHED" and summary["steps"] == 12
    assert Path(summary["checkpoint"], "checkpoint.pt").is_file()
    assert "registration_error" in summary and "registered_model_uri" not in summary
    assert summary["mlflow_run_id"] in summary["register_later"] and summary["checkpoint"] in summary["register_later"]


def _upload_tree(root: Path, s3_url: str) -> None:
    from dfmvr.data import storage

    for f in sorted(root.iterdir()):
        if f.is_file():
            storage.put_file(str(f), storage.join(s3_url, f.name))


def test_two_workers_on_s3_with_mlflow_registry(synth_root, moto_s3, tmp_path, local_ray):
    import mlflow
    import torch

    from dfmvr.config import apply_overrides
    from dfmvr.presets import tiny
    from dfmvr.serving import load
    from dfmvr.train.launch import train
    from dfmvr.tracking import VAL_METRIC
    from dfmvr.train.loop import validate

    data_url = moto_s3.url("shards")
    _upload_tree(synth_root, data_url)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = apply_overrides(tiny(), _tiny_overrides(tmp_path / "work", data_url, **{
        "tracking.tracking_uri": tracking,
        "train.storage_path": moto_s3.url("ray"),
    }))
    summary = train(cfg)

    assert summary["status"] == "FINISHED" and summary["steps"] == 12
    assert summary["checkpoint"].startswith(f"s3://{moto_s3.bucket}/ray/")
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=moto_s3.bucket, Prefix="ray/")["Contents"]]
    assert any(k.endswith("checkpoint.pt") for k in keys)

    client = mlflow.MlflowClient(tracking)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.backbone"] == "fusion" and run.data.params["train.steps"] == "12"
    for key in ("train/loss", "train/loss_photo", "train/lr", "train/triplets_per_s", "train/skipped_samples",
                VAL_METRIC, "val/mean_face_rmse_mm", "val/loss_lm2d"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4  # steps 3, 6, 9, 12
    images = [a.path for a in client.list_artifacts(run.info.run_id, "val_images")]
    assert len(images) == 2 and all(p.endswith(".png") for p in images)

    versions = client.search_model_versions("name='dfmvr-test'")
    assert len(versions) == 1
    registered = summary["registered_model_uri"]
    assert registered == f"models:/dfmvr-test/{versions[0].version}"

    # the registered model loads back and reproduces the logged validation metric
    mlflow.set_tracking_uri(tracking)
    rec = load(registered)
    from dfmvr.data.loader import make_loader

    def batches():
        return iter(make_loader(rec.cfg.data, rec.cfg.data.val_split, rank=0, world_size=1, resampled=False,
                                with_gt=True, shuffle=False))

    metrics, _ = validate(rec.model, batches(), rec.cfg, max_samples=rec.cfg.train.val_samples)
    assert metrics[VAL_METRIC] == pytest.approx(summary["val_rmse_mm"], rel=1e-4)
    # and the run: form loads the same weights
    by_run = load(summary["model_uri"])
    for (k, a), (_, b) in zip(rec.model.state_dict().items(), by_run.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_worker_killed_after_checkpoint_resumes_without_losing_or_repeating_steps(synth_root, tmp_path, local_ray):
    from dfmvr.config import apply_overrides
    from dfmvr.presets import tiny

    work = tmp_path / "work"
    cfg = apply_overrides(tiny(), _tiny_overrides(work, str(synth_root), **{
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "train.steps": 30, "train.ckpt_every": 5, "train.val_every": 15, "train.max_failures": 2,
        "train.run_name": "fault-test", "train.keep_checkpoints": 10,
    }))
    journal = work / "runs" / "fault-test" / "steps.jsonl"
    rank1 = work / "runs" / "fault-test" / "workers" / "rank1.json"
    killed: dict = {}

    snapshot = work / "ray_results" / "fault-test" / "checkpoint_manager_snapshot.json"

    def kill_rank1() -> bool:
        # past a registered checkpoint, kill rank 1
        at_step = _checkpointed_and_past(journal, snapshot, 7)
        if at_step is None or not rank1.exists():
            return False
        pid = json.loads(rank1.read_text())["pid"]
        killed.update(pid=pid, at_step=at_step)
        os.kill(pid, signal.SIGKILL)
        return True

    import tempfile

    def restores():
        return set(Path(tempfile.gettempdir()).glob("dfmvr-restore-*"))

    before = restores()
    summary = _train_with_fault(cfg, kill_rank1)
    # the restarted workers' local copies of the checkpoint they resumed from are gone
    assert restores() == before

    assert killed, "the worker was never killed"
    assert summary["status"] == "FINISHED" and summary["steps"] == 30
    attempts = _steps_by_attempt(journal)
    assert len(attempts) >= 2, attempts
    first, last = attempts[0], attempts[-1]
    assert first == list(range(1, len(first) + 1))  # no step lost before the failure
    resumed_at = last[0] - 1
    assert resumed_at % 5 == 0 and 5 <= resumed_at <= killed["at_step"]  # from a checkpoint
    assert last == list(range(resumed_at + 1, 31))  # each step after it exactly once

    # every rank restored exactly that checkpoint's weights and optimizer state
    _assert_ranks_restored(work, "fault-test", resumed_at, ranks=(0, 1))


def _steps_by_attempt(journal: Path) -> list[list[int]]:
    attempts: list[list[int]] = []
    last_pid = None
    for r in (json.loads(line) for line in journal.read_text().splitlines() if line.strip()):
        if r["pid"] != last_pid:
            attempts.append([])
            last_pid = r["pid"]
        attempts[-1].append(r["step"])
    return attempts


def test_two_node_cluster_loses_a_node_and_finishes_on_the_other(synth_root, tmp_path, monkeypatch):
    """A two-node Ray cluster on loopback (``ray.cluster_utils.Cluster``), one worker per node
    (``SPREAD``); the second node is removed after the first checkpoint: the run restarts its
    worker group from that checkpoint on the node that remains and finishes, no step lost or
    repeated, both ranks holding the checkpoint's weights and optimizer state."""
    import ray
    from ray.cluster_utils import Cluster

    from dfmvr.config import apply_overrides
    from dfmvr.presets import tiny

    scratch = Path("/tmp") / f"dfmvr-ray-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    scratch.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", str(scratch))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, configure_logging=False)
    try:
        work = tmp_path / "work"
        cfg = apply_overrides(tiny(), _tiny_overrides(work, str(synth_root), **{
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "train.steps": 24, "train.ckpt_every": 4, "train.val_every": 12, "train.max_failures": 2,
            "train.run_name": "node-loss", "train.keep_checkpoints": 10, "train.placement_strategy": "SPREAD",
        }))
        run = work / "runs" / "node-loss"
        snapshot = work / "ray_results" / "node-loss" / "checkpoint_manager_snapshot.json"
        removed: dict = {}

        def remove_second_node() -> bool:
            at_step = _checkpointed_and_past(run / "steps.jsonl", snapshot, 6)
            ranks = [run / "workers" / f"rank{r}.json" for r in (0, 1)]
            if at_step is None or not all(p.exists() for p in ranks):
                return False
            removed["nodes"] = {json.loads(p.read_text())["node"] for p in ranks}
            removed["at_step"] = at_step
            cluster.remove_node(second)
            return True

        summary = _train_with_fault(cfg, remove_second_node)
        assert removed, "the second node was never removed"
        assert len(removed["nodes"]) == 2, "the workers did not start one per node"
        assert summary["status"] == "FINISHED" and summary["steps"] == 24
        attempts = _steps_by_attempt(run / "steps.jsonl")
        assert len(attempts) >= 2, attempts
        first, last = attempts[0], attempts[-1]
        assert first == list(range(1, len(first) + 1))
        resumed_at = last[0] - 1
        assert resumed_at % 4 == 0 and 4 <= resumed_at <= removed["at_step"]
        assert last == list(range(resumed_at + 1, 25))
        _assert_ranks_restored(work, "node-loss", resumed_at, ranks=(0, 1))
        # after the loss both ranks ran on the node that remained
        after = {json.loads((run / "workers" / f"rank{r}.json").read_text())["node"] for r in (0, 1)}
        assert after == {cluster.head_node.node_id}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _assert_ranks_restored(work: Path, run_name: str, step: int, ranks: tuple[int, ...]) -> None:
    from dfmvr.train.checkpoint import load_checkpoint, state_digest

    saved = {}
    for d in (p for p in (work / "ray_results" / run_name).glob("checkpoint_*") if p.is_dir()):
        payload = load_checkpoint(d)
        saved[int(payload["step"])] = payload
    payload = saved[step]
    want = {"model": state_digest(payload.get("model_live", payload["model"])),
            "optimizer": state_digest(payload["optimizer"])}
    for rank in ranks:
        records = [json.loads(line) for line in
                   (work / "runs" / run_name / "workers" / f"rank{rank}-resumes.jsonl").read_text().splitlines()]
        last = records[-1]
        assert last["step"] == step, (rank, records)
        assert {k: last[k] for k in want} == want, f"rank {rank} holds other weights or optimizer state than step {step}'s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_training_job(synth_root, tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    scratch = Path("/tmp") / f"dfmvr-rayjob-{os.getpid()}"
    scratch.mkdir(exist_ok=True)
    env["RAY_TMPDIR"] = str(scratch)
    port, dash = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.run(
        [ray_bin, "start", "--head", "--num-cpus=3", "--disable-usage-stats", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={scratch}",
         "--include-dashboard=true"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert head.returncode == 0, head.stderr[-3000:]
    try:
        summary = tmp_path / "summary.json"
        work = tmp_path / "work"
        args = [f"{k}={v}" for k, v in _tiny_overrides(work, str(synth_root), **{
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "train.steps": 6,
            "train.val_every": 6, "train.ckpt_every": 6}).items()]
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
             # the venv's interpreter: the job's shell PATH need not have it first
             "--", sys.executable, "jobs/train.py", "preset=tiny", *args, "--summary-json", str(summary)],
            env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
        )
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        result = json.loads(summary.read_text())
        assert result["status"] == "FINISHED" and result["steps"] == 6
        assert result["val_rmse_mm"] > 0 and result["mlflow_run_id"]
    finally:
        _stop_processes_mentioning(str(scratch))


def _stop_processes_mentioning(marker: str) -> None:
    """Stop our own Ray head (every process whose command line or environment names our temp dir:
    Ray's workers retitle themselves, ``ray::TrainController``, but keep the head's ``RAY_TMPDIR``;
    one left behind outlived the suite with 1 GB); ``ray stop`` would stop every Ray process on the
    machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                named = b" ".join((proc / part).read_bytes().replace(b"\0", b" ") for part in ("cmdline", "environ"))
            except OSError:
                continue
            if marker.encode() in named:
                pids.append(int(proc.name))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
