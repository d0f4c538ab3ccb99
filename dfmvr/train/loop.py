"""The training loop, in plain PyTorch: usable with or without Ray.

``run_loop(cfg, session)`` trains the model ``cfg`` describes. A *session* supplies what the
environment owns: rank, world size, device, the checkpoint to restore, and ``report(metrics,
checkpoint_dir)`` (Ray Train's, or :class:`LocalSession` for a plain single-process run).
Every rank calls ``report`` the same number of times (Ray's contract); only rank 0 writes
checkpoints and logs to MLflow.

Checkpoints hold model, optimizer, scheduler, step, config and counters; the data position is
the step: the resampled stream is re-seeded from it on restore, so a resumed run continues
with fresh batches instead of replaying the same ones.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container, Iterator

import torch
import torch.distributed as dist

from dfmvr.config import Config, to_dict
from dfmvr.facemodel import build_face_model
from dfmvr.losses import picture_step
from dfmvr.model import (
    DFMVR,
    build_model,
    autocast_dtype,
    check_face_signature,
    frozen_parse_net as frozen_parse_net_of,
    network_masks,
    parsed_masks,
    reads_parse_net_masks,
    uses_parse_net_masks,
)
from dfmvr.tracking import GIVEN_MASKS_METRIC, PARSED_MASKS_METRIC, VAL_METRIC, redact_all
from dfmvr.train.checkpoint import load_checkpoint, save_checkpoint, state_digest
from dfmvr.train.metrics import aligned_vertex_rmse_mm
from dfmvr.train.objective import reconstruction_losses
from dfmvr.train.schedule import RowRates, StepBudget, StepPlan, build_optimizer, pose_row_rates
from dfmvr.train.weights import WeightAverage, restore_norm_stats, snapshot_norm_stats

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last good state was checkpointed."""


