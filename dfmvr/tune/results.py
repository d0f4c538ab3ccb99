"""A sweep's outcome as a table and a bar chart: one row per variant (its seeds together).

:func:`trial_records` reads Tune's results (one :class:`TrialRecord` per trial: status, best
validation RMSE, steps, train time, error); :func:`summarise` groups them into :class:`Row` s
(mean +- standard deviation over the variant's seeds); :func:`markdown` and :func:`plot` draw
them; :func:`write` puts ``results.md``, ``results.png`` and ``results.json`` in the sweep folder.
For the ``angles`` preset the rows are the test angles instead of variants.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable


@dataclass(kw_only=True, slots=True)
class TrialRecord:
    """One trial's outcome."""

    trial_id: str
    name: str
    """``v3-seed1`` or ``trial-00002``."""
    variant: str
    """Named variant, or empty."""
    description: str
    """What the variant changes, and the trial's point in the space."""
    seed: int
    params: dict[str, Any]
    """The trial's searched values (dotted keys)."""
    status: str
    """``finished``, ``stopped`` (early, by ASHA), ``failed`` or ``interrupted`` (the sweep was
    stopped before the trial ended: ``--resume`` continues it)."""
    val_rmse_mm: float | None
    """Lowest validation RMSE the trial reported (mm), None when it reported none."""
    steps: int
    """Last optimiser step reported."""
    train_seconds: float
    error: str = ""
    """One line, for failed trials."""
    run_id: str = ""
    """MLflow child run."""
    extra: dict[str, float] = field(default_factory=dict)
    """Test-set metrics reported after training (``angles/yaw30/rmse_mm``, ...)."""


@dataclass(kw_only=True, slots=True)
class Row:
    """One line of the table: a variant over its seeds (or, for ``angles``, one test angle)."""

    trial: str
    variant: str
    seeds: int
    """Trials with a validation RMSE (the mean and std are over these)."""
    values: list[float]
    mean: float | None
    std: float | None
    train_seconds: float | None
    """Mean training time of the row's trials."""
    status: str
    reference: float | None = None
    """The paper's number for this row, when the preset has one."""


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


_TRIAL_ID = re.compile(r"(?:^|_)([0-9a-f]{5}_\d{5})(?:_|$)")


def result_trial_id(result) -> str:
    """Tune's trial id of a ``Result``: from its metrics, else from its folder name
    (``<trainable>_<trial id>_<index>_<params>_<date>``; a trial that failed before its first
    report has no metrics)."""
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return str(trial_id)
    match = _TRIAL_ID.search(Path(str(result.path)).name) if result.path else None
    return match.group(1) if match else ""


def trial_records(result_grid, journal: dict[str, list[dict[str, Any]]], *, total_steps: int,
                  names: dict[str, str], descriptions: dict[str, str], labels: dict[str, str],
                  run_ids: dict[str, str]) -> list[TrialRecord]:
    """Records from a Tune ``ResultGrid`` (status, error, config) and the sweep's result journal
    (:class:`dfmvr.tune.journal.ResultJournal`: steps, validation RMSE and time over every attempt
    of a trial, across interruptions).

    Args:
        total_steps: ``train.steps``: a trial that ended earlier without an error was stopped.
        names / descriptions / labels / run_ids: by trial id (trial name, variant description,
            space label, MLflow child run id).
    """
    from dfmvr.tune.journal import last_step, stopped_early, train_seconds
    from dfmvr.tune.runs import short_error

    out = []
    for result in result_grid:
        cfg = result.config or {}
        trial_id = result_trial_id(result)
        recs = journal.get(trial_id, [])
        vals = [v for v in (_finite(r.get("metric")) for r in recs) if v is not None]
        steps = last_step(recs)
        extra: dict[str, float] = {}
        for r in recs:
            extra.update(r.get("extra") or {})
        if result.error is not None:
            status = "failed"
        elif steps >= total_steps:
            status = "finished"
        elif stopped_early(recs):
            status = "stopped"
        else:
            status = "interrupted"
        variant = cfg.get("variant") or ""
        desc = " ".join(x for x in (descriptions.get(variant, ""), labels.get(trial_id, "")) if x)
        out.append(TrialRecord(
            trial_id=trial_id, name=names.get(trial_id, trial_id), variant=variant, description=desc,
            seed=int(cfg.get("seed", 0)), params=dict(cfg.get("space") or {}), status=status,
            val_rmse_mm=min(vals) if vals else None, steps=steps, train_seconds=train_seconds(recs),
            error=short_error(result.error) if result.error is not None else "",
            run_id=run_ids.get(trial_id, ""), extra=extra,
        ))
    return sorted(out, key=lambda r: (r.variant, r.name, r.seed, r.trial_id))


