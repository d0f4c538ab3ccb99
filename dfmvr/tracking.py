"""MLflow tracking: where runs go, fail-fast reachability, and the model registry.

The tracking URI is ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the embedded
SQLite store ``<work_dir>/mlflow.db`` with artifacts in ``<work_dir>/mlartifacts``. The driver
creates one run per job and registers the best checkpoint; rank 0 of the workers logs metrics
and images into that run by id. Credentials never appear in messages: URLs are shown without
their user-info part.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
"""Name of the logged MLflow model inside a run."""


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")


def redact(url: str) -> str:
    """A URL without its credentials, for anything printed, logged, tagged or saved.

    Any scheme (``http(s)``, ``postgresql``, ``mysql+pymysql``, ``s3``, ...): the ``user:password@``
    part is removed, and every query value (a presigned URL's signature, a session token) becomes
    ``***``. ``postgresql://u:pw@db:5432/mlflow`` -> ``postgresql://db:5432/mlflow``. Strings that
    are not URLs come back unchanged.
    """
    if not isinstance(url, str) or not _URL.fullmatch(url):
        return url
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc and not parts.query:
        return url
    out = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    if parts.query:
        out += "?" + "&".join(f"{kv.partition('=')[0]}=***" if "=" in kv else kv for kv in parts.query.split("&"))
    return out + (f"#{parts.fragment}" if parts.fragment else "")


def redact_all(value: Any) -> Any:
    """``value`` (a config dict, a summary, a list, a command line) with :func:`redact` applied to
    every URL in every string, also inside text (``tracking.tracking_uri=postgresql://u:pw@h``)."""
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(v) for v in value)
    return _URL.sub(lambda m: redact(m.group(0)), value) if isinstance(value, str) else value


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
    parts = urllib.parse.urlsplit(uri)
    # credentials in the URI go into a header: urllib would take "user:pw@host" for the host
    health = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/") + "/health"
    request = urllib.request.Request(health)
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
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


def run_exists(run_id: str, experiment_id: str) -> bool:
    """Whether MLflow run ``run_id`` is in experiment ``experiment_id`` of the current store."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id).info.experiment_id == experiment_id
    except MlflowException:
        return False


def log_params(params: dict[str, Any]) -> None:
    """Log flattened config params (MLflow caps value length at 6000 characters)."""
    import mlflow

    items = {k: (str(redact(v))[:6000] if v is not None else "") for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 90):  # MLflow takes at most 100 params per batch
        mlflow.log_params({k: items[k] for k in keys[i:i + 90]})


CHAMPION_ALIAS = "champion"
"""Registry alias of the best version so far (lowest ``VAL_METRIC``); ``models:/NAME@champion``."""
VAL_METRIC = "val/rmse_mm"
"""The validation metric that ranks checkpoints and registered versions (lower is better)."""


def dfmvr_requirement() -> str:
    """The pip requirement that installs exactly the dfmvr running now: ``dfmvr @ file:///...`` for
    a local checkout or wheel (PEP 610 ``direct_url.json``), else ``dfmvr==VERSION``; never a bare
    ``dfmvr`` that a package index could satisfy with someone else's package."""
    import json
    from importlib import metadata

    try:
        dist = metadata.distribution("dfmvr")
    except metadata.PackageNotFoundError:
        raise RuntimeError("dfmvr is not installed (pip install -e .): the logged model could not name it") from None
    direct = dist.read_text("direct_url.json")
    if direct:
        url = json.loads(direct).get("url")
        if url:
            return f"dfmvr @ {url}"
    return f"dfmvr=={dist.version}"


def _version_score(client, name: str, version: str) -> float | None:
    tags = client.get_model_version(name, version).tags or {}
    try:
        return float(tags[VAL_METRIC])
    except (KeyError, ValueError):
        return None


def register_best(run_id: str, checkpoint_dir: str | Path, name: str, metrics: dict[str, float]) -> dict[str, Any]:
    """Log ``checkpoint_dir`` (a whole model bundle: weights, parse net, face-model signature,
    config) as an MLflow pyfunc model in ``run_id``, register it as a new version of ``name`` and
    move alias ``champion`` to it when its ``val/rmse_mm`` beats the current champion's (or there
    is none).

    Returns:
        ``model_uri`` (``runs:/...``), ``registered_uri`` (``models:/NAME/VERSION`` or None),
        ``version``, ``champion`` (True when the alias moved here), ``champion_uri``
        (``models:/NAME@champion``), ``previous_champion`` (version or None) and its score.
    """
    import mlflow

    from dfmvr.serving import DFMVRPyfunc

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=DFMVRPyfunc(),
            artifacts={"checkpoint": str(checkpoint_dir)},
            pip_requirements=[dfmvr_requirement()],
            metadata={"val_metrics": metrics},
        )
    out: dict[str, Any] = {"model_uri": f"runs:/{run_id}/{MODEL_ARTIFACT}", "logged_model_uri": info.model_uri,
                           "registered_uri": None, "version": None, "champion": False, "champion_uri": None,
                           "previous_champion": None, "previous_champion_score": None}
    if not name:
        return out
    from mlflow.exceptions import MlflowException

    mv = mlflow.register_model(info.model_uri, name, tags={k: f"{v:.6g}" for k, v in metrics.items()})
    client = mlflow.MlflowClient()
    desc = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    client.update_model_version(name, mv.version, description=f"run {run_id}: {desc}")
    out["registered_uri"] = f"models:/{name}/{mv.version}"
    out["version"] = str(mv.version)
    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException:
        current = None
    score = metrics.get(VAL_METRIC)
    best = _version_score(client, name, current) if current is not None else None
    out["previous_champion"], out["previous_champion_score"] = current, best
    if score is not None and (current is None or best is None or float(score) < best):
        client.set_registered_model_alias(name, CHAMPION_ALIAS, mv.version)
        out["champion"] = True
    out["champion_uri"] = f"models:/{name}@{CHAMPION_ALIAS}"
    return out


def ui_command(uri: str) -> str:
    """How a person opens the tracking store's UI: ``mlflow ui`` on a local store, the server's
    address (credentials redacted) otherwise."""
    return f"open {redact(uri)}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {redact(uri)}"
