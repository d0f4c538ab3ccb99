"""MLflow, in one place and one style: where runs go, fail-fast reachability, runs, params,
metrics and tags, and the model registry.

The tracking URI is ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the embedded
SQLite store ``<work_dir>/mlflow.db`` with artifacts in ``<work_dir>/mlartifacts``. Every job
(training, the parse net, sweeps, evaluation) talks to MLflow through an explicit
``MlflowClient`` and run ids (:func:`client`, :func:`start_run`, :func:`log_params`,
:func:`log_metrics`, :func:`set_tags`, :func:`end_run`), never through the fluent "active run":
the driver creates a job's run, and Ray workers, Tune trials and callbacks log into it by id.
Credentials never appear in messages, params or tags: URLs are shown without their user-info
part.
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
    path = embedded_store(work_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def embedded_store(work_dir: str | Path) -> Path:
    """The jobs' embedded SQLite store under ``work_dir`` (what they log to when no tracking URI is
    configured; :func:`resolve_tracking_uri` makes it, :func:`registry_store` only looks)."""
    return Path(work_dir).resolve() / "mlflow.db"


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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The kind the MLflow UI (3.x) reads to open an experiment on its training runs, not on the
GenAI overview (traces, tokens) it shows an experiment of no kind."""


def setup_experiment(uri: str, experiment: str, work_dir: str | Path) -> str:
    """Point MLflow at ``uri`` and make sure ``experiment`` exists, tagged as a model-training
    experiment (:data:`EXPERIMENT_KIND`); returns its id.

    With the embedded SQLite store, the experiment's artifacts go to ``<work_dir>/mlartifacts``
    (MLflow's default would be ``./mlruns`` in whatever directory the job started from).
    """
    import mlflow

    use(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # experiments made before the tag
            client().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (Path(work_dir).resolve() / "mlartifacts").as_uri()
    return mlflow.create_experiment(experiment, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def run_exists(run_id: str, experiment_id: str) -> bool:
    """Whether MLflow run ``run_id`` is in experiment ``experiment_id`` of the current store."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_run(run_id).info.experiment_id == experiment_id
    except MlflowException:
        return False


def use(uri: str) -> None:
    """Make ``uri`` the tracking store of this process (what :func:`client` without a URI, model
    URIs like ``models:/NAME@champion`` resolve against)."""
    import mlflow

    mlflow.set_tracking_uri(uri)


def client(uri: str | None = None):
    """An ``MlflowClient`` for ``uri`` (None: the URI :func:`setup_experiment` set)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def start_run(c, experiment_id: str, run_name: str, tags: dict[str, Any] | None = None) -> str:
    """A new run; returns its id (tags redacted as :func:`set_tags`). It carries MLflow's context
    tags (user, source, git commit) as the fluent ``mlflow.start_run`` would add them, so the
    UI's User and Source columns are filled."""
    from mlflow.tracking.context.registry import resolve_tags

    own = {k: str(v) for k, v in redact_all(dict(tags or {})).items()}
    run = c.create_run(experiment_id, run_name=run_name, tags=resolve_tags(own))
    return run.info.run_id


def reopen_run(c, run_id: str) -> None:
    """Mark an ended run ``RUNNING`` again: a resumed job, sweep or trial logs on into its run."""
    c.update_run(run_id, status="RUNNING")


def end_run(c, run_id: str, status: str = "FINISHED") -> None:
    """Mark a run ``FINISHED``, ``FAILED`` or ``KILLED``."""
    c.set_terminated(run_id, status=status)


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    """Params in batches (MLflow takes at most 100 per call and 6000 characters per value),
    credentials in URLs redacted."""
    from mlflow.entities import Param

    items = [Param(k, str(redact_all(v))[:6000] if v is not None else "") for k, v in params.items()]
    for i in range(0, len(items), 90):
        c.log_batch(run_id, params=items[i:i + 90])


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Finite metrics only (some stores refuse NaN; infinities mean "none yet"), in batches."""
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for i in range(0, len(batch), 500):
        c.log_batch(run_id, metrics=batch[i:i + 500])


def set_tags(c, run_id: str, tags: dict[str, Any]) -> None:
    """Tags, values as strings, credentials in URLs redacted."""
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:8000]) for k, v in redact_all(dict(tags)).items()]
    if items:
        c.log_batch(run_id, tags=items)


CHAMPION_ALIAS = "champion"
"""Registry alias of the best version so far (lowest ``VAL_METRIC``); ``models:/NAME@champion``."""
VAL_METRIC = "val/rmse_mm"
"""The validation metric that ranks checkpoints and registered versions (lower is better)."""
PARSED_MASKS_METRIC = "val/rmse_mm_parse_net_masks"
"""``VAL_METRIC`` with the frozen parse net's masks as the network's input instead of the samples'
own: what views without mask files (photos) get; logged for models that read the given masks."""
def gain_pct(rmse: float | None, mean_face: float | None) -> float | None:
    """How far below the mean face's error ``rmse`` is, in percent: the headline's unit."""
    if rmse is None or not mean_face:
        return None
    return 100.0 * (1.0 - float(rmse) / float(mean_face))


GIVEN_MASKS_METRIC = "val/rmse_mm_given_masks"
"""``VAL_METRIC`` with the samples' own (the synthetic shards' exact) masks as the network's input
instead of the parse net's: an upper bound no real input has; logged for models that read the
parse net's masks, where the shards carry masks."""


DEFAULT_WORK_DIR = "work"
"""The jobs' default ``work_dir`` (``Config.work_dir``), where :func:`registry_store` looks for their store."""


def registry_store(tracking_uri: str | None = None) -> str:
    """Where a ``runs:/`` or ``models:/`` URI is looked up, as the jobs resolve it: ``tracking_uri``,
    else the URI MLflow was pointed at in this process (``mlflow.set_tracking_uri``) or by
    ``MLFLOW_TRACKING_URI``, else the embedded store ``work/mlflow.db`` of the current folder when
    it exists. Nothing is created.

    Raises:
        FileNotFoundError: none of them: no store to look in (naming where it looked).
    """
    if tracking_uri:
        return tracking_uri
    import mlflow

    if mlflow.tracking.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    embedded = embedded_store(Path.cwd() / DEFAULT_WORK_DIR)
    if embedded.is_file():
        return f"sqlite:///{embedded}"
    raise FileNotFoundError(f"no MLflow store to look in: MLFLOW_TRACKING_URI is not set and there is no {embedded} "
                            "(the jobs' embedded store, made by python jobs/train.py in this folder); set "
                            "MLFLOW_TRACKING_URI, or run from the folder the jobs ran in")


def artifact_uri(uri: str, store: str) -> str:
    """``uri`` with a ``models:/`` name resolved in ``store``'s registry to where its artifacts are.

    MLflow 3.17's ``download_artifacts`` looks ``models:/NAME@ALIAS`` up in the process's default
    registry whatever ``registry_uri`` it is given (and creates ``mlflow.db`` in the current folder
    doing so), so the name is resolved here with a client bound to ``store``."""
    if not uri.startswith("models:/"):
        return uri
    from mlflow import MlflowClient
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    base, path = ModelsArtifactRepository.split_models_uri(uri)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    found = get_model_name_and_version(client, base)
    root = (client.get_logged_model(found[0]).artifact_location if len(found) == 1
            else client.get_model_version_download_uri(*found))
    return f"{root.rstrip('/')}/{path}" if path else root


def run_of_checkpoint(uri: str, payload: dict) -> tuple[str | None, str]:
    """The MLflow run a checkpoint belongs to (tracking URI already set), and how it was found
    or why there is none.

    ``runs:/RUN_ID/...`` names it; ``models:/NAME/VERSION`` (also ``@ALIAS``, ``/latest`` and
    logged-model ids ``models:/m-...``) through the registry; a path or ``s3://`` through the
    ``mlflow_run_id`` the training loop stores in every checkpoint.
    """
    from mlflow.exceptions import MlflowException

    if not uri.startswith(("runs:/", "models:/")) and not (payload.get("extra") or {}).get("mlflow_run_id"):
        return None, "the checkpoint carries no MLflow run id"
    c = client()
    run_id = None
    try:
        if uri.startswith("runs:/"):
            run_id, how = uri[len("runs:/"):].split("/")[0], "from the runs:/ URI"
        elif uri.startswith("models:/"):
            rest = uri[len("models:/"):].strip("/")
            if "@" in rest:
                name, alias = rest.split("@", 1)
                run_id = c.get_model_version_by_alias(name, alias).run_id
            elif "/" in rest:
                name, version = rest.split("/", 1)
                if version == "latest":
                    versions = c.search_model_versions(f"name='{name}'")
                    version = str(max(int(v.version) for v in versions)) if versions else version
                run_id = c.get_model_version(name, version).run_id
            else:
                run_id = c.get_logged_model(rest).source_run_id
            how = "from the model registry"
        else:
            run_id, how = (payload.get("extra") or {}).get("mlflow_run_id"), "stored in the checkpoint"
        if not run_id:
            return None, "the checkpoint carries no MLflow run id"
        c.get_run(run_id)
    except (MlflowException, ValueError) as e:
        return None, f"run {run_id or '?'} of {uri} not found in the tracking store ({str(e).splitlines()[0]:.200})"
    return run_id, how


RUNS_PAGE_QUERY = "?workflowType=machine_learning"
"""MLflow 3.17's UI opens an experiment on its GenAI overview (traces, tokens) unless the page's
workflow switch says model training: the experiment's ``mlflow.experimentKind`` tag alone does
not choose it there, this query (or clicking "Model training" once, which the browser keeps) does."""


def runs_page(uri: str, experiment_id: str, port: int = 5000) -> str:
    """The address of an experiment's runs table in the MLflow UI: on the tracking server for an
    ``http(s)`` store (credentials redacted), else on ``mlflow ui``'s default local address."""
    base = redact(uri).rstrip("/") if uri.startswith("http") else f"http://127.0.0.1:{port}"
    return f"{base}/#/experiments/{experiment_id}{RUNS_PAGE_QUERY}"


def ui_command(uri: str) -> str:
    """How a person opens the tracking store's UI: ``mlflow ui`` on a local store, the server's
    address (credentials redacted) otherwise."""
    return f"open {redact(uri)}" if uri.startswith("http") else f"mlflow ui --backend-store-uri {redact(uri)}"