@dataclass
class LocalSession:
    """A single-process session: checkpoints go to ``directory/step-XXXXXXX``."""

    directory: Path
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    restore_from: str | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []

    def checkpoint_to_restore(self) -> str | None:
        return self.restore_from

    def restored(self) -> None:
        """The checkpoint is loaded (a session that downloaded it removes its copy here)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None:
            dst = self.directory / f"step-{int(metrics['step']):07d}"
            dst.mkdir(parents=True, exist_ok=True)
            for f in Path(checkpoint_dir).iterdir():
                (dst / f.name).write_bytes(f.read_bytes())
            self.checkpoints.append(dst)


def unwrap(model: torch.nn.Module) -> DFMVR:
    """The DF-MVR module inside a DDP wrapper (or the module itself)."""
    return getattr(model, "module", model)


def _broadcast(obj: Any, world_size: int) -> Any:
    if world_size == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce_sum(value: float, world_size: int, device: torch.device) -> float:
    if world_size == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


@torch.no_grad()
def validate(model: DFMVR, batches, cfg: Config, parse_net=None, *, max_samples: int | None = None,
             step: int = 0, subjects: Container[str] | None = None,
             other_masks: bool = True) -> tuple[dict[str, float], dict | None]:
    """Validation losses and, where ground truth exists, aligned vertex RMSE in mm beside the
    mean face's on the same samples.

    The network reads the batches' ``masks`` (the parse net's, from the mask cache, for a model
    that reads them). Where there is another kind of mask to read, the RMSE is also taken with it
    on the same triplets: the samples' own masks for a parse-net model
    (:data:`~dfmvr.tracking.GIVEN_MASKS_METRIC`, the upper bound), the parse net's for a model
    that reads the given masks (:data:`~dfmvr.tracking.PARSED_MASKS_METRIC`, what photos get).

    Args:
        subjects: score only these subjects' triplets (one half of the validation split, so that
            the checkpoint is picked on other triplets than the ones it is reported on); None: all.
            A loader that reads only theirs (``make_loader(subjects=...)``) is cheaper.
        max_samples: stop after this many scored triplets.
        other_masks: also score the other kind of masks (one more forward pass per batch).

    Returns:
        ``(metrics, first_batch_view)``: metric dict (``val/...``) and what the image grid needs
        from the first batch (inputs, renders, landmarks), or None when there was no batch.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    n_batches = n_samples = 0
    rmse, mean_rmse, other_rmse = [], [], []
    first = None
    fm = model.face.model
    device = next(model.parameters()).device
    reads_parsed = reads_parse_net_masks(model.cfg)
    # a model that reads the given masks also meets views without any (photos), where the parse
    # net makes them; a model that reads the parse net's is also scored on the exact masks
    other_metric = GIVEN_MASKS_METRIC if reads_parsed else PARSED_MASKS_METRIC
    try:
        for batch in batches:
            if max_samples is not None and n_samples >= max_samples:
                break
            if subjects is not None:
                keep = [i for i, s in enumerate(batch.subjects) if s in subjects]
                if max_samples is not None:
                    keep = keep[:max_samples - n_samples]
                if not keep:
                    continue
                batch = batch.select(keep) if len(keep) < len(batch) else batch
            batch = batch.to(device)
            out = model(batch.images, network_masks(model, batch))
            _, terms = reconstruction_losses(model, out, batch, cfg.loss, step, parse_net, lazy=False)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_batches += 1
            n_samples += batch.images.shape[0]
            # a non-finite prediction would break the SVD of the alignment: count it, leave it out
            finite = torch.isfinite(out.shape).flatten(1).all(1)
            sums["nonfinite_predictions"] = sums.get("nonfinite_predictions", 0.0) + float((~finite).sum())
            same_topology = [i for i, v in enumerate(batch.gt_vertices or [])
                             if v.shape[0] == fm.n_vertices and bool(finite[i])]
            if same_topology:
                gt = torch.stack([batch.gt_vertices[i] for i in same_topology])
                rmse.append(aligned_vertex_rmse_mm(out.shape[same_topology], gt))
                mean_rmse.append(aligned_vertex_rmse_mm(fm.mean_shape.unsqueeze(0).expand_as(gt), gt))
                other = _other_masks(model, batch, parse_net, reads_parsed) if other_masks else None
                if other is not None:
                    shape = model(batch.images, other, render=False).shape
                    scored = [i for i in same_topology if bool(torch.isfinite(shape[i]).all())]
                    if scored:
                        other_rmse.append(aligned_vertex_rmse_mm(
                            shape[scored], torch.stack([batch.gt_vertices[i] for i in scored])))
            if first is None:
                first = {"images": batch.images[:4].cpu(), "render": out.image[:4].cpu(),
                         "render_mask": out.render_mask[:4].cpu(), "lm_pred": out.lm2d[:4].cpu(),
                         "lm_true": batch.lmk2d[:4].cpu()}
    finally:
        model.train(was_training)
    metrics = {f"val/loss_{k}" if k != "total" else "val/loss": v / max(1, n_batches) for k, v in sums.items()}
    metrics["val/samples"] = float(n_samples)
    if rmse:
        metrics[VAL_METRIC] = float(torch.cat(rmse).mean())
        metrics["val/mean_face_rmse_mm"] = float(torch.cat(mean_rmse).mean())
    if other_rmse:
        metrics[other_metric] = float(torch.cat(other_rmse).mean())
    return metrics, first


def _other_masks(model: DFMVR, batch, parse_net, reads_parsed: bool) -> torch.Tensor | None:
    """The masks validation also scores the model with (see :func:`validate`), or None."""
    if not model.cfg.mask_input:
        return None
    if reads_parsed:
        given, has = ((batch.masks, batch.has_masks) if batch.mask_source == "given"
                      else (batch.given_masks, batch.has_given_masks))
        return given if given is not None and bool(has.all()) else None
    return parsed_masks(parse_net, batch.images) if parse_net is not None else None


def _train_loader(cfg: Config, rank: int, world_size: int, seed: int, mask_cache=None):
    from dfmvr.data.loader import make_loader

    return make_loader(cfg.data, cfg.data.split, rank=rank, world_size=world_size, resampled=True, seed=seed,
                       mask_cache=mask_cache)


