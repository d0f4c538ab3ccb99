"""MLflow tracking: where runs go, fail-fast reachability, and the model registry.

The tracking URI is ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the embedded
SQLite store ``<work_dir>/mlflow.db`` with artifacts in ``<work_dir>/mlartifacts``. The driver
creates one run per job and registers the best checkpoint; rank 0 of the workers logs metrics
and images into that run by id. Credentials never appear in messages: URLs are shown without
their user-info part.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
"""Name of the logged MLflow model inside a run."""


def redact(url: str) -> str:
    """``http://user:secret@host/x`` -> ``http://host/x`` (never print credentials)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def resolve_tracking_uri(tracking_cfg, work_dir: str | Path) -> str:
    """The tracking URI this job uses (see the module docstring)."""
    if tracking_cfg.tracking_uri:
        return tracking_cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(work_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when an HTTP tracking server does not answer ``/health``.

    Raises:
        ConnectionError: naming the (redacted) URL.
    """
    if not uri.startswith(("http://", "https://")):
        return
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
            if resp.status != 200:
                raise ConnectionError(f"MLflow tracking server {redact(uri)}: /health answered {resp.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"MLflow tracking server {redact(uri)} is unreachable ({reason}); "
            "check tracking.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None


def setup_experiment(uri: str, experiment: str, work_dir: str | Path) -> str:
    """Point MLflow at ``uri`` and make sure ``experiment`` exists; returns its id.

    With the embedded SQLite store, the experiment's artifacts go to ``<work_dir>/mlartifacts``
    (MLflow's default would be ``./mlruns`` in whatever directory the job started from).
    """
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(work_dir).resolve() / "mlartifacts").as_uri()
    return mlflow.create_experiment(experiment, artifact_location=location)


def log_params(params: dict[str, Any]) -> None:
    """Log flattened config params (MLflow caps value length at 6000 characters)."""
    import mlflow

    items = {k: (str(v)[:6000] if v is not None else "") for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 90):  # MLflow takes at most 100 params per batch
        mlflow.log_params({k: items[k] for k in keys[i:i + 90]})


def register_best(run_id: str, checkpoint_dir: str | Path, name: str, metrics: dict[str, float]) -> dict[str, Any]:
    """Log ``checkpoint_dir`` as an MLflow pyfunc model in ``run_id`` and register it as ``name``.

    Returns:
        ``{"model_uri": "runs:/...", "registered_uri": "models:/NAME/VERSION" or None, "version": ...}``.
    """
    import mlflow

    from dfmvr.serving import DFMVRPyfunc

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=DFMVRPyfunc(),
            artifacts={"checkpoint": str(checkpoint_dir)},
            pip_requirements=["dfmvr"],
            metadata={"val_metrics": metrics},
        )
    out: dict[str, Any] = {"model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT}", "logged_model_uri": info.model_uri,
                           "registered_uri": None, "version": None}
    if name:
        mv = mlflow.register_model(info.model_uri, name, tags={k: f"{v:.6g}" for k, v in metrics.items()})
        client = mlflow.MlflowClient()
        desc = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        client.update_model_version(name, mv.version, description=f"run {run_id}: {desc}")
        out["registered_uri"] = f"models:/{name}/{mv.version}"
        out["version"] = mv.version
    return out


def ui_command(uri: str) -> str:
    """How a person opens the tracking store's UI: ``mlflow ui`` on a local store, the server's
    address (credentials redacted) otherwise."""
    return f"open {redact(uri)}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
