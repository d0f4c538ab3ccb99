"""The Ray Train side: the per-worker function, its session adapter and rank 0's MLflow logger.

``train_func_per_worker(config)`` is what ``TorchTrainer`` runs on every worker; it rebuilds the
typed config, wraps the model with ``ray.train.torch.prepare_model`` (DDP: NCCL on GPU, gloo on
CPU) and runs :func:`dfmvr.train.loop.run_loop`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from dfmvr.config import Config, from_dict

_logger = logging.getLogger(__name__)


class RaySession:
    """Adapts Ray Train's context to what :func:`run_loop` needs."""

    def __init__(self, resume_from: str = ""):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._resume_from = resume_from
        self._restored_dir: str | None = None

    def checkpoint_to_restore(self) -> str | None:
        """A local copy of the checkpoint to continue from (removed by :meth:`restored`)."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None and not self._resume_from:
            return None
        self._restored_dir = tempfile.mkdtemp(prefix="dfmvr-restore-")
        if ckpt is not None:
            # a worker-group restart (FailureConfig) or a re-run with the same name and storage
            return ckpt.to_directory(self._restored_dir)
        from dfmvr.train.checkpoint import resolve_checkpoint

        return str(resolve_checkpoint(self._resume_from, cache_dir=self._restored_dir))

    def restored(self) -> None:
        """The checkpoint is loaded: remove the local copy."""
        if self._restored_dir:
            shutil.rmtree(self._restored_dir, ignore_errors=True)
            self._restored_dir = None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


class RunLogger:
    """Rank 0's MLflow logging into the run the driver created (by id, no global state).

    Tracking must never stop training: a failed call is retried ``retries`` times, then dropped
    with a warning that counts the drops so far (``dropped``). MLflow's own
    HTTP retries are cut to one short one in this process, or one call could stall a step for
    minutes while a tracking server is down.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, retries: int = 2, backoff_s: float = 1.0):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from dfmvr import tracking

        self.client = tracking.client(tracking_uri)
        self.run_id = run_id
        self.retries = retries
        self.backoff_s = backoff_s
        self.dropped = 0

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        for attempt in range(self.retries + 1):
            try:
                fn(*args, **kwargs)
                return
            except Exception as exn:  # any tracking failure: the network, the server, the store
                if attempt == self.retries:
                    self.dropped += 1
                    _logger.warning("MLflow %s failed %d times, dropped (%d dropped so far): %s",
                                    what, attempt + 1, self.dropped, str(exn)[:300])
                    return
                time.sleep(self.backoff_s * (attempt + 1))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from dfmvr import tracking

        self._call(f"metrics at step {step}", tracking.log_metrics, self.client, self.run_id, metrics, step)

    def log_validation_images(self, view: dict, step: int) -> None:
        from dfmvr.visualize import validation_grid, write_png

        grid = validation_grid(view)
        with tempfile.TemporaryDirectory() as d:
            path = write_png(Path(d) / f"val_step{step:07d}.png", grid)
            self._call(f"image at step {step}", self.client.log_artifact, self.run_id, str(path),
                       artifact_path="val_images")


def _record_worker(cfg: Config, rank: int) -> None:
    """Write ``<work_dir>/runs/<run_name>/workers/rank<r>.json`` (pid, host, Ray node, start time): which
    process is which rank, for operators (and the fault-tolerance test)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "node": _node_id(), "rank": rank, "started": time.time()}
    (_workers_dir(cfg) / f"rank{rank}.json").write_text(json.dumps(info))


def _record_resume(cfg: Config, rank: int, record: dict) -> None:
    """Append to ``<work_dir>/runs/<run_name>/workers/rank<r>-resumes.jsonl`` what this rank
    restored: the checkpoint, its step, and digests of the weights and optimizer state it now
    holds (compare with :func:`dfmvr.train.checkpoint.state_digest` of the checkpoint's)."""
    with (_workers_dir(cfg) / f"rank{rank}-resumes.jsonl").open("a") as f:
        f.write(json.dumps({"pid": os.getpid(), "t": time.time(), "node": _node_id(), **record}) + "\n")


def _workers_dir(cfg: Config) -> Path:
    d = Path(cfg.work_dir) / "runs" / cfg.train.run_name / "workers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray: no node
        return None


def train_func_per_worker(config: dict) -> None:
    """Entry point of every Ray Train worker.

    ``config``: ``{"cfg": to_dict(Config), "tracking_uri": str, "run_id": str | None, "parse_net": dict | None,
    "deadline": float | None}`` (``parse_net``: the frozen parse net's checkpoint dict, read by the
    driver; ``deadline``: when the training steps end, from ``train.time_budget_s``).
    """
    import ray.train.torch

    from dfmvr.train.loop import run_loop, write_step_journal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = from_dict(Config, config["cfg"])
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    session = RaySession(resume_from=cfg.train.resume_from)
    _record_worker(cfg, session.rank)
    # the driver reads the parse net and ships it (a worker on another node has no such file);
    # a worker started some other way reads model.parse_net itself
    parse_net = config.get("parse_net")
    if parse_net is None and cfg.model.parse_net:
        from dfmvr.nets import read_parsenet_file

        parse_net = read_parsenet_file(cfg.model.parse_net)

    def prepare(model: torch.nn.Module) -> torch.nn.Module:
        if cfg.train.sync_bn and session.world_size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # rank 0 alone validates and checkpoints, and BatchNorm in training mode normalises with the
        # batch's own statistics: DDP's default broadcast of rank 0's running statistics before
        # every forward pass changed nothing rank 0 computes and took 4% of a CPU step (py-spy;
        # docs/notes/training-readings.md, reading 19)
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})

    tracker = None
    if session.rank == 0 and config.get("run_id"):
        tracker = RunLogger(config["tracking_uri"], config["run_id"])
    journal = None
    if session.rank == 0:
        journal = write_step_journal(Path(cfg.work_dir) / "runs" / cfg.train.run_name / "steps.jsonl")
    run_loop(cfg, session, tracker=tracker, parse_net=parse_net, prepare_model=prepare, on_step=journal,
             on_resume=lambda record: _record_resume(cfg, session.rank, record), deadline=config.get("deadline"))
