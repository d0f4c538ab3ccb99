"""The sweep driver's Tune callback: journal every result, close each trial's MLflow child run.

Runs in the sweep driver (not in trials), so it also sees trials Tune stopped early (ASHA
ends them by killing their process: nothing in the trial can log that) and trials whose
process died. On completion it logs the trial's best checkpoint (lowest validation RMSE among
the reports that carried one) into the child run; on error, the error.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from dfmvr import tracking
from dfmvr.tracking import VAL_METRIC
from dfmvr.tune import runs
from dfmvr.tune.journal import ResultJournal, best_record, last_step, stopped_early

_logger = logging.getLogger(__name__)

CHECKPOINT_PATH_KEY = "checkpoint_path"
"""Where ``TuneReportCallback`` puts the path of a report's checkpoint."""


def trial_error_text(trial) -> str:
    """The error Tune recorded for ``trial`` (its ``error.txt``), or a note that there is none."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text()
    return f"trial {trial.trial_id} ended with status {trial.status} and no recorded error"


@dataclass(kw_only=True, eq=False)
class SweepCallback(Callback):
    """Journal results, close child runs. Holds only plain data: Tune pickles it with the sweep."""

    journal_path: str
    """The sweep's result journal (:class:`~dfmvr.tune.journal.ResultJournal`); the name an
    interrupted sweep's pickled callback holds, so ``Tuner.restore`` still finds it."""
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    """The sweep's MLflow run: the trials' runs are its children."""
    train_storage: str
    """Where the trials' checkpoints are (Ray Train storage)."""
    total_steps: int

    def _journal(self) -> dict[str, list[dict[str, Any]]]:
        # read afresh: ASHA appends its stop events to the same file (small: a line per report)
        return ResultJournal(self.journal_path).read()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "step" not in result:
            return
        metric = result.get(VAL_METRIC)
        rec = {"trial_id": trial.trial_id, "step": float(result["step"]),
               "metric": float(metric) if metric is not None else None,
               "checkpoint": result.get(CHECKPOINT_PATH_KEY), "time_total_s": result.get("time_total_s"),
               "extra": {k: float(v) for k, v in result.items() if k.startswith("angles/")}}
        ResultJournal(self.journal_path).append(rec)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # a trial restarted after an interruption may have finished in its first attempt: the
        # journal has every attempt's steps, Tune's last result only the latest attempt's
        records = self._journal().get(trial.trial_id, [])
        steps = max(last_step(records), int((trial.last_result or {}).get("step", 0)))
        if steps >= self.total_steps:
            outcome = "finished"
        elif stopped_early(records):
            outcome = "stopped"
        else:  # ended without an error short of its last step: Tune was stopped (Ctrl-C)
            outcome = "interrupted"
        self.close(trial.trial_id, outcome, records=records)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.close(trial.trial_id, "failed", error=trial_error_text(trial))

    def close(self, trial_id: str, outcome: str, *, error: str = "",
              records: list[dict[str, Any]] | None = None) -> None:
        """End the trial's child run (once: a run no longer RUNNING is left as it is; the trial
        itself only records its error, the status is Tune's outcome). ``records``: the trial's
        journal entries when the caller has read them already."""
        try:
            client = tracking.client(self.tracking_uri)
            run = runs.find_child(client, self.experiment_id, self.parent_run_id, trial_id)
            if run is None:
                _logger.warning("trial %s ended (%s) before it opened its MLflow run", trial_id, outcome)
                return
            if run.info.status != "RUNNING":
                return
            if outcome != "failed" and runs.TAG_ERROR in run.data.tags:
                # stopping a trial (ASHA) can raise inside its ``trainer.fit``, which records the
                # error before Tune's outcome arrives: a stopped trial has no error
                client.delete_tag(run.info.run_id, runs.TAG_ERROR)
            best = best_record(records if records is not None else self._journal().get(trial_id, []))
            metrics = {}
            if best is not None and best.get("metric") is not None and math.isfinite(best["metric"]):
                metrics = {"best/val_rmse_mm": best["metric"], "best/step": best["step"]}
            if best is not None and best.get("checkpoint") and outcome != "failed":
                from dfmvr.train.checkpoint import resolve_checkpoint
                from dfmvr.train.launch import checkpoint_uri

                with tempfile.TemporaryDirectory(prefix="dfmvr-best-") as tmp:
                    try:
                        local = resolve_checkpoint(checkpoint_uri(best["checkpoint"], self.train_storage),
                                                   cache_dir=tmp)
                    except FileNotFoundError as e:
                        _logger.warning("trial %s: best checkpoint not found (%s); not logged", trial_id, e)
                        local = None
                    runs.close_child(client, run.info.run_id, outcome, error=error, metrics=metrics,
                                     checkpoint_dir=local)
                return
            runs.close_child(client, run.info.run_id, outcome, error=error, metrics=metrics)
        except Exception:  # a tracking hiccup must not end the sweep; the final pass retries
            _logger.exception("trial %s: could not close its MLflow run", trial_id)
