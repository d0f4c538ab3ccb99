"""The training driver: checks, data, MLflow run, ``TorchTrainer(...).fit()``, registration.

Runs where ``python jobs/train.py`` runs: on the laptop with a local Ray, or on the head node
under ``ray job submit``. Everything that can be checked before Ray starts is checked first
(config, S3 endpoint, MLflow server), so a typo costs seconds, not a cluster start.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from dfmvr.config import Config, apply_overrides, flatten, to_dict
from dfmvr.data.embedded import ensure_data
from dfmvr.tracking import GIVEN_MASKS_METRIC, PARSED_MASKS_METRIC, VAL_METRIC, gain_pct
from dfmvr.train.resume import check_resumable, previous_checkpoint, unique_run_name

_logger = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """A check before Ray starts failed (unreachable S3 or MLflow, missing or bad shards)."""


def _scaling(cfg: Config):
    import ray
    from ray.train import ScalingConfig

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.train.use_gpu == "true" or (cfg.train.use_gpu == "auto" and gpus > 0)
    if use_gpu and gpus == 0 and not cfg.train.num_workers:
        # an autoscaling cluster may have no GPU node yet: Ray Train asks for them, but only
        # for a number of workers the user names
        raise ValueError("train.use_gpu=true but the Ray cluster has no GPUs now; set train.num_workers=N "
                         "so Ray's autoscaler starts N GPU workers")
    n = cfg.train.num_workers or (int(gpus) if use_gpu else 2)
    resources = {"CPU": cfg.train.cpus_per_worker}
    return ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy=cfg.train.placement_strategy), n, use_gpu


def preflight(cfg: Config) -> tuple[Config, str]:
    """Everything checked before Ray starts: the work dir (made absolute), the MLflow tracking URI
    (reachable) and the shards (``ensure_data``: generated for the embedded default).

    Returns:
        ``(cfg, tracking_uri)`` with ``work_dir`` and ``data.url`` resolved.

    Raises:
        PreflightError: unreachable S3 or MLflow, missing or bad shards.
    """
    from dfmvr import tracking

    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = apply_overrides(cfg, {"work_dir": str(work)})
    try:
        tracking_uri = tracking.resolve_tracking_uri(cfg.tracking, work)
        tracking.check_reachable(tracking_uri)
        data_url = ensure_data(cfg)
    except (OSError, ValueError) as e:  # ConnectionError, StorageError, FileNotFoundError, ManifestError
        raise PreflightError(str(e)) from e
    return apply_overrides(cfg, {"data.url": data_url}), tracking_uri


def build_trainer(cfg: Config, *, tracking_uri: str, run_id: str | None, storage_path: str, scaling,
                  callbacks: Sequence[Any] = (), parse_net: dict | None = None, deadline: float | None = None):
    """The ``TorchTrainer`` that trains ``cfg``: :func:`train_func_per_worker` on every worker, rank 0
    logging into MLflow run ``run_id``, checkpoints under ``storage_path/train.run_name`` (the best
    ``train.keep_checkpoints`` by validation RMSE). ``jobs/train.py`` and every Ray Tune trial
    (``dfmvr.tune``, which passes Tune's report callback) fit this same trainer. ``parse_net`` is the
    frozen parse net's checkpoint dict, shipped to the workers (which may be on nodes without the
    file) and embedded in every checkpoint. ``deadline``: ``time.time()`` by which the training
    steps end (``train.time_budget_s``; the job passes it, Tune trials do not), or None."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from dfmvr.train.ray_worker import train_func_per_worker

    return TorchTrainer(
        train_func_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id,
                           "parse_net": parse_net, "deadline": deadline},
        scaling_config=scaling,
        run_config=RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=VAL_METRIC,
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks) or None,
        ),
    )


