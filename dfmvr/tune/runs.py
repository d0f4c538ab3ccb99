"""MLflow for a sweep: one parent run, one child run per trial, found again by tags on resume.

Everything goes through :mod:`dfmvr.tracking`'s client style (never the fluent active run): the
sweep driver, Tune's callback thread and every trial's process log into runs they name by id.
Child runs carry ``mlflow.parentRunId`` (the MLflow UI nests them under the sweep) and
``dfmvr.trial_id`` (Tune's trial id, stable across ``Tuner.restore``), so a resumed trial logs
into the run it started, not a new one.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

from dfmvr.tracking import end_run, log_metrics, log_params, reopen_run, start_run

_logger = logging.getLogger(__name__)

TAG_SWEEP = "dfmvr.sweep"
TAG_ROLE = "dfmvr.sweep_role"
TAG_TRIAL_ID = "dfmvr.trial_id"
TAG_VARIANT = "dfmvr.variant"
TAG_SEED = "dfmvr.seed"
TAG_STATUS = "dfmvr.trial_status"
TAG_ERROR = "dfmvr.error"
PARENT_TAG = "mlflow.parentRunId"

MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED", "interrupted": "KILLED"}
"""Trial outcome -> MLflow run status (stopped early by ASHA, or interrupted with the sweep:
KILLED; ``dfmvr.trial_status`` tells which; ``--resume`` reopens an interrupted trial's run)."""


def start_parent(c, experiment_id: str, sweep: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """A new parent run for ``sweep``; returns its id."""
    run_id = start_run(c, experiment_id, sweep, {TAG_SWEEP: sweep, TAG_ROLE: "parent", **tags})
    log_params(c, run_id, params)
    return run_id


def find_child(c, experiment_id: str, parent_run_id: str, trial_id: str):
    """The child run of ``trial_id`` under ``parent_run_id``, or None."""
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}' and tags.`{TAG_TRIAL_ID}` = '{trial_id}'",
        max_results=5,
    )
    return runs[0] if runs else None


def children(c, experiment_id: str, parent_run_id: str) -> list:
    """Every child run of the sweep."""
    return list(c.search_runs([experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent_run_id}'",
                              max_results=10000))


def open_child(c, experiment_id: str, parent_run_id: str, *, trial_id: str, name: str,
               params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
    """The child run of this trial: found (a resumed trial: set RUNNING again) or created with its
    params and tags. Returns its id."""
    found = find_child(c, experiment_id, parent_run_id, trial_id)
    if found is not None:
        if found.info.status != "RUNNING":
            reopen_run(c, found.info.run_id)
        c.set_tag(found.info.run_id, TAG_STATUS, "running")
        _logger.info("trial %s: continuing MLflow run %s", trial_id, found.info.run_id)
        return found.info.run_id
    run_id = start_run(c, experiment_id, name, {
        PARENT_TAG: parent_run_id, TAG_TRIAL_ID: trial_id, TAG_ROLE: "trial", TAG_STATUS: "running", **tags})
    log_params(c, run_id, params)
    return run_id


def short_error(error: BaseException | str) -> str:
    """One line for a table cell: the innermost ``SomethingError: message`` line of a (Ray-wrapped)
    error, at most 200 characters."""
    text = str(error) if not isinstance(error, str) else error
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    candidates = [ln for ln in lines if ("Error:" in ln or "Exception:" in ln) and not ln.startswith("File ")]
    line = candidates[-1] if candidates else (lines[0] if lines else type(error).__name__)
    if not candidates and isinstance(error, BaseException):
        line = f"{type(error).__name__}: {line}"
    line = line.replace("|", "/")  # a markdown table cell
    return line if len(line) <= 200 else line[:197] + "..."


def record_error(c, run_id: str, error: str) -> None:
    """The error on a run: one line as a tag, all of it as the artifact ``error.txt``."""
    c.set_tag(run_id, TAG_ERROR, short_error(error))
    with tempfile.TemporaryDirectory(prefix="dfmvr-error-") as d:
        path = Path(d) / "error.txt"
        path.write_text(error)
        c.log_artifact(run_id, str(path))


def close_child(c, run_id: str, outcome: str, *, error: str = "", metrics: Mapping[str, float] | None = None,
                checkpoint_dir: str | Path | None = None) -> None:
    """End a child run: outcome tag and MLflow status (``finished``/``stopped``/``failed``/
    ``interrupted``), the
    error (tag: one line; artifact ``error.txt``: all of it), summary metrics, the best checkpoint
    (artifact ``checkpoint/``: ``dfmvr.serving.load("runs:/<id>/checkpoint")`` loads it)."""
    if metrics:
        log_metrics(c, run_id, metrics)
    if checkpoint_dir is not None:
        c.log_artifacts(run_id, str(checkpoint_dir), artifact_path="checkpoint")
    if error:
        record_error(c, run_id, error)
    c.set_tag(run_id, TAG_STATUS, outcome)
    end_run(c, run_id, MLFLOW_STATUS[outcome])
