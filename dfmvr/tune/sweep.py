"""The sweep driver: checks, MLflow parent run, ``Tuner`` (or ``Tuner.restore``), results.

::

    cfg = apply_overrides(tiny(), {"tune.space.loss.photo": "loguniform(4,64)"})
    summary = run_sweep(cfg, get_sweep("loss-weights"))      # or resume=True

What a sweep leaves behind, under ``<work_dir>/sweeps/<tune.name>/``: ``sweep.json`` (its
config and MLflow parent run, for ``--resume``), ``results.jsonl`` (every result Tune saw),
``results.md``, ``results.png``, ``results.json``. Tune's experiment is in
``<tune storage>/<tune.name>``, the trials' Ray Train runs in ``<tune storage>/<tune.name>-trials``.

Every check that needs no cluster runs first (:func:`check_sweep`): unknown search-space keys,
unknown distributions and bad values fail before Ray or MLflow start, naming the key.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from dfmvr.config import Config, apply_overrides, flatten, from_dict, to_dict
from dfmvr.data import storage
from dfmvr.tracking import VAL_METRIC
from dfmvr.tune.presets import SweepPlan, get_sweep
from dfmvr.tune.space import Distribution, label, param_space, parse_space
from dfmvr.tune.trial import TRIAL_SLOT

_logger = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
JOURNAL_FILE = "results.jsonl"


class SweepError(RuntimeError):
    """A sweep cannot start or resume as asked (it exists already; nothing to resume; no resources)."""


def with_plan(cfg: Config, plan: SweepPlan, user_overrides: dict[str, Any]) -> Config:
    """``cfg`` with the preset's ``tune.*`` settings, then the user's overrides again on top (the
    user's ``tune.scheduler=asha`` beats the ablation preset's ``fifo``)."""
    cfg = apply_overrides(cfg, {f"tune.{k}": v for k, v in plan.tune.items()})
    return apply_overrides(cfg, user_overrides)


def check_sweep(cfg: Config, plan: SweepPlan) -> tuple[Config, dict[str, Distribution]]:
    """Every check that needs no cluster. Returns the config with the effective space (preset's
    entries, then the user's) in ``tune.space``, and the parsed space.

    Raises:
        KeyError: a search-space key (or a preset variant's key) that is not a config field.
        ValueError: an unknown distribution, a value a field refuses, an ASHA grace period before
            the first validation.
    """
    space = {**plan.space, **cfg.tune.space}
    dists = parse_space(cfg, space)
    cfg = apply_overrides(cfg, {"tune.space": space})
    for v in plan.variants:
        apply_overrides(cfg, v.overrides)  # a preset's typo fails here too
    if cfg.tune.scheduler == "asha":
        grace = cfg.tune.grace_period or cfg.train.val_every
        if grace < cfg.train.val_every:
            raise ValueError(f"tune.grace_period: expected >= train.val_every ({cfg.train.val_every}, the first "
                             f"validation: ASHA compares validation RMSE), got {cfg.tune.grace_period}")
        if grace >= cfg.train.steps:
            _logger.warning("tune.grace_period %d >= train.steps %d: ASHA will stop no trial", grace,
                            cfg.train.steps)
    return cfg, dists


def count_trials(cfg: Config, plan: SweepPlan, dists: dict[str, Distribution]) -> int:
    """Trials the sweep will run: variants x seeds x grid points x ``tune.num_samples``."""
    n = max(1, len(plan.variants)) * cfg.tune.seeds * cfg.tune.num_samples
    for d in dists.values():
        if d.kind == "grid":
            n *= len(d.values)
    return n


def sweep_dir(cfg: Config) -> Path:
    return Path(cfg.work_dir).resolve() / "sweeps" / cfg.tune.name


def _local_slots(cfg: Config) -> int:
    """Trials that can train at once on this machine: what a local Ray declares as ``trial_slot``s,
    so no more trial drivers start than there are workers' resources for."""
    t = cfg.tune
    slots = max(1, int((os.cpu_count() or 1) // (t.workers_per_trial * t.cpus_per_worker)))
    if t.gpus_per_worker > 0:
        import torch

        slots = min(slots, max(1, int(torch.cuda.device_count() // (t.workers_per_trial * t.gpus_per_worker))))
    if t.max_concurrent_trials:
        slots = min(slots, t.max_concurrent_trials)
    return slots


def _start_ray(cfg: Config) -> dict[str, float]:
    """Connect to the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it) or start a local Ray
    with ``trial_slot`` resources. Returns what each trial's driver reserves."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(configure_logging=False, log_to_driver=True)
        else:
            # a new local instance, never someone else's cluster found on the machine
            ray.init(address="local", resources={TRIAL_SLOT: _local_slots(cfg)}, configure_logging=False,
                     log_to_driver=True)
    resources = ray.cluster_resources()
    if resources.get(TRIAL_SLOT, 0) >= 1:
        return {TRIAL_SLOT: 1}
    if cfg.tune.driver_cpus <= 0:
        raise SweepError(f"tune.driver_cpus=0 needs a {TRIAL_SLOT!r} resource on the cluster (ray start "
                         f"--resources='{{\"{TRIAL_SLOT}\": 8}}'); the cluster has {sorted(resources)}")
    _logger.info("the cluster declares no %r resource: each trial's driver reserves %g CPU (tune.driver_cpus)",
                 TRIAL_SLOT, cfg.tune.driver_cpus)
    return {"CPU": cfg.tune.driver_cpus}


def _load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SweepError(f"--resume: no sweep to resume at {path.parent} (expected {path.name}); check work_dir "
                         "and tune.name")
    return json.loads(path.read_text())


def run_sweep(cfg: Config, plan: SweepPlan, *, resume: bool = False, note: str = "") -> dict[str, Any]:
    """Run (or, with ``resume``, continue) the sweep ``plan`` on ``cfg``; returns the summary.

    On resume the sweep's saved config and preset are used (``cfg`` only locates the sweep:
    ``work_dir``, ``tune.name``); finished and failed trials are kept, unfinished ones continue
    from their latest checkpoint.

    Raises:
        KeyError / ValueError: from :func:`check_sweep`, before anything starts.
        SweepError: the sweep exists and ``resume`` is False, or there is nothing to resume.
        dfmvr.train.launch.PreflightError: unreachable S3 or MLflow, missing shards.
    """
    from ray import tune

    from dfmvr import tracking
    from dfmvr.train.launch import prepare_mask_cache, preflight, resolve_parse_net
    from dfmvr.tune import runs
    from dfmvr.tune.callback import SweepCallback
    from dfmvr.tune.journal import ResumableASHA
    from dfmvr.tune.trial import SweepContext, run_trial

    folder = sweep_dir(cfg)
    state_path = folder / STATE_FILE
    if resume:
        state = _load_state(state_path)
        if cfg.tune.name != state["config"]["tune"]["name"]:
            raise SweepError(f"--resume: {state_path} holds sweep {state['config']['tune']['name']!r}, "
                             f"not {cfg.tune.name!r}")
        cfg = from_dict(Config, state["config"])
        plan = get_sweep(state["preset"])
        note = state.get("note", note)
        _logger.info("resuming sweep %s (preset %s) from %s", cfg.tune.name, plan.preset or "none", folder)
    elif state_path.exists():
        raise SweepError(f"sweep {cfg.tune.name!r} exists at {folder}: pass --resume to continue it, or choose "
                         "another tune.name")
    cfg, dists = check_sweep(cfg, plan)
    cfg, tracking_uri = preflight(cfg)
    # the paper's pipeline in every trial: one parse net for the whole sweep (model.parse_net, else
    # trained now once; the saved config names it, so --resume keeps it), frozen, shipped to the trials
    cfg, parse_net, _ = resolve_parse_net(cfg)
    # its masks of the shards, once for every trial (trials that read the given masks skip them)
    prepare_mask_cache(cfg, parse_net)
    folder = sweep_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.tune
    tune_storage = tcfg.storage_path or str(Path(cfg.work_dir) / "tune_results")
    experiment_path = storage.join(tune_storage, tcfg.name)
    train_storage = storage.join(tune_storage, f"{tcfg.name}-trials")
    n_trials = count_trials(cfg, plan, dists)

    driver_resources = _start_ray(cfg)
    experiment_id = tracking.setup_experiment(tracking_uri, cfg.tracking.experiment, cfg.work_dir)
    client = tracking.client(tracking_uri)
    if resume:
        parent_run_id = state["parent_run_id"]
        tracking.reopen_run(client, parent_run_id)
    else:
        parent_run_id = runs.start_parent(
            client, experiment_id, tcfg.name, flatten(cfg),
            tags={"dfmvr.sweep_preset": plan.preset or "none", "dfmvr.overrides": note,
                  "dfmvr.tune_experiment": experiment_path, "dfmvr.trials": str(n_trials)})
        state_path.write_text(json.dumps({"config": to_dict(cfg), "preset": plan.preset, "parent_run_id": parent_run_id,
                                          "note": note, "tune_experiment": experiment_path}, indent=1))
    _logger.info("sweep %s: %d trials, MLflow parent run %s in %s, Tune experiment %s", tcfg.name, n_trials,
                 parent_run_id, tracking.redact(tracking_uri), experiment_path)

    angle_sets: dict[str, str] = {}
    if plan.angles:
        from dfmvr.tune.angles import make_angle_sets

        angle_sets = make_angle_sets(cfg, storage.join(tune_storage, f"{tcfg.name}-angles"))

    variants = {v.name: v.overrides for v in plan.variants}
    ctx = SweepContext(base=to_dict(cfg), tracking_uri=tracking_uri, experiment_id=experiment_id,
                       parent_run_id=parent_run_id, train_storage=train_storage, variants=variants,
                       descriptions={v.name: v.description for v in plan.variants},
                       space_labels={k: d.describe() for k, d in dists.items()}, angle_sets=angle_sets,
                       parse_net=parse_net)
    seeds = [cfg.seed + i for i in range(tcfg.seeds)]
    space = {
        "variant": tune.grid_search(list(variants)) if variants else "",
        "seed": tune.grid_search(seeds) if len(seeds) > 1 else seeds[0],
        "space": param_space(dists),
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), driver_resources)
    journal = str(folder / JOURNAL_FILE)
    t0 = time.perf_counter()
    if resume and tune.Tuner.can_restore(experiment_path):
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, param_space=space,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
    else:
        if resume:
            _logger.info("Tune saved no state for %s before the interruption: starting its trials", tcfg.name)
        scheduler = None
        if tcfg.scheduler == "asha":
            scheduler = ResumableASHA(journal=journal, time_attr="step", max_t=cfg.train.steps,
                                      grace_period=tcfg.grace_period or cfg.train.val_every,
                                      reduction_factor=tcfg.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=VAL_METRIC, mode="min", scheduler=scheduler,
                                        num_samples=tcfg.num_samples,
                                        max_concurrent_trials=tcfg.max_concurrent_trials or None,
                                        reuse_actors=False),
            run_config=tune.RunConfig(
                name=tcfg.name, storage_path=tune_storage,
                failure_config=tune.FailureConfig(max_failures=tcfg.max_failures),
                callbacks=[SweepCallback(journal_path=journal, tracking_uri=tracking_uri, experiment_id=experiment_id,
                                         parent_run_id=parent_run_id, train_storage=train_storage,
                                         total_steps=cfg.train.steps)],
            ),
        )
    try:
        grid = tuner.fit()  # a first Ctrl-C makes Tune save its state and return: see _finish
    except BaseException as e:
        # only a killed driver leaves the parent RUNNING; --resume sets it RUNNING again
        tracking.end_run(client, parent_run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    seconds = time.perf_counter() - t0
    return _finish(cfg, plan, grid, ctx=ctx, dists=dists, folder=folder, client=client, seconds=seconds,
                   experiment_path=experiment_path)


def _finish(cfg: Config, plan: SweepPlan, grid, *, ctx, dists, folder: Path, client, seconds: float,
            experiment_path: str) -> dict[str, Any]:
    """Close leftover child runs, build the table and chart, log them to the parent run."""
    from dfmvr import tracking
    from dfmvr.tune import results, runs
    from dfmvr.tune.angles import angle_label
    from dfmvr.tune.callback import SweepCallback
    from dfmvr.tune.journal import ResultJournal
    from dfmvr.tune.trial import trial_name

    parent = ctx.parent_run_id
    child_runs = {r.data.tags.get(runs.TAG_TRIAL_ID): r for r in runs.children(client, ctx.experiment_id, parent)}
    names, labels = {}, {}
    for result in grid:
        trial_id = results.result_trial_id(result)
        params = result.config or {}
        names[trial_id] = trial_name(params, trial_id)
        labels[trial_id] = label(params.get("space") or {}, dists)
    journal = ResultJournal(folder / JOURNAL_FILE).read()
    records = results.trial_records(
        grid, journal, total_steps=cfg.train.steps, names=names, descriptions=ctx.descriptions, labels=labels,
        run_ids={k: r.info.run_id for k, r in child_runs.items() if k})
    # a trial the driver was not there to see end (killed driver, then restore) is closed now
    closer = SweepCallback(journal_path=str(folder / JOURNAL_FILE), tracking_uri=ctx.tracking_uri,
                           experiment_id=ctx.experiment_id, parent_run_id=parent, train_storage=ctx.train_storage,
                           total_steps=cfg.train.steps)
    for rec in records:
        run = child_runs.get(rec.trial_id)
        if run is not None and run.info.status == "RUNNING":
            closer.close(rec.trial_id, rec.status, error=rec.error)

    references = {v.name: v.reference_rmse_mm for v in plan.variants if v.reference_rmse_mm is not None}
    angles = [angle_label(a) for a in cfg.tune.angles] if plan.angles else None
    rows = results.summarise(records, references=references, order=[v.name for v in plan.variants], angles=angles)
    title = f"{cfg.tune.name}: {plan.preset or 'search'} ({len(records)} trials)"
    paths = results.write(folder, rows, records, title=title, reference_name=plan.reference)
    for p in paths.values():
        client.log_artifact(parent, str(p))
    counts = {s: sum(r.status == s for r in records) for s in ("finished", "stopped", "failed", "interrupted")}
    interrupted = counts["interrupted"] > 0
    ranked = sorted((r for r in records if r.val_rmse_mm is not None and r.status != "failed"),
                    key=lambda r: r.val_rmse_mm)
    best = ranked[0] if ranked else None
    parent_metrics = {f"trials/{k}": float(v) for k, v in counts.items()}
    if best is not None:
        parent_metrics["best/val_rmse_mm"] = best.val_rmse_mm
    for row in rows:
        if row.mean is not None:
            key = row.trial[:40]
            parent_metrics[f"rows/{key}/val_rmse_mm"] = row.mean
    tracking.log_metrics(client, parent, {k.replace(" ", "_").replace(",", ""): v for k, v in parent_metrics.items()})
    tracking.end_run(client, parent, "KILLED" if interrupted else "FINISHED")
    summary: dict[str, Any] = {
        "status": "INTERRUPTED" if interrupted else "FINISHED",
        "sweep": cfg.tune.name,
        "preset": plan.preset or "none",
        "trials": len(records),
        **counts,
        "sweep_seconds": seconds,
        "table": str(paths["table"]),
        "plot": str(paths["plot"]),
        "results_json": str(paths["json"]),
        "tune_experiment": experiment_path,
        "mlflow_tracking_uri": tracking.redact(ctx.tracking_uri),
        "mlflow_parent_run_id": parent,
        "mlflow_ui": tracking.ui_command(ctx.tracking_uri),
        "mlflow_runs_page": tracking.runs_page(ctx.tracking_uri, ctx.experiment_id),
        # the frozen parse net every trial's mask loss ran through (None: no mask loss in any trial)
        "parse_net": cfg.model.parse_net if ctx.parse_net is not None else None,
    }
    if best is not None:
        summary.update({"best_trial": best.name, "best_val_rmse_mm": best.val_rmse_mm,
                        "best_checkpoint": f"runs:/{best.run_id}/checkpoint" if best.run_id else ""})
    if interrupted:
        _logger.warning("sweep %s interrupted with %d trials unfinished; continue it with: python jobs/tune.py "
                        "--resume tune.name=%s work_dir=%s", cfg.tune.name, counts["interrupted"], cfg.tune.name,
                        cfg.work_dir)
    _logger.info("sweep %s done: %s", cfg.tune.name, counts)
    return summary