def train(cfg: Config, *, overrides_note: str = "", started: float | None = None) -> dict[str, Any]:
    """Run one training job; returns the summary (also what ``--summary-json`` holds).
    ``started``: the job's ``time.time()`` at its start (``train.time_budget_s`` counts from it;
    default now)."""
    import ray

    from dfmvr import tracking

    # the budget counts from here: the data and the parse net spend it too
    started = time.time() if started is None else started
    deadline = started + cfg.train.time_budget_s if cfg.train.time_budget_s > 0 else None
    cfg, tracking_uri = preflight(cfg)
    work = Path(cfg.work_dir)
    storage_path = cfg.train.storage_path or str(work / "ray_results")
    # a job that names no run is a new run: it never restores whatever ran under a fixed name before
    cfg = apply_overrides(cfg, {"train.run_name": cfg.train.run_name or unique_run_name()})
    resumed = resume_source(cfg, storage_path)
    cfg, parse_net, parse_summary = resolve_parse_net(cfg, resumed)
    if parse_net is not None and parse_summary is None:
        # a parse net the job did not train (named, builtin, or bundled in a resumed run): its
        # figures on this data's validation views, as its training job gives them
        from dfmvr.train.parsing import score_parse_net

        parse_summary = score_parse_net(cfg, parse_net, source=cfg.model.parse_net or "the resumed run's parse net")
    data_url = cfg.data.url
    mask_cache = prepare_mask_cache(cfg, parse_net)

    if not ray.is_initialized():
        # a local Ray for this job alone: no dashboard (its processes took about 2% of the two
        # cores, docs/notes/training-readings.md, "Where the acceptance of issue #11 stands");
        # `ray start --head` gives one for ray job submit and the UI
        ray.init(configure_logging=False, log_to_driver=True, include_dashboard=False,
                 runtime_env={"worker_process_setup_hook": "dfmvr.train.ray_setup.quiet_state_api_warnings"})
    scaling, n_workers, use_gpu = _scaling(cfg)

    experiment_id = tracking.setup_experiment(tracking_uri, cfg.tracking.experiment, work)
    earlier_run = ((resumed[1].get("extra") or {}).get("mlflow_run_id") if resumed else None)
    continuing = bool(earlier_run and tracking.run_exists(earlier_run, experiment_id))
    mlc = tracking.client(tracking_uri)
    if continuing:  # a resumed run goes on logging where it left off
        run_id = earlier_run
        tracking.reopen_run(mlc, run_id)
        # params cannot change in MLflow; the step budget may have
        tracking.set_tags(mlc, run_id, {"dfmvr.resumed_to_steps": cfg.train.steps})
    else:
        run_id = tracking.start_run(mlc, experiment_id, cfg.train.run_name)
        tracking.log_params(mlc, run_id, flatten(cfg))
    tracking.set_tags(mlc, run_id, {"dfmvr.ray_run_name": cfg.train.run_name, "dfmvr.num_workers": n_workers,
                                    "dfmvr.use_gpu": use_gpu, "dfmvr.data_url": data_url,
                                    "dfmvr.overrides": overrides_note})
    if not continuing:
        mlc.log_dict(run_id, tracking.redact_all(to_dict(cfg)), "config.json")
    if parse_summary is not None:  # the parse net whose masks the run reads, per class, on this data
        tracking.log_metrics(mlc, run_id, parse_net_metrics(parse_summary), 0)
    _logger.info("MLflow run %s in %s", run_id, tracking.redact(tracking_uri))

    trainer = build_trainer(cfg, tracking_uri=tracking_uri, run_id=run_id, storage_path=storage_path,
                            scaling=scaling, parse_net=parse_net, deadline=deadline)
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        result = trainer.fit()
        status = "FINISHED"
    finally:
        try:
            tracking.end_run(mlc, run_id, status)
        except Exception as exn:  # a tracking outage must not hide the run's result
            _logger.error("MLflow: could not close run %s (%s)", run_id, str(exn)[:300])
    elapsed = time.perf_counter() - t0

    best = best_checkpoint(result)
    report: dict[str, float] = {}
    if best is not None:
        try:
            from dfmvr.train.report import holdout_report

            with tempfile.TemporaryDirectory(prefix="dfmvr-report-") as tmp:
                report = holdout_report(cfg, best[0].to_directory(tmp), parse_net)
            tracking.log_metrics(mlc, run_id, {k: v for k, v in report.items() if v is not None},
                                 int(best[1].get("step", 0)))
        except Exception as exn:  # the run and its checkpoints stand without the report: say so
            _logger.error("the holdout report of the picked checkpoint failed: %s", exn)
    summary: dict[str, Any] = {
        "status": status,
        "steps": int(result.metrics.get("step", 0)) if result.metrics else 0,
        "time_budget_s": cfg.train.time_budget_s or None,
        "train_seconds": elapsed,
        "shards": data_url,
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "mlflow_ui": tracking.ui_command(tracking_uri),
        "mlflow_runs_page": tracking.runs_page(tracking_uri, experiment_id),
        "num_workers": n_workers,
        "use_gpu": use_gpu,
        # the largest share of validation triplets with a non-finite prediction in any validation
        "val_nonfinite_max": float((result.metrics or {}).get("val/nonfinite_max", 0.0)),
        "run_name": cfg.train.run_name,
        "resumed_from": resumed[0] if resumed else None,
        "parse_net": cfg.model.parse_net or None,
        "mask_loss": bool(parse_net is not None and cfg.loss.mask_loss),
    }
    summary["masks"] = cfg.model.input_masks
    if mask_cache is not None:
        summary["mask_cache"] = mask_cache["url"]
        summary["mask_cache_seconds"] = mask_cache.get("seconds", 0.0)
    if parse_summary is not None:
        summary["parse_net_arch"] = (parse_net.get("meta") or {}).get("arch", "bisenet")
        summary["parse_net_miou"] = parse_summary["miou"]
        ious = [v for v in (parse_summary.get("iou") or {}).values() if v is not None]
        summary["parse_net_min_class_iou"] = min(ious) if ious else None
        summary["parse_net_iou"] = parse_summary.get("iou")
        summary["parse_net_miou_photo"] = parse_summary.get("miou_photo")
        if "mlflow_run_id" in parse_summary:  # trained by this job
            summary["parse_net_mlflow_run_id"] = parse_summary["mlflow_run_id"]
            summary["parse_net_seconds"] = parse_summary["train_seconds"]
    if best is not None:
        ckpt, metrics = best
        summary["checkpoint"] = checkpoint_uri(ckpt.path, storage_path)
        summary["checkpoint_step"] = int(metrics.get("step", 0))
        # the headline: the picked checkpoint on validation triplets it was not picked on, with the
        # masks the model reads (the parse net's by default), in percent below the mean face's error
        summary.update(headline(metrics, report))
        val = {k: float(v) for k, v in metrics.items() if k.startswith("val/") and math.isfinite(float(v))}
        val.update({k: float(v) for k, v in report.items() if v is not None and math.isfinite(float(v))})
        try:
            with tempfile.TemporaryDirectory(prefix="dfmvr-best-") as tmp:
                from dfmvr.bundle import register_best

                reg = register_best(run_id, ckpt.to_directory(tmp), cfg.tracking.registered_model, val)
        except Exception as exn:  # the run's checkpoint is safe in storage: say how to register it later
            _logger.error("registering the model failed (MLflow %s): %s", tracking.redact(tracking_uri), exn)
            summary["registration_error"] = str(exn)[:500]
            summary["register_later"] = (
                "python -c \"from dfmvr.bundle import register_best; from dfmvr.train.checkpoint import "
                f"resolve_checkpoint; register_best('{run_id}', resolve_checkpoint('{summary['checkpoint']}'), "
                f"'{cfg.tracking.registered_model}', {val!r})\"")
        else:
            summary.update({"model_uri": reg["model_uri"], "registered_model_uri": reg["registered_uri"],
                            "champion": reg["champion"], "champion_uri": reg["champion_uri"],
                            "previous_champion": reg["previous_champion"]})
    summary["job_seconds"] = time.time() - started  # data and parse net included, as the budget counts
    return tracking.redact_all(summary)


