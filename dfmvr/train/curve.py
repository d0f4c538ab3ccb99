"""Learning curves: validation gain over the mean face against triplets seen, in one process.

The quickest faithful measure of how much identity a configuration learns per triplet: the
same model, objective, optimiser, schedule and clipping as :func:`dfmvr.train.loop.run_loop`,
on a split held in memory (no loader, no Ray, no MLflow), with the validation metric of
training (aligned vertex RMSE against the mean face's on the same triplets) every few
triplets. Used by ``benchmarks/learning_curve.py`` and the learning test; the numbers it
gives are what ``docs/notes/training-readings.md`` compares configurations with.

::

    train, val = load_split(cfg, "train"), load_split(cfg, "val", limit=200, with_gt=True)
    points = learning_curve(cfg, train, val, triplets=16000, every=2000)
    points[-1].gain_pct        # % below the mean face's error after 16k triplets
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch

from dfmvr.config import Config
from dfmvr.data.batch import Batch
from dfmvr.losses import picture_step
from dfmvr.model import (
    DFMVR,
    build_model,
    autocast_dtype,
    frozen_parse_net,
    network_masks,
    reads_parse_net_masks,
    uses_parse_net_masks,
)
from dfmvr.train.metrics import aligned_vertex_rmse_mm
from dfmvr.train.objective import reconstruction_losses
from dfmvr.train.schedule import build_optimizer, pose_row_rates
from dfmvr.train.weights import WeightAverage, restore_norm_stats, snapshot_norm_stats

_logger = logging.getLogger(__name__)

_FIELDS = ("images", "masks", "has_masks", "weights", "lmk2d", "yaw_deg", "lmk3d", "lmk3d_valid", "has_lmk3d")


@dataclass
class MemorySplit:
    """One split's triplets as stacked tensors (``T`` triplets), sliced into :class:`Batch` es.

    Attributes:
        tensors: the :class:`Batch` fields in ``_FIELDS``, each with ``T`` rows.
        gt: ``[T, N, 3]`` ground-truth vertices (decimetres), or None.
    """

    tensors: dict[str, torch.Tensor]
    gt: torch.Tensor | None = None
    mask_source: str = "given"
    """Whose ``masks`` are (:attr:`dfmvr.data.batch.Batch.mask_source`)."""

    def __len__(self) -> int:
        return len(self.tensors["images"])

    def batch(self, idx: torch.Tensor) -> Batch:
        n = len(idx)
        return Batch(keys=[str(int(i)) for i in idx], subjects=[""] * n, coeffs=torch.zeros(n, 0),
                     has_coeffs=torch.zeros(n, dtype=torch.bool), mask_source=self.mask_source,
                     **{k: v[idx] for k, v in self.tensors.items()})


def load_split(cfg: Config, split: str, *, limit: int | None = None, with_gt: bool = False,
               mask_cache=None) -> MemorySplit:
    """The first ``limit`` triplets (all when None) of ``split`` at ``cfg.data.url``, in memory;
    with the parse net's masks from ``mask_cache`` (:func:`dfmvr.train.masks.ensure_mask_cache`)
    instead of the samples' own when given.

    Raises:
        ValueError: when the split yields no triplet, or ground truth is asked for and missing.
    """
    from dfmvr.data.loader import make_loader

    batches, n = [], 0
    for b in make_loader(cfg.data, split, rank=0, world_size=1, resampled=False, with_gt=with_gt, shuffle=False,
                         batch_size=32, num_workers=0, mask_cache=mask_cache):
        batches.append(b)
        n += b.images.shape[0]
        if limit and n >= limit:
            break
    if not batches:
        raise ValueError(f"{cfg.data.url}: split {split!r} yielded no triplet")
    tensors = {k: torch.cat([getattr(b, k) for b in batches])[:limit] for k in _FIELDS}
    gt = None
    if with_gt:
        meshes = [v for b in batches for v in b.gt_vertices][:limit]
        if any(v.shape[0] == 0 for v in meshes):
            raise ValueError(f"{cfg.data.url}: split {split!r} has triplets without a ground-truth mesh")
        gt = torch.stack(meshes)
    return MemorySplit(tensors, gt, mask_source=batches[0].mask_source)


@dataclass
class CurvePoint:
    """Validation after ``triplets`` triplets (``step`` optimiser steps)."""

    triplets: int
    step: int
    rmse_mm: float
    mean_face_rmse_mm: float
    gain_pct: float
    """``100 * (1 - rmse / mean_face_rmse)``: how far below the mean face's error."""
    nonfinite: int
    """Validation triplets whose eval-mode prediction was not finite (left out of the RMSE)."""
    train_s: float
    """Seconds spent in training steps so far (validation excluded)."""
    loss: dict[str, float]
    """Each loss term (unweighted) at the last step that computed it (``loss.picture_every`` leaves
    the picture terms out of the steps between), and the last step's total."""
    grad_split: dict[str, dict[str, float]] | None = None
    """Per weighted loss term, on the last batch: the gradient norm on the head's identity rows,
    pose rows and on the backbone, and the cosine between its backbone gradient and lm3d's
    (:func:`gradient_split`); None unless asked for."""

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def val_gain(model: DFMVR, val: MemorySplit, *, chunk: int = 50) -> tuple[float, float, int]:
    """``(rmse_mm, mean_face_rmse_mm, nonfinite)`` of ``model`` in eval mode on ``val``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        shapes = []
        for i in range(0, len(val), chunk):
            batch = val.batch(torch.arange(i, min(i + chunk, len(val))))
            masks = network_masks(model, batch)
            shapes.append(model(batch.images.to(device), None if masks is None else masks.to(device),
                                render=False).shape.float().cpu())
    finally:
        model.train(was_training)
    pred, gt = torch.cat(shapes).double(), val.gt.double()
    finite = torch.isfinite(pred).flatten(1).all(1)
    mean = model.face.model.mean_shape.detach().cpu().double().expand_as(gt[finite])
    rmse = float(aligned_vertex_rmse_mm(pred[finite], gt[finite]).mean()) if finite.any() else math.inf
    return rmse, float(aligned_vertex_rmse_mm(mean, gt[finite]).mean()), int((~finite).sum())


def gradient_split(model: DFMVR, batch: Batch, loss_cfg, step: int,
                   parse_net: torch.nn.Module | None = None) -> dict[str, dict[str, float]]:
    """How each weighted loss term pulls on the network, on one batch.

    Returns:
        ``{term: {"head_id", "head_pose", "backbone", "cos_lm3d"}}``: the norms of the term's
        weighted gradient on the head rows that emit the identity coefficients, on the rows that
        emit the per-view poses, and on every backbone parameter; ``cos_lm3d`` is the cosine
        between the term's backbone gradient and the lm3d term's (1 for lm3d itself; absent
        without lm3d).
    """
    layout = model.layout
    head = model.regressor.head.weight
    n_shared = layout.n_shared
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    out = model(batch.images, batch.masks if model.cfg.mask_input else None, shape_grad_2d=loss_cfg.shape_grad_2d,
                backbone_grad_2d=loss_cfg.backbone_grad_2d)
    _, terms = reconstruction_losses(model, out, batch, loss_cfg, step, parse_net, lazy=False)
    grads: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    names = [k for k in terms if k != "total"]
    for i, name in enumerate(names):
        weighted = getattr(loss_cfg, name) * terms[name]
        g = torch.autograd.grad(weighted, [head, *backbone], retain_graph=i < len(names) - 1, allow_unused=True)
        g_head = g[0] if g[0] is not None else torch.zeros_like(head)
        g_bb = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g[1:], backbone)])
        grads[name] = (g_head[layout.id], g_head[n_shared:], g_bb)
    result = {}
    for name, (gid, gpose, gbb) in grads.items():
        row = {"head_id": float(gid.norm()), "head_pose": float(gpose.norm()), "backbone": float(gbb.norm())}
        if "lm3d" in grads:
            ref = grads["lm3d"][2]
            row["cos_lm3d"] = float(torch.nn.functional.cosine_similarity(gbb, ref, dim=0, eps=1e-20))
        result[name] = row
    model.zero_grad(set_to_none=True)
    return result


def learning_curve(cfg: Config, train: MemorySplit, val: MemorySplit, *, triplets: int, every: int,
                   seed: int = 0, on_point: Callable[[CurvePoint], None] | None = None,
                   with_grad_split: bool = False, device: torch.device | str = "cpu", amp: bool = False,
                   max_seconds: float | None = None, replicas: int = 1) -> list[CurvePoint]:
    """Train ``cfg``'s model on ``train`` for ``triplets`` triplets, validating every ``every``.

    Batches of ``cfg.data.batch_size`` are drawn uniformly without replacement within a batch;
    the learning-rate schedule (and the mask loss's start) are ``cfg``'s stretched from ``cfg.train.steps`` to this
    run's ``triplets / batch`` steps (warm-up and decay start at the same fractions of the run);
    clipping and weight averaging as in training; the mask loss runs when ``cfg.model.parse_net``
    names a parse-net file (frozen, as in training; with ``model.input_masks=parse_net`` the network
    reads its masks, and then one must be named). Validation
    uses the averaged weights when ``cfg.optim.ema_decay`` is set, as training's does;
    ``with_grad_split`` adds :func:`gradient_split` on the last batch to every point.

    ``device`` trains there (the splits stay in host memory; each batch is copied over), ``amp``
    runs the forward pass in bfloat16 on CUDA as ``train.amp`` does, and ``max_seconds`` ends
    the curve (with a last point) once that many seconds of training steps are spent, before
    ``triplets`` when the device is slower than planned.

    ``replicas`` takes the step of a data-parallel job in this one process: each step draws
    ``replicas`` batches of ``cfg.data.batch_size``, runs them through the model one after the
    other (BatchNorm normalises each on its own, as on separate workers) and averages their
    gradients, as DDP's all-reduce does; BatchNorm's running statistics follow the first batch
    only, as DDP broadcasts rank 0's. ``make train``'s step is ``replicas=2``.
    """
    if replicas < 1:
        raise ValueError(f"replicas: expected >= 1, got {replicas}")
    if uses_parse_net_masks(cfg.model) and "given" in (train.mask_source, val.mask_source):
        raise ValueError("model.input_masks is parse_net but the splits hold the samples' own masks: load them with "
                         "the parse net's mask cache (load_split(..., mask_cache=ensure_mask_cache(...)[0]))")
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(cfg, device=device)
    model.amp_dtype = autocast_dtype(device, amp=amp, cpu_amp=cfg.train.cpu_amp)
    bs = cfg.data.batch_size
    per_step = bs * replicas
    if per_step > len(train):
        raise ValueError(f"a step draws {per_step} distinct triplets ({replicas} x batch {bs}) but there are "
                         f"{len(train)} training triplets")
    total_steps = max(1, triplets // per_step)
    # the schedule keeps its shape: the decay starts at the same fraction of the run
    stretch = total_steps / max(1, cfg.train.steps)
    optim_cfg = replace(cfg.optim, cosine_after=round(cfg.optim.cosine_after * stretch),
                        warmup_steps=round(cfg.optim.warmup_steps * stretch))
    loss_cfg = replace(cfg.loss, mask_loss_start_step=round(cfg.loss.mask_loss_start_step * stretch))
    opt, sched = build_optimizer(model.parameters(), optim_cfg, total_steps)
    row_rates = pose_row_rates(model, optim_cfg)
    reads_parse_net = reads_parse_net_masks(cfg.model)
    parse_net = None
    if cfg.model.parse_net and (cfg.loss.mask_loss or reads_parse_net):
        from dfmvr.nets import read_parsenet_file

        parse_net = frozen_parse_net(read_parsenet_file(cfg.model.parse_net), cfg.model.parse_net, device,
                                     amp=cfg.train.parse_net_amp)
    if reads_parse_net:
        model.set_input_parse_net(parse_net)
    average = WeightAverage(model, cfg.optim) if cfg.optim.ema_decay else None
    points: list[CurvePoint] = []
    train_s, seen, step = 0.0, 0, 0
    latest: dict[str, float] = {}
    model.train()
    while step < total_steps:
        drawn = torch.from_numpy(rng.choice(len(train), per_step, replace=False))
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for r in range(replicas):
            batch = train.batch(drawn[r * bs:(r + 1) * bs]).to(device, non_blocking=True)
            if r == 1:
                stats = snapshot_norm_stats(model)
            out = model(batch.images, batch.masks if cfg.model.mask_input else None,
                        shape_grad_2d=loss_cfg.shape_grad_2d, backbone_grad_2d=loss_cfg.backbone_grad_2d,
                        render=picture_step(loss_cfg, step))
            total, terms = reconstruction_losses(model, out, batch, loss_cfg, step, parse_net)
            (total / replicas).backward()
        latest.update({k: float(v.detach()) for k, v in terms.items()})
        if replicas > 1:
            restore_norm_stats(stats)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        row_rates.step(opt)
        sched.step()
        if average:
            average.update(model, step + 1)
        _sync(device)
        train_s += time.perf_counter() - t0
        step += 1
        seen += per_step
        out_of_time = max_seconds is not None and train_s >= max_seconds
        if seen // every > (seen - per_step) // every or step == total_steps or out_of_time:
            rmse, mean, nonfinite = val_gain(average.model if average else model, val)
            point = CurvePoint(triplets=seen, step=step, rmse_mm=rmse, mean_face_rmse_mm=mean,
                               gain_pct=100 * (1 - rmse / mean), nonfinite=nonfinite, train_s=train_s,
                               loss=dict(latest),
                               grad_split=(gradient_split(model, batch, loss_cfg, step, parse_net)
                                           if with_grad_split else None))
            points.append(point)
            _logger.info("%d triplets: %.3f mm vs mean face %.3f (%.1f%% below), %.1f triplets/s", seen, rmse, mean,
                         point.gain_pct, seen / train_s)
            if on_point:
                on_point(point)
        if out_of_time:
            break
    return points


def _sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so wall-clock stamps time the step (CUDA runs ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