def _val_batches(cfg: Config, mask_cache=None, subjects=None, *, keep_given_masks: bool = False
                 ) -> Callable[[], Iterator]:
    """A new pass over the validation split at each call (``subjects``: only theirs)."""
    from dfmvr.data.loader import make_loader

    def it():
        loader = make_loader(cfg.data, cfg.data.val_split, rank=0, world_size=1, resampled=False,
                             seed=0, with_gt=True, shuffle=False, mask_cache=mask_cache,
                             keep_given_masks=keep_given_masks, subjects=subjects)
        return iter(loader)

    return it


def validation_halves(cfg: Config) -> tuple[frozenset[str] | None, frozenset[str] | None]:
    """``(pick, report)`` subjects of the validation split: training validates (and so picks its
    checkpoint) on every other subject in sorted order, the job reports the picked checkpoint on
    the rest (``train.holdout_report``), so the headline is not inflated by the selection.
    ``(None, None)`` when the option is off: both on the whole split."""
    if not cfg.train.holdout_report:
        return None, None
    from dfmvr.data.shards import read_manifest

    subjects = sorted(read_manifest(cfg.data.url, endpoint=cfg.data.s3_endpoint or None)
                      .split(cfg.data.val_split).subjects)
    return frozenset(subjects[0::2]), frozenset(subjects[1::2])


def run_loop(cfg: Config, session, *, tracker=None, parse_net: dict | None = None, prepare_model=None,
             on_step: Callable[[int], None] | None = None,
             on_resume: Callable[[dict], None] | None = None, deadline: float | None = None) -> dict[str, float]:
    """Train ``cfg`` in ``session``; returns the last metrics.

    Args:
        cfg: the whole config.
        session: :class:`LocalSession` or the Ray session adapter (``dfmvr.train.ray_worker``).
        tracker: rank 0's :class:`dfmvr.train.ray_worker.RunLogger` (MLflow), or None.
        parse_net: the parse net's checkpoint dict (:func:`dfmvr.nets.read_parsenet_file`), or None:
            frozen for the mask loss, and embedded in every checkpoint so the model makes its own
            masks at inference.
        prepare_model: wraps the model for DDP (Ray's ``prepare_model``); identity when None.
        on_step: called after every completed step with its number (the step journal).
        on_resume: called once after a restore with ``{"checkpoint", "step", "model", "optimizer"}``,
            the last two the :func:`dfmvr.train.checkpoint.state_digest` of the weights and the
            optimizer state this rank now holds (the resume record).
        deadline: ``time.time()`` by which the training steps end (``train.time_budget_s`` from the
            job's start; the driver passes the same to every rank and to restarted workers), or
            None: train ``train.steps``. Rank 0 fits the run's length to it and broadcasts the plan.

    Raises:
        NonFiniteLossError: after ``train.max_nan_steps`` non-finite losses in a row (the last
            good state is checkpointed first).
    """
    trainer = _Trainer.set_up(cfg, session, tracker=tracker, parse_net=parse_net, prepare_model=prepare_model,
                              on_step=on_step, deadline=deadline)
    trainer.restore(on_resume)
    # the data comes after the restore: the training stream is seeded from the restored step
    trainer.open_data()
    return trainer.train()