def parse_net_metrics(parse_summary: dict) -> dict[str, float]:
    """``parse_net/miou``, ``parse_net/iou_<class>`` (and ``_photo``) of a parse-net summary, for MLflow."""
    out = {}
    for suffix in ("", "_photo"):
        if parse_summary.get(f"miou{suffix}") is not None:
            out[f"parse_net/miou{suffix}"] = parse_summary[f"miou{suffix}"]
        for name, value in (parse_summary.get(f"iou{suffix}") or {}).items():
            if value is not None:
                out[f"parse_net/iou{suffix}_{name}"] = value
    return out


def headline(picked: dict[str, float], report: dict[str, float]) -> dict[str, Any]:
    """The summary's figures from the picked checkpoint's validation (``picked``, the half it was
    picked on) and its holdout ``report`` (:func:`dfmvr.train.report.holdout_report`; empty when
    it failed, then the picked half's figures stand in and ``val_holdout`` says so)."""
    out: dict[str, Any] = {"val_pick_rmse_mm": picked.get(VAL_METRIC),
                           "val_pick_gain_pct": gain_pct(picked.get(VAL_METRIC), picked.get("val/mean_face_rmse_mm"))}
    if report.get("report/rmse_mm") is not None:
        out.update({"val_holdout": True, "val_samples": int(report["report/samples"]),
                    "val_rmse_mm": report["report/rmse_mm"], "mean_face_rmse_mm": report.get("report/mean_face_rmse_mm"),
                    "val_gain_pct": report.get("report/gain_pct")})
        for kind in ("given_masks", "parse_net_masks"):
            if report.get(f"report/gain_pct_{kind}") is not None:
                out[f"val_gain_pct_{kind}"] = report[f"report/gain_pct_{kind}"]
        return out
    mean_face = picked.get("val/mean_face_rmse_mm")
    out.update({"val_holdout": False, "val_rmse_mm": picked.get(VAL_METRIC), "mean_face_rmse_mm": mean_face,
                "val_gain_pct": out["val_pick_gain_pct"]})
    for kind, key in (("given_masks", GIVEN_MASKS_METRIC), ("parse_net_masks", PARSED_MASKS_METRIC)):
        if picked.get(key) is not None and math.isfinite(float(picked[key])):
            out[f"val_gain_pct_{kind}"] = gain_pct(picked[key], mean_face)
    return out