def _status(records: list[TrialRecord]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    if set(counts) == {"finished"}:
        return "finished"
    parts = []
    for status in ("finished", "stopped", "failed", "interrupted"):
        if status not in counts:
            continue
        if status == "stopped":
            at = sorted({r.steps for r in records if r.status == "stopped"})
            parts.append(f"{counts[status]} stopped early at step {', '.join(map(str, at))}")
        elif status == "failed":
            errors = sorted({r.error for r in records if r.status == "failed"})
            parts.append(f"{counts[status]} failed: {'; '.join(errors)}")
        else:
            parts.append(f"{counts[status]} {status}")
    return ", ".join(parts)


def _row(trial: str, variant: str, values: list[float], records: list[TrialRecord],
         reference: float | None = None) -> Row:
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
    secs = [r.train_seconds for r in records if r.train_seconds]
    return Row(trial=trial, variant=variant, seeds=len(values), values=values, mean=mean, std=std,
               train_seconds=statistics.fmean(secs) if secs else None, status=_status(records), reference=reference)


def summarise(records: Iterable[TrialRecord], *, references: dict[str, float] | None = None,
              order: list[str] | None = None, angles: list[str] | None = None) -> list[Row]:
    """Group trials into rows.

    Named variants make one row each (in ``order``); trials without a variant are grouped by
    their point in the space (seeds of one grid point together; random draws are each their own
    row). With ``angles`` (labels such as ``yaw30``), the rows are the angle sets instead, each
    over every trial that evaluated it.
    """
    records = list(records)
    references = references or {}
    if angles:
        rows = []
        for label in angles:
            key = f"angles/{label}/rmse_mm"
            vals = [r.extra[key] for r in records if key in r.extra]
            rows.append(_row(label, f"side views at {label.removeprefix('yaw')} deg" if label != "random"
                             else "side views at random listed angles", vals, records))
        return rows
    groups: dict[tuple[str, str], list[TrialRecord]] = {}
    for r in records:
        groups.setdefault((r.variant, r.description if not r.variant else ""), []).append(r)
    keys = list(groups)
    if order:
        rank = {name: i for i, name in enumerate(order)}
        keys.sort(key=lambda k: (rank.get(k[0], len(rank)), k[1]))
    rows = []
    for variant, point in keys:
        recs = groups[(variant, point)]
        vals = [r.val_rmse_mm for r in recs if r.val_rmse_mm is not None and r.status != "failed"]
        trial = variant or ", ".join(r.name for r in recs)
        desc = recs[0].description if variant else (point or "base config")
        rows.append(_row(trial, desc, vals, recs, references.get(variant)))
    return rows


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def _mm(row: Row) -> str:
    if row.mean is None:
        return "-"
    return f"{row.mean:.4f} ± {row.std:.4f}" if row.seeds > 1 else f"{row.mean:.4f}"


def markdown(rows: list[Row], *, title: str = "", reference_name: str = "") -> str:
    """The results table (GitHub markdown). RMSE in mm: mean ± sample std over the seeds."""
    with_ref = any(r.reference is not None for r in rows)
    head = ["trial", "variant", "seeds", "val RMSE (mm)", "train time", "status"]
    if with_ref:
        head.append("paper (mm)")
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [r.trial, r.variant, str(r.seeds), _mm(r), _seconds(r.train_seconds), r.status]
        if with_ref:
            cells.append(f"{r.reference:.4f}" if r.reference is not None else "-")
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    if with_ref and reference_name:
        lines += ["", f"paper: {reference_name}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str | Path, *, title: str = "", reference_name: str = "") -> Path:
    """Bar chart of the rows' mean RMSE with ±1 std error bars (the paper's numbers as markers
    when the rows carry them); rows without a value are marked ``no result``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 + 1.1 * len(rows)), 4.0), dpi=120)
    xs = list(range(len(rows)))
    means = [r.mean if r.mean is not None else 0.0 for r in rows]
    stds = [r.std or 0.0 for r in rows]
    bars = ax.bar(xs, means, yerr=stds, capsize=4, color="#4C72B0", label="this sweep (mean ± std)")
    for x, r, bar in zip(xs, rows, bars):
        if r.mean is None:
            ax.text(x, 0, "failed" if "failed" in r.status else "no result", ha="center", va="bottom",
                    rotation=90, fontsize=8)
        else:
            ax.text(x, bar.get_height() + (r.std or 0.0), f"{r.mean:.3f}", ha="center", va="bottom", fontsize=7)
    refs = [(x, r.reference) for x, r in zip(xs, rows) if r.reference is not None]
    if refs:
        ax.scatter([x for x, _ in refs], [v for _, v in refs], marker="D", color="#DD8452", zorder=3,
                   label=reference_name or "reference")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    ax.set_xticks(xs)

    def short(text: str) -> str:
        return text if len(text) <= 22 else text[:21] + "…"

    # named variants: name over what it changes; search trials: their point in the space
    names = [short(r.variant or r.trial) if r.trial.startswith("trial-") else f"{r.trial}\n{short(r.variant)}"
             for r in rows]
    ax.set_xticklabels(names, fontsize=7, rotation=0 if len(rows) <= 6 else 45,
                       ha="center" if len(rows) <= 6 else "right")
    ax.set_ylabel("val RMSE (mm)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(folder: str | Path, rows: list[Row], records: list[TrialRecord], *, title: str = "",
          reference_name: str = "") -> dict[str, Path]:
    """``results.md``, ``results.png`` and ``results.json`` (rows and trials) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "results.md"
    md.write_text(markdown(rows, title=title, reference_name=reference_name))
    png = plot(rows, folder / "results.png", title=title, reference_name=reference_name)
    js = folder / "results.json"
    js.write_text(json.dumps({"rows": [asdict(r) for r in rows], "trials": [asdict(r) for r in records]},
                             indent=1, default=str))
    return {"table": md, "plot": png, "json": js}
