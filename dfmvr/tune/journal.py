"""The sweep's result journal, and an ASHA scheduler whose decisions survive ``Tuner.restore``.

Tune saves trial states when it checkpoints an experiment, but not its scheduler: after
``Tuner.restore`` a fresh ASHA has no record of the rungs finished trials reached, so the next
trial to reach a rung would be compared with nobody and never stopped. The driver appends
every result it sees to ``<sweep folder>/results.jsonl`` (:class:`ResultJournal`);
:class:`ResumableASHA` replays a restored trial's lines into its bracket when Tune adds it
back, so rung cutoffs after a resume are the ones an uninterrupted sweep would have used.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

_logger = logging.getLogger(__name__)


class ResultJournal:
    """Append-only JSON lines, one per Tune result: ``{"trial_id", "step", "metric", "checkpoint",
    "time_total_s", "extra": {...}}`` (``extra``: the ``angles/*`` metrics, when reported).

    Tune restarts a trial's result history when it restarts the trial after an interruption;
    this journal keeps every attempt's, so it is what the table, the MLflow summary and ASHA's
    replay read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> dict[str, list[dict[str, Any]]]:
        """Records per trial id, in order. A torn last line (a driver killed mid-write) is skipped."""
        out: dict[str, list[dict[str, Any]]] = {}
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(rec["trial_id"], []).append(rec)
        return out


def last_step(records: list[dict[str, Any]]) -> int:
    """The furthest optimiser step a trial reported (over every attempt)."""
    return int(max((r.get("step") or 0 for r in records), default=0))


def train_seconds(records: list[dict[str, Any]]) -> float:
    """Tune's ``time_total_s`` summed over a trial's attempts (it starts again at 0 when a trial
    is restarted after an interruption)."""
    total, prev = 0.0, None
    for r in records:
        t = r.get("time_total_s")
        if t is None:
            continue
        if prev is not None and t < prev:
            total += prev
        prev = t
    return total + (prev or 0.0)


def best_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record with the lowest finite metric that carries a checkpoint, else the lowest."""
    finite = [r for r in records if r.get("metric") is not None and math.isfinite(r["metric"])]
    with_ckpt = [r for r in finite if r.get("checkpoint")]
    pool = with_ckpt or finite
    return min(pool, key=lambda r: r["metric"]) if pool else None


STOPPED = "stopped"
"""``event`` of the journal line ASHA writes when it stops a trial early."""


def stopped_early(records: list[dict[str, Any]]) -> bool:
    """Whether the scheduler stopped the trial before its last step."""
    return any(r.get("event") == STOPPED for r in records)


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHA (``time_attr`` = optimiser step) that re-learns restored trials' rungs from the journal,
    and journals its early stops (``{"trial_id", "step", "event": "stopped"}``) so the table can
    tell a stopped trial from an interrupted one.

    Metric and mode come from ``tune.TuneConfig`` (Tune refuses them in both places).
    """

    def __init__(self, *, journal: str, time_attr: str, max_t: int, grace_period: int, reduction_factor: float):
        super().__init__(time_attr=time_attr, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor, brackets=1)
        self._journal_path = str(journal)
        self._replay: dict[str, list[dict[str, Any]]] | None = None

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if self._replay is None:
            self._replay = ResultJournal(self._journal_path).read()
        records = self._replay.pop(trial.trial_id, [])
        bracket = self._trial_info[trial.trial_id]
        for rec in records:
            metric = rec.get("metric")
            if metric is None or (isinstance(metric, float) and math.isnan(metric)):
                continue
            bracket.on_result(trial, rec["step"], self._metric_op * metric)
        if records:
            _logger.info("ASHA: replayed %d results of restored trial %s", len(records), trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        step = result.get(self._time_attr)
        if action == self.STOP and step is not None and step < self._max_t:
            ResultJournal(self._journal_path).append({"trial_id": trial.trial_id, "step": float(step),
                                                      "event": STOPPED})
        return action
