"""What runs in each Ray Tune trial: the training job's own ``TorchTrainer``, reporting to Tune.

Ray 2.60 cannot tune a ``TorchTrainer`` directly (``Tuner(TorchTrainer(...))`` raises
``TuneError``), so each trial is a small driver function, :func:`run_trial`: it builds the
trial's config (sweep base + variant + the trial's point in the space + its seed), opens the
trial's MLflow child run, and fits :func:`dfmvr.train.launch.build_trainer` with
``TuneReportCallback``, which forwards every ``ray.train.report`` of rank 0 (step, validation
RMSE, checkpoint path) to Tune; ASHA decides on those. The Ray Train run is named after the
Tune trial id (stable across ``Tuner.restore``), so a trial resumed after an interruption
continues from its latest checkpoint instead of starting again.
"""

from __future__ import annotations

import logging
import math
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any

from dfmvr.config import Config, apply_overrides, flatten, from_dict

_logger = logging.getLogger(__name__)

TRIAL_SLOT = "trial_slot"
"""Custom Ray resource a trial's driver holds instead of a CPU (declared by the local Ray the sweep
starts, or by ``ray start --resources='{"trial_slot": N}'``)."""


@dataclass(kw_only=True, slots=True)
class SweepContext:
    """What every trial of a sweep shares (handed over once, through ``tune.with_parameters``)."""

    base: dict
    """``to_dict`` of the sweep's config (work dir, shards and storage resolved)."""
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    train_storage: str
    """Ray Train storage for every trial's run (``<tune storage>/<sweep>-trials``)."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Variant name -> config overrides."""
    descriptions: dict[str, str] = field(default_factory=dict)
    """Variant name -> what differs."""
    space_labels: dict[str, str] = field(default_factory=dict)
    """Searched key -> distribution text (MLflow tags)."""
    angle_sets: dict[str, str] = field(default_factory=dict)
    """``angles`` preset: label -> test-set shard root; evaluated after training."""
    parse_net: dict | None = None
    """The frozen parse net's checkpoint dict every trial trains with (mask loss), or None."""


def trial_name(params: dict, trial_id: str) -> str:
    """``v3-seed1`` for a named variant, else ``trial-<n>`` from Tune's trial id."""
    seed = params.get("seed", 0)
    if params.get("variant"):
        return f"{params['variant']}-seed{seed}"
    return f"trial-{trial_id.rsplit('_', 1)[-1]}"


def trial_config(ctx: SweepContext, params: dict, trial_id: str) -> Config:
    """The trial's config: sweep base, then the variant's overrides, the sampled space values, the
    seed, and what the sweep fixes (run name, storage, resources)."""
    base = from_dict(Config, ctx.base)
    t = base.tune
    overrides: dict[str, Any] = {}
    if params.get("variant"):
        overrides.update(ctx.variants[params["variant"]])
    overrides.update(params.get("space") or {})
    overrides.update({
        "seed": int(params.get("seed", base.seed)),
        "train.run_name": f"{t.name}-{trial_id}",
        "train.storage_path": ctx.train_storage,
        "train.num_workers": t.workers_per_trial,
        "train.cpus_per_worker": t.cpus_per_worker,
        "train.use_gpu": "true" if t.gpus_per_worker > 0 else "false",
    })
    return apply_overrides(base, overrides)


def trial_scaling(cfg: Config):
    """Ray Train scaling of one trial: ``tune.workers_per_trial`` workers with ``tune.cpus_per_worker``
    CPUs and ``tune.gpus_per_worker`` (possibly fractional) GPUs each."""
    from ray.train import ScalingConfig

    t = cfg.tune
    resources: dict[str, float] = {"CPU": t.cpus_per_worker}
    if t.gpus_per_worker > 0:
        resources["GPU"] = t.gpus_per_worker
    return ScalingConfig(num_workers=t.workers_per_trial, use_gpu=t.gpus_per_worker > 0,
                         resources_per_worker=resources)


def run_trial(params: dict, ctx: SweepContext) -> None:
    """The Tune trainable (wrapped with ``tune.with_parameters(run_trial, ctx=...)``).

    ``params``: ``{"variant": name or "", "seed": int, "space": {dotted key: value}}``, Tune's
    resolved point for this trial.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from dfmvr.train.launch import best_checkpoint, build_trainer, checkpoint_uri
    from dfmvr.tracking import VAL_METRIC
    from dfmvr import tracking
    from dfmvr.tune import runs
    from dfmvr.tune.callback import CHECKPOINT_PATH_KEY

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx, params, trial_id)
    client = tracking.client(ctx.tracking_uri)
    variant = params.get("variant") or ""
    tags = {runs.TAG_SWEEP: cfg.tune.name, runs.TAG_SEED: str(cfg.seed), runs.TAG_VARIANT: variant}
    if variant:
        tags["dfmvr.variant_description"] = ctx.descriptions.get(variant, "")
    for key, value in (params.get("space") or {}).items():
        tags[f"dfmvr.space.{key}"] = str(value)
    run_id = runs.open_child(client, ctx.experiment_id, ctx.parent_run_id, trial_id=trial_id,
                             name=trial_name(params, trial_id), params=flatten(cfg), tags=tags)
    _logger.info("trial %s (%s): MLflow child run %s, Ray Train run %s", trial_id, trial_name(params, trial_id),
                 run_id, cfg.train.run_name)
    trainer = build_trainer(cfg, tracking_uri=ctx.tracking_uri, run_id=run_id, storage_path=ctx.train_storage,
                            scaling=trial_scaling(cfg), callbacks=[TuneReportCallback()], parse_net=ctx.parse_net)
    try:
        result = trainer.fit()
        best = best_checkpoint(result)
        final: dict[str, Any] = {"step": float((result.metrics or {}).get("step", 0))}
        if best is not None:
            ckpt, metrics = best
            final.update({VAL_METRIC: float(metrics.get(VAL_METRIC, math.inf)), CHECKPOINT_PATH_KEY: ckpt.path})
        if ctx.angle_sets:
            if best is None:
                raise RuntimeError(f"trial {trial_id}: training reported no checkpoint to evaluate on the angle sets")
            from dfmvr.train.checkpoint import resolve_checkpoint
            from dfmvr.tune.angles import evaluate_angles

            with tempfile.TemporaryDirectory(prefix="dfmvr-angles-") as tmp:
                local = resolve_checkpoint(checkpoint_uri(ckpt.path, ctx.train_storage), cache_dir=tmp)
                angle_metrics = evaluate_angles(str(local), cfg, ctx.angle_sets)
            tracking.log_metrics(client, run_id, angle_metrics, step=int(metrics.get("step", 0)))
            final.update(angle_metrics)
        # A closing report: the last step and the best checkpoint (with the angle metrics). It
        # repeats what Tune has seen, except when this attempt resumed a Ray Train run that had
        # already trained to its end before an interruption (nothing new to report then, and the
        # old reports may never have reached the sweep driver): without it, that trial would look
        # unfinished.
        tune.report(final)
    except Exception as e:
        # Here the whole traceback is at hand: record it, and leave the run's status to the sweep
        # driver, which knows whether the trial failed or Tune stopped it (stopping a trial can
        # raise here too, and a "failed" written now would race with the driver's "stopped").
        runs.record_error(client, run_id, f"{runs.short_error(e)}\n\n{traceback.format_exc()}")
        raise