def prepare_mask_cache(cfg: Config, parse_net: dict | None) -> dict | None:
    """The parse net's masks of the training and validation shards, made once here (before Ray
    starts) when the pipeline uses them (``model.input_masks=parse_net``) and no current cache has
    them; the workers read them (:mod:`dfmvr.train.masks`). Returns what
    :func:`~dfmvr.train.masks.ensure_mask_cache` says, or None when the run uses the given masks."""
    if cfg.model.input_masks != "parse_net":
        return None
    if parse_net is None:
        raise PreflightError("model.input_masks is parse_net but there is no parse net (model.parse_net is empty and "
                             "train.parse_net_first is false): name one, or set model.input_masks=given")
    from dfmvr.train.masks import ensure_mask_cache

    _, info = ensure_mask_cache(cfg, parse_net, source=cfg.model.parse_net or "the job's parse net")
    return info


def resolve_parse_net(cfg: Config, resumed: tuple[str, dict] | None = None) -> tuple[Config, dict | None, dict | None]:
    """``(cfg, parse net checkpoint dict or None, parse-net job summary or None)``: the file
    ``model.parse_net`` names, else the one a resumed checkpoint bundles, else one trained now
    (``train.parse_net_first``; the returned config then names its file). Checked here, before
    Ray starts; the training job and every sweep (once, for all its trials) call it."""
    from dfmvr.nets import BUILTIN, parsenet_from_dict, read_parsenet_file

    summary = None
    if cfg.model.parse_net:
        bundle, source = read_parsenet_file(cfg.model.parse_net), cfg.model.parse_net
        if cfg.model.parse_net == BUILTIN:
            _check_builtin_fits(cfg, bundle)
    elif resumed is not None and resumed[1].get("parse_net") is not None:
        # a resume keeps training with the parse net its checkpoint bundles, not a new one
        bundle, source = resumed[1]["parse_net"], f"bundled in {resumed[0]}"
    elif needs_parse_net(cfg):
        from dfmvr.train.parsing import run_job

        _logger.info("no parse net given (model.parse_net): training one first (parsenet.steps=%d)",
                     cfg.parsenet.steps)
        summary = run_job(cfg)
        if summary["status"] != "FINISHED":
            raise RuntimeError(f"the parse net's training failed (MLflow run {summary['mlflow_run_id']})")
        cfg = apply_overrides(cfg, {"model.parse_net": summary["checkpoint"]})
        bundle, source = read_parsenet_file(cfg.model.parse_net), cfg.model.parse_net
    else:
        if cfg.loss.mask_loss:
            _logger.warning("loss.mask_loss is on but there is no parse net (model.parse_net empty, "
                            "train.parse_net_first=false): training without the mask loss")
        return cfg, None, None
    parsenet_from_dict(bundle, source)  # a bad parse net fails here, before Ray starts
    return cfg, bundle, summary


