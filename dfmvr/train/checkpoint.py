"""Checkpoints: data, never code.

A checkpoint is a directory with ``checkpoint.pt`` (a dict of tensors and plain Python values,
loaded with ``torch.load(weights_only=True)``) and ``meta.json`` (step, metrics, config, the face
model's signature) readable without torch. It carries everything to continue a run: model,
optimizer, scheduler, step, config, data position and counters.

``resolve_checkpoint`` accepts a local directory or file, ``s3://bucket/prefix``, an MLflow
``runs:/RUN_ID/path`` or ``models:/NAME/VERSION`` URI, and returns a local directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

_logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def save_checkpoint(directory: str | Path, *, model_state: dict, step: int, config: dict,
                    face_signature: dict, metrics: dict | None = None, optimizer_state: dict | None = None,
                    scheduler_state: dict | None = None, extra: dict | None = None,
                    live_model_state: dict | None = None, parse_net: dict | None = None) -> Path:
    """Write a checkpoint into ``directory`` (created). Returns the directory.

    ``model_state`` is the model to serve and score (the weight average when training keeps one,
    ``optim.ema_decay``); ``live_model_state`` the optimiser's own weights, which a resumed run
    continues from (``model_live``; absent when they are the same as ``model``). ``parse_net`` is
    the frozen parse net's checkpoint dict (:func:`dfmvr.nets.read_parsenet_file`): a checkpoint
    that carries it is a whole model bundle, making its own masks for views that come without.

    The file is written under a temporary name and renamed, so a crash mid-write never leaves
    a truncated ``checkpoint.pt`` where the last good one was.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format_version": FORMAT_VERSION,
        "model": model_state,
        **({"model_live": live_model_state} if live_model_state is not None else {}),
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "step": int(step),
        "config": config,
        "face_signature": face_signature,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "extra": extra or {},
        **({"parse_net": parse_net} if parse_net is not None else {}),
    }
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(directory / CHECKPOINT_FILE)
    meta = {k: payload[k] for k in ("format_version", "step", "config", "face_signature", "metrics", "extra")}
    if parse_net is not None:
        meta["parse_net"] = parse_net["meta"]
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return directory


def state_digest(state: Any) -> str:
    """sha256 over a (nested) state dict: every tensor's bytes, dtype and shape under its key path,
    every other value's repr. Equal for a model or optimizer and the checkpoint it loaded (the
    resume record, :func:`dfmvr.train.loop.run_loop`)."""
    h = hashlib.sha256()

    def visit(path: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                visit(f"{path}/{k}", obj[k])
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(f"{path}[{i}]", v)
        else:
            h.update(f"{path}={obj!r}".encode())

    visit("", state)
    return h.hexdigest()


def _find_checkpoint_file(path: Path) -> Path:
    if path.is_file():
        return path
    direct = path / CHECKPOINT_FILE
    if direct.is_file():
        return direct
    found = sorted(path.rglob(CHECKPOINT_FILE))
    if not found:
        raise FileNotFoundError(f"checkpoint {path}: no {CHECKPOINT_FILE} in it")
    if len(found) > 1:
        _logger.info("checkpoint %s holds %d checkpoint files; using %s", path, len(found), found[0])
    return found[0]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint directory or file (local) with ``weights_only=True``.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: the file is not a dfmvr checkpoint (corrupt, or unknown format version).
    """
    file = _find_checkpoint_file(Path(path))
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {file}: cannot be read as a dfmvr checkpoint ({e})") from e
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        got = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"checkpoint {file}: expected format_version {FORMAT_VERSION}, got {got!r}")
    return payload


def load_checkpoint_uri(uri: str, map_location: str | torch.device = "cpu", *,
                        tracking_uri: str | None = None) -> dict[str, Any]:
    """:func:`load_checkpoint` for any URI :func:`resolve_checkpoint` takes; whatever it downloads
    goes to a temporary folder that is removed before this returns."""
    with tempfile.TemporaryDirectory(prefix="dfmvr-ckpt-") as tmp:
        return load_checkpoint(resolve_checkpoint(uri, cache_dir=tmp, tracking_uri=tracking_uri),
                               map_location=map_location)


def resolve_checkpoint(uri: str, cache_dir: str | Path | None = None, *, tracking_uri: str | None = None) -> Path:
    """Local path for a checkpoint given as a path, ``s3://``, ``runs:/`` or ``models:/`` URI.

    ``runs:/`` and ``models:/`` are looked up in :func:`dfmvr.tracking.registry_store` (``tracking_uri``, else
    where the jobs log). A download goes to ``cache_dir``, else to a new temporary folder the
    caller owns (and should remove); :func:`load_checkpoint_uri` does both for callers that only
    need the payload.

    Raises:
        FileNotFoundError: nothing there; for MLflow URIs the message names the store searched.
    """
    if uri.startswith(("runs:/", "models:/")):
        import mlflow

        from dfmvr.tracking import artifact_uri, redact, registry_store

        try:
            store = registry_store(tracking_uri)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"checkpoint {uri}: {e}") from None
        dst = Path(cache_dir or tempfile.mkdtemp(prefix="dfmvr-ckpt-"))
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri(uri, store), dst_path=str(dst),
                                                        tracking_uri=store)
        except Exception as e:
            raise FileNotFoundError(f"checkpoint {uri}: cannot download from the MLflow store {redact(store)} "
                                    f"({e})") from e
        return Path(local)
    if uri.startswith("s3://"):
        from dfmvr.data import storage

        dst = Path(cache_dir or tempfile.mkdtemp(prefix="dfmvr-ckpt-"))
        prefix = uri.rstrip("/") + "/"
        urls = [u for u in storage.list_urls(prefix, recursive=True) if u.startswith(prefix)]
        if not urls:
            raise FileNotFoundError(f"checkpoint {uri}: no objects under this prefix")
        for url in urls:
            target = dst / url[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(url))
        return dst
    path = Path(uri)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {uri}: no such file or directory")
    return path
