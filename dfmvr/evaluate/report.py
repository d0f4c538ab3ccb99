"""An evaluation's results: the split's statistics per method (:func:`summarize`), the table the
job prints (:func:`format_table`), and the metrics and files logged to the checkpoint's MLflow
run (:func:`log_to_mlflow`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dfmvr.data.samples import Skipped
from dfmvr.evaluate.scoring import BASELINES

if TYPE_CHECKING:
    from dfmvr.evaluate.run import ChunkResult

TABLE_KEYS = ("now_mean_mm", "now_median_mm", "now_std_mm", "p2p_rmse_mm", "vertex_rmse_mm")
"""Rows of the printed table (region rows follow when present)."""


def _finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def summarize(result: ChunkResult) -> dict[str, Any]:
    """Split statistics per method: the model's at the top level, the baselines' under
    ``baselines.<name>`` (same keys). ``None`` where no sample had the metric."""

    def method(name: str) -> dict[str, float | None]:
        d = np.concatenate(result.distances[name]).astype(np.float64) if result.distances[name] else np.zeros(0)
        out: dict[str, float | None] = {
            "now_mean_mm": _finite_or_none(d.mean()) if d.size else None,
            "now_median_mm": _finite_or_none(np.median(d)) if d.size else None,
            "now_std_mm": _finite_or_none(d.std()) if d.size else None,
        }
        per_sample: dict[str, list[float]] = {}
        for rec in result.records:
            for k, v in rec[name].items():
                if k.startswith("now_"):
                    continue
                per_sample.setdefault(k, []).append(v)
        for k, values in per_sample.items():
            out[k] = _finite_or_none(float(np.mean(values)))
            if k == "p2p_rmse_mm":
                out["p2p_rmse_std_mm"] = _finite_or_none(float(np.std(values)))
        out.setdefault("p2p_rmse_mm", None)
        out.setdefault("vertex_rmse_mm", None)
        out["samples"] = len(result.records)
        return out

    summary: dict[str, Any] = method("model")
    summary["baselines"] = {name: method(name) for name in BASELINES + (("network",) if result.fit_terms else ())}
    if result.fit_terms:
        n = len(result.fit_terms)
        summary["fit"] = {
            "samples": n, "seconds_per_triplet": result.fit_seconds / n,
            "views_with_landmarks_found": result.fit_landmarks_found,
            "before": {k: float(np.mean([b[k] for b, _ in result.fit_terms])) for k in result.fit_terms[0][0]},
            "after": {k: float(np.mean([a[k] for _, a in result.fit_terms])) for k in result.fit_terms[0][1]},
        }
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The model beside its baselines, one metric per row (mm)."""
    rows = list(TABLE_KEYS) + sorted(k for k in summary if k.startswith("region_"))
    fitted = "network" in summary["baselines"]
    head = (f"{'metric (mm)':<22}{'fitted' if fitted else 'model':>10}{'mean face':>12}{'single view':>13}"
            + (f"{'network':>10}" if fitted else ""))
    lines = [head, "-" * len(head)]

    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) and v is not None else "-"

    for key in rows:
        base = summary["baselines"]
        lines.append(f"{key:<22}{cell(summary.get(key)):>10}{cell(base['mean_face'].get(key)):>12}"
                     f"{cell(base['single_view'].get(key)):>13}"
                     + (f"{cell(base['network'].get(key)):>10}" if fitted else ""))
    return "\n".join(lines)


@dataclass(kw_only=True, slots=True)
class EvalReport:
    """An evaluation's results and where its files went."""

    summary: dict[str, Any]
    records: list[dict]
    skipped: list[Skipped]
    out: Path
    overlays: list[Path]


def log_to_mlflow(report: EvalReport, run_id: str, step: int) -> list[str]:
    """Log ``eval/<split>/...`` metrics (baselines under ``eval/<split>/<baseline>/...``) at the
    checkpoint's step, and the summary, per-sample JSONL and overlays as artifacts under
    ``eval/<split>/``; a fitted evaluation under ``eval/<split>/fit_<start>_<landmarks>/`` (with
    each term ``terms_before/...`` and ``terms_after/...``). Returns the metric names logged."""
    from dfmvr import tracking

    client = tracking.client()
    split = report.summary["split"]
    if report.summary.get("fit_steps"):
        split = f"{split}/fit_{report.summary['fit_from']}_{report.summary['fit_landmarks']}"
    metrics: dict[str, float] = {}

    def add(prefix: str, values: dict) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
                metrics[f"{prefix}/{k}"] = float(v)

    add(f"eval/{split}", {k: v for k, v in report.summary.items() if k.endswith("_mm") or k == "samples"})
    add(f"eval/{split}", {"skipped": report.summary["n_skipped"]})
    for name, values in report.summary["baselines"].items():
        add(f"eval/{split}/{name}", values)
    if "fit" in report.summary:
        fit = report.summary["fit"]
        add(f"eval/{split}", {"fit_steps": report.summary["fit_steps"], "fit_seconds_per_triplet": fit["seconds_per_triplet"]})
        add(f"eval/{split}/terms_before", fit["before"])
        add(f"eval/{split}/terms_after", fit["after"])
    tracking.log_metrics(client, run_id, metrics, step)
    client.log_artifact(run_id, str(report.out / "summary.json"), artifact_path=f"eval/{split}")
    client.log_artifact(run_id, str(report.out / "per_sample.jsonl"), artifact_path=f"eval/{split}")
    if report.overlays:
        client.log_artifacts(run_id, str(report.out / "overlays"), artifact_path=f"eval/{split}/overlays")
    return sorted(metrics)


__all__ = ["EvalReport", "TABLE_KEYS", "format_table", "log_to_mlflow", "summarize"]