def _check_builtin_fits(cfg: Config, bundle: dict) -> None:
    """Warn when the builtin parse net (trained on synthetic renders at 64 px) meets other data."""
    from dfmvr.data.shards import read_manifest

    size = (bundle.get("meta") or {}).get("image_size")
    source = read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint or None).extra.get("source")
    if source != "synthetic" or size != cfg.data.image_size:
        _logger.warning("model.parse_net=builtin was trained on synthetic renders at %s px; these shards are %s at "
                        "%d px: train a parse net on them (model.parse_net= empty trains one first; or "
                        "jobs/train_parsenet.py, with parsenet.data_url for CelebAMask-HQ or LaPa)",
                        size, source or "not synthetic", cfg.data.image_size)


def resume_source(cfg: Config, storage_path: str) -> tuple[str, dict] | None:
    """``(checkpoint, its payload)`` this job continues, after checking it trains the same thing:
    ``train.resume_from``, else the newest checkpoint stored under ``train.run_name`` (Ray Train
    restores it); None for a new run.

    Raises:
        dfmvr.train.resume.ResumeMismatchError: the config differs in what it trains.
    """
    from dfmvr.train.checkpoint import load_checkpoint_uri

    source = cfg.train.resume_from or None
    if source is None:
        source = previous_checkpoint(storage_path, cfg.train.run_name)
        if source is None:
            return None
    payload = load_checkpoint_uri(source)
    check_resumable(payload["config"], cfg, f"run {cfg.train.run_name} from {source}")
    return source, payload


def needs_parse_net(cfg: Config) -> bool:
    """Whether the training job trains a parse net first (``train.parse_net_first``)."""
    return (cfg.train.parse_net_first and not cfg.model.parse_net
            and (cfg.model.mask_input or cfg.model.input_masks == "parse_net"
                 or (cfg.loss.mask_loss and cfg.loss.mask > 0)))


def best_checkpoint(result):
    """``(checkpoint, metrics)`` with the lowest finite validation RMSE, else the latest."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if math.isfinite(float(m.get(VAL_METRIC, math.inf)))]
    if candidates:
        return min(candidates, key=lambda cm: float(cm[1][VAL_METRIC]))
    if result.checkpoint is not None:
        return result.checkpoint, dict(result.metrics or {})
    return None


def checkpoint_uri(path: str, storage_path: str) -> str:
    """A checkpoint path as Ray reports it (``bucket/key`` on S3) -> the URI a user passes back
    (``s3://...`` on S3 storage) and ``resolve_checkpoint`` takes."""
    if storage_path.startswith("s3://") and not path.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path