@dataclass(kw_only=True, slots=True)
class _Trainer:
    """One rank's run of :func:`run_loop`: what it trains with, where it stands, and its steps."""

    cfg: Config
    session: Any
    tracker: Any
    parse_net: dict | None
    on_step: Callable[[int], None] | None
    deadline: float | None
    face_model: Any
    model: torch.nn.Module
    """What takes the steps: the DDP wrapper around ``core``, or ``core`` itself."""
    core: DFMVR
    plan: StepPlan
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    row_rates: RowRates
    frozen_parse_net: Any
    mask_cache: Any
    average: WeightAverage | None
    # the data (:meth:`open_data`)
    budget: StepBudget | None = None
    loader: Any = None
    batches: Iterator | None = None
    val_batches: Callable[[], Iterator] | None = None
    mask_source: str = "given"
    config_dict: dict = field(default_factory=dict)
    # where the run stands
    step: int = 0
    counters: dict[str, float] = field(default_factory=lambda: {"skipped_samples": 0.0, "nan_steps": 0.0})
    nan_streak: int = 0
    last_val: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    window: dict[str, list[float]] = field(default_factory=dict)
    """term -> [sum, steps that computed it] (lazy terms skip steps)."""
    t_last: float = 0.0
    samples_since: int = 0
    grad_norm: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """This rank's number."""
        return self.session.rank

    @property
    def world(self) -> int:
        """How many ranks train."""
        return self.session.world_size

    @property
    def device(self) -> torch.device:
        """This rank's device."""
        return self.session.device

    @classmethod
    def set_up(cls, cfg: Config, session, *, tracker, parse_net: dict | None, prepare_model,
               on_step: Callable[[int], None] | None, deadline: float | None) -> _Trainer:
        """The model (wrapped for DDP), optimizer, schedule, parse net, mask cache and weight average."""
        device = session.device
        torch.manual_seed(cfg.seed + session.rank)
        face_model = build_face_model(cfg.facemodel)
        core = build_model(cfg, device=device, face_model=face_model)
        core.amp_dtype = autocast_dtype(device, amp=cfg.train.amp, cpu_amp=cfg.train.cpu_amp)
        model = prepare_model(core) if prepare_model else core
        core = unwrap(model)
        plan = StepPlan(cfg.train.steps, cfg.optim.cosine_after)
        opt, sched = build_optimizer(model.parameters(), cfg.optim, plan)
        row_rates = pose_row_rates(core, cfg.optim)
        frozen_parse_net, mask_cache = _parse_net_parts(cfg, parse_net, device)
        if reads_parse_net_masks(cfg.model):
            core.set_input_parse_net(frozen_parse_net)
        # the weight average lives on every rank (DDP keeps the live weights identical), so any rank
        # could serve it; only rank 0 validates and saves it
        average = WeightAverage(core, cfg.optim) if cfg.optim.ema_decay else None
        return cls(cfg=cfg, session=session, tracker=tracker, parse_net=parse_net, on_step=on_step,
                   deadline=deadline, face_model=face_model, model=model, core=core, plan=plan, opt=opt,
                   sched=sched, row_rates=row_rates, frozen_parse_net=frozen_parse_net, mask_cache=mask_cache,
                   average=average)

    def restore(self, on_resume: Callable[[dict], None] | None) -> None:
        """Load the session's checkpoint, if any: weights, average, optimizer, schedule, step, plan, counters."""
        restore = self.session.checkpoint_to_restore()
        if not restore:
            return
        try:
            payload = load_checkpoint(restore, map_location=self.device)
        finally:
            self.session.restored()
        check_face_signature(payload, self.face_model.signature(), str(restore))
        self.core.load_state_dict(payload.get("model_live", payload["model"]))
        if self.average:
            self.average.load_state_dict(payload["model"])
        if payload.get("optimizer"):
            self.opt.load_state_dict(payload["optimizer"])
        if payload.get("scheduler"):
            self.sched.load_state_dict(payload["scheduler"])
        self.step = int(payload["step"])
        extra = payload.get("extra", {})
        saved_plan = extra.get("plan")
        if self.deadline is not None and saved_plan and saved_plan.get("deadline") == self.deadline:
            # a worker group restarted within the job goes on with the plan it had fitted; a resume
            # by a later job starts from its own train.steps and fits them to its own budget
            self.plan.steps, self.plan.cosine_after = int(saved_plan["steps"]), int(saved_plan["cosine_after"])
        self.counters.update({k: float(v) for k, v in extra.get("counters", {}).items()})
        _logger.info("rank %d: resumed from %s at step %d", self.rank, restore, self.step)
        if on_resume:
            on_resume({"checkpoint": str(restore), "step": self.step, "model": state_digest(self.core.state_dict()),
                       "optimizer": state_digest(self.opt.state_dict())})

    def open_data(self) -> None:
        """The time budget, the training stream (seeded from the step) and the validation passes."""
        cfg = self.cfg
        self.budget = (StepBudget(self.plan, deadline=self.deadline, max_steps=cfg.train.steps,
                                  cosine_after=cfg.optim.cosine_after) if self.deadline is not None else None)
        self.loader = _train_loader(cfg, self.rank, self.world, seed=cfg.seed * 1000003 + self.step,
                                    mask_cache=self.mask_cache)
        pick_subjects, _ = validation_halves(cfg) if self.rank == 0 else (None, None)
        # the checkpoint's validations read one half of the subjects, and score only what the model
        # reads: the other masks' figure is the holdout report's (dfmvr.train.report)
        self.val_batches = _val_batches(cfg, self.mask_cache, pick_subjects)
        self.mask_source = self.mask_cache.source if self.mask_cache is not None else "given"
        self.batches = iter(self.loader)
        self.config_dict = redact_all(to_dict(cfg))  # checkpoints are copied around: no credentials in them
        self.t_last, self.samples_since = time.perf_counter(), 0

    def train(self) -> dict[str, float]:
        """Steps until the plan's end (skipped steps do not count); the last metrics."""
        self.model.train()
        while self.step < self.plan.steps:
            batch = self.next_batch()
            if self.train_step(batch):
                self.after_step(batch)
        return {"step": float(self.step), **self.metrics, **self.last_val}

    def next_batch(self):
        """The next training batch, on the device (the stream starts again when it ends)."""
        while True:
            try:
                batch = next(self.batches)
                break
            except StopIteration:
                self.batches = iter(self.loader)
        self.counters["skipped_samples"] += float(getattr(batch, "skipped", 0))
        if batch.mask_source != self.mask_source:  # a loader of the wrong masks would train the upper bound silently
            raise RuntimeError(f"the training batches carry {batch.mask_source} masks, the run uses {self.mask_source}")
        return batch.to(self.device)

    def train_step(self, batch) -> bool:
        """Forward, losses, backward and clipping on ``batch``, then the update; False if skipped."""
        cfg, core = self.cfg, self.core
        norm_stats = snapshot_norm_stats(core)  # a skipped step must not leave its batch in BN statistics
        out = self.model(batch.images, batch.masks if core.cfg.mask_input else None,
                         shape_grad_2d=cfg.loss.shape_grad_2d, backbone_grad_2d=cfg.loss.backbone_grad_2d,
                         render=picture_step(cfg.loss, self.step))
        total, terms = reconstruction_losses(core, out, batch, cfg.loss, self.step, self.frozen_parse_net)
        finite = _finite_on_every_rank(total, self.world)
        if finite:
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            # the norm is computed even without clipping: a non-finite gradient must not reach
            # the weights, or the last good state would be lost with it
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip or math.inf)
            finite = bool(torch.isfinite(self.grad_norm))
        if not finite:
            self.skip(terms, norm_stats)
            return False
        self.update(batch, terms)
        return True

    def skip(self, terms: dict[str, torch.Tensor], norm_stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Drop a non-finite step; after ``train.max_nan_steps`` in a row, checkpoint and raise."""
        self.nan_streak += 1
        self.counters["nan_steps"] += 1
        self.opt.zero_grad(set_to_none=True)
        restore_norm_stats(norm_stats)
        _logger.warning("rank %d step %d: non-finite loss or gradient (%s), step skipped (%d in a row)",
                        self.rank, self.step, {k: float(v.detach()) for k, v in terms.items()}, self.nan_streak)
        if self.tracker:
            self.tracker.log_metrics({"train/nan_steps": self.counters["nan_steps"]}, self.step)
        if self.nan_streak >= self.cfg.train.max_nan_steps:
            stop = {"step": float(self.step), "train/nan_steps": self.counters["nan_steps"], **self.last_val,
                    VAL_METRIC: self.last_val.get(VAL_METRIC, math.inf)}
            self.report(stop, with_checkpoint=True)
            raise NonFiniteLossError(
                f"{self.nan_streak} non-finite losses in a row at step {self.step} (train.max_nan_steps="
                f"{self.cfg.train.max_nan_steps}); the last good state is checkpointed at step {self.step}"
            )

    def update(self, batch, terms: dict[str, torch.Tensor]) -> None:
        """A good step's update: the weights, the schedule, the step, the average, the window's sums."""
        self.nan_streak = 0
        self.row_rates.step(self.opt)
        self.sched.step()
        self.step += 1
        if self.average:
            self.average.update(self.core, self.step)
        if self.on_step:
            self.on_step(self.step)
        self.samples_since += batch.images.shape[0]
        for k, v in terms.items():
            acc = self.window.setdefault(k, [0.0, 0])
            acc[0] += float(v.detach())
            acc[1] += 1

    def after_step(self, batch) -> None:
        """What the new step's number calls for: refit the plan, log the window, validate, checkpoint."""
        step, every = self.step, self.cfg.train
        if self.budget is not None and step % every.log_every == 0:
            _refit(self.budget, step, self.rank, self.world, self.device)
        if step % every.log_every == 0 or step == self.plan.steps:
            self.log_window(batch)
        is_val = step % every.val_every == 0 or step == self.plan.steps
        if is_val:
            self.run_validation()
        if is_val or step % every.ckpt_every == 0:
            # every checkpoint carries the latest validation metric: Ray keeps the best k by it
            self.report({"step": float(step), **self.metrics, **self.last_val,
                         VAL_METRIC: self.last_val.get(VAL_METRIC, math.inf)}, with_checkpoint=True)

    def log_window(self, batch) -> None:
        """The window's mean terms, lr and rate (summed over ranks) to the tracker; the ETA log line."""
        world, device, counters = self.world, self.device, self.counters
        now = time.perf_counter()
        rate = _all_reduce_sum(self.samples_since / max(now - self.t_last, 1e-9), world, device)
        self.t_last, self.samples_since = now, 0
        metrics = {f"train/loss_{k}" if k != "total" else "train/loss": v / n for k, (v, n) in self.window.items()}
        metrics.update({"train/lr": self.sched.get_last_lr()[0], "train/triplets_per_s": rate,
                        "train/skipped_samples": _all_reduce_sum(counters["skipped_samples"], world, device),
                        "train/nan_steps": counters["nan_steps"]})
        metrics["train/grad_norm"] = float(self.grad_norm)
        if self.budget is not None:
            metrics["train/steps_planned"] = float(self.plan.steps)
        self.metrics, self.window = metrics, {}
        if self.tracker:
            self.tracker.log_metrics(metrics, self.step)
        eta = (self.plan.steps - self.step) * batch.images.shape[0] * world / max(rate, 1e-9)
        _logger.info("step %d/%d loss %.4f %.1f triplets/s ETA %dm%02ds", self.step, self.plan.steps,
                     metrics.get("train/loss", float("nan")), rate, eta // 60, eta % 60)

    def run_validation(self) -> None:
        """Rank 0 validates the weights a checkpoint saves; every rank takes its metrics (``last_val``)."""
        scored = self.average.model if self.average else self.core
        val_metrics, view = (validate(scored, self.val_batches(), self.cfg, self.frozen_parse_net,
                                      max_samples=self.cfg.train.val_samples, step=self.step, other_masks=False)
                             if self.rank == 0 else ({}, None))
        last_val = _broadcast(val_metrics, self.world)
        # the worst validation of the run so far, carried in every report (the job's summary
        # shows it: a model that trained without non-finite steps must never predict one)
        self.counters["val_nonfinite_max"] = max(self.counters.get("val_nonfinite_max", 0.0),
                                                 last_val.get("val/loss_nonfinite_predictions", 0.0))
        last_val["val/nonfinite_max"] = self.counters["val_nonfinite_max"]
        self.last_val = last_val
        if self.tracker:
            self.tracker.log_metrics(last_val, self.step)
            if view is not None and self.cfg.tracking.log_images:
                self.tracker.log_validation_images(view, self.step)

    def report(self, metrics: dict[str, float], with_checkpoint: bool) -> None:
        """``session.report`` on every rank, with rank 0's checkpoint when ``with_checkpoint``."""
        tmp = self.checkpoint_dir(metrics) if with_checkpoint else None
        try:
            self.session.report(metrics, Path(tmp.name) if tmp else None)
        finally:
            if tmp:
                tmp.cleanup()

    def checkpoint_dir(self, metrics: dict[str, float]) -> tempfile.TemporaryDirectory | None:
        """On rank 0, a temporary directory holding the checkpoint of now; None on the others."""
        if self.rank != 0:
            return None
        tmp = tempfile.TemporaryDirectory(prefix="dfmvr-ckpt-")
        core, average, plan = self.core, self.average, self.plan
        save_checkpoint(
            tmp.name, model_state=average.state_dict() if average else core.state_dict(),
            live_model_state=core.state_dict() if average else None, optimizer_state=self.opt.state_dict(),
            scheduler_state=self.sched.state_dict(), step=self.step, config=self.config_dict,
            face_signature=self.face_model.signature(), metrics=metrics, parse_net=self.parse_net,
            extra={"counters": self.counters, "data_position": {"step": self.step, "seed": self.cfg.seed},
                   "plan": {"steps": plan.steps, "cosine_after": plan.cosine_after, "deadline": self.deadline},
                   # lets jobs/evaluate.py log to this run when given the checkpoint as a plain path
                   "mlflow_run_id": getattr(self.tracker, "run_id", None)},
        )
        return tmp


def _parse_net_parts(cfg: Config, parse_net: dict | None, device: torch.device) -> tuple[Any, Any]:
    """``(frozen parse net, mask cache)`` of the run, each None where it does not use one."""
    frozen = mask_cache = None
    # frozen for the mask loss, for the network's input masks, and to score a model that reads the
    # given masks on the parse net's too (validate)
    if parse_net is not None and (cfg.loss.mask_loss or cfg.model.mask_input):
        frozen = frozen_parse_net_of(parse_net, cfg.model.parse_net or "the job's parse net", device,
                                     amp=cfg.train.parse_net_amp)
    if uses_parse_net_masks(cfg.model):
        if parse_net is None:
            raise ValueError("model.input_masks is parse_net but the job has no parse net (model.parse_net empty, "
                             "train.parse_net_first=false): name one, or set model.input_masks=given")
        from dfmvr.train.masks import find_mask_cache

        mask_cache = find_mask_cache(cfg, parse_net)  # the parse net's masks, made once by the driver
    return frozen, mask_cache


def _finite_on_every_rank(total: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on this rank and, under DDP, on every other one."""
    finite = torch.isfinite(total).all()
    if world > 1 and dist.is_initialized():
        # every rank must agree to skip, or DDP's all-reduce would hang on the others
        flag = finite.to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return flag.item() > 0
    return bool(finite)


def _refit(budget: StepBudget, step: int, rank: int, world: int, device: torch.device) -> None:
    """Rank 0 refits the plan to the deadline by its own clock; every rank takes rank 0's plan."""
    plan = budget.plan
    changed = rank == 0 and budget.update(step, time.time())
    if world > 1 and dist.is_initialized():
        box = torch.tensor([plan.steps, plan.cosine_after], dtype=torch.int64, device=device)
        dist.broadcast(box, src=0)
        plan.steps, plan.cosine_after = (int(v) for v in box.tolist())
    # the plan moves a little at every refit: say so when it first fits, moves by 2% or more, or
    # has to stop the run sooner
    logged = budget.logged_steps
    if changed and (logged is None or abs(plan.steps - logged) >= 0.02 * logged or step >= plan.cosine_after):
        budget.logged_steps = plan.steps
        _logger.info("step %d: the time budget fits %d steps, cosine decay from step %d", step, plan.steps,
                     plan.cosine_after)


def write_step_journal(path: Path) -> Callable[[int], None]:
    """An ``on_step`` callback appending ``{"pid", "step", "t"}`` lines (``t``: wall-clock
    ``time.time()`` when the step completed): how a run's steps were spent across restarts (read by
    the fault-tolerance test and useful when debugging restarts) and when (benchmarks/scaling.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()

    def on_step(step: int) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"pid": pid, "step": step, "t": time.time()}) + "\n")

    return on_step
