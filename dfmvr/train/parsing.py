"""Face parsing: training a parse net on masked shards, its IoU metrics, mask prediction.

The parse net (a registered :class:`dfmvr.nets.parsenet.ParseNet`, ``parsenet.arch``; 10 classes,
docs/design.md "Face-parsing classes") is trained here, apart from the reconstruction network, then used frozen by it
(``model.parse_net=<checkpoint>``: the mask loss, and masks for inputs that have none) and by
``python -m sharding.fill_masks`` (masks for shards packed without them).

Input convention, the same everywhere: RGB ``[N, 3, S, S]`` in [-1, 1] (``x / 127.5 - 1`` from
uint8, what :func:`dfmvr.data.transforms.to_model_range` and the loader produce and what the
reconstruction code feeds it). The net is trained at ``data.image_size`` (stored in the
checkpoint's ``meta["image_size"]``); :func:`predict_masks` resizes other sizes to it.

Training (:func:`train_parsenet`): one process, plain PyTorch (no DDP: a ResNet-18-sized net on
a few thousand masked views trains on one GPU or a few CPU cores). Every view of every triplet
that has masks is one training image; cross-entropy on the main head plus ``aux_weight`` times
each auxiliary head (BiSeNet's deep supervision), each pixel weighted by its class
(``parsenet.class_weights``); Adam with a cosine decay; random horizontal
flips that swap the left/right brow and eye classes so the labels stay the subject's own.

Metrics (:func:`confusion_matrix`, :func:`class_iou`, :func:`mean_iou`): per-class IoU
``TP / (TP + FP + FN)`` over all pixels of the evaluated views (accumulated, not averaged per
image); a class absent from both prediction and truth has no IoU (NaN) and is left out of the
mean.

:func:`run_job` is what ``jobs/train_parsenet.py`` calls: data (synthetic shards by default),
one MLflow run, training, and the exported checkpoint (:func:`dfmvr.nets.save_parsenet`).

One job: training the parse net and scoring it (the training loop, its validation by per-class IoU,
the job that writes and logs it); its masks at inference are the model's
(:func:`dfmvr.model.parsed_masks`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dfmvr.config import Config, apply_overrides, flatten, to_dict
from dfmvr.data.augment import AugmentSettings, PhotoAugment, augment_views
from dfmvr.facemodel.model import N_PARSE_CLASSES, PARSE_CLASSES
from dfmvr.model import autocast_dtype
from dfmvr.nets.parsenet import ParseNet, create_parsenet, save_parsenet
from dfmvr.train.schedule import lr_factor

_logger = logging.getLogger(__name__)

FLIP_CLASSES = (0, 1, 3, 2, 5, 4, 6, 7, 8, 9)
"""Class of each class after a horizontal image flip: the subject's left and right brow (2, 3)
and eye (4, 5) trade places; the rest are symmetric."""

MAX_UNMASKED_BATCHES = 50
"""Batches in a row without a single masked sample before training gives up on the data."""

MAX_NONFINITE_STEPS = 5
"""Non-finite losses in a row (each step skipped) before training stops."""

CHECKPOINT_NAME = "parsenet.pt"
"""File name of the exported checkpoint under ``<work_dir>/parsenet/``."""


# --------------------------------------------------------------------------------- metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n_classes: int = N_PARSE_CLASSES) -> torch.Tensor:
    """Pixel counts of (true class, predicted class).

    Args:
        pred: int ``[...]`` predicted classes (e.g. ``[N, H, W]``).
        target: int ``[...]`` true classes, same shape.
        n_classes: C.

    Returns:
        int64 ``[C, C]``: row = true class, column = predicted class.

    Raises:
        ValueError: shapes differ, or a class id is outside ``0..C-1``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred and target must have the same shape; got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    for name, values in (("pred", pred), ("target", target)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= n_classes):
            raise ValueError(f"confusion_matrix: {name} holds classes {int(values.min())}..{int(values.max())}, "
                             f"expected 0..{n_classes - 1}")
    counts = torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes)
    return counts.view(n_classes, n_classes)


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class intersection over union from a confusion matrix.

    Args:
        confusion: ``[C, C]`` counts (row true, column predicted).

    Returns:
        float64 ``[C]``: ``TP / (TP + FP + FN)``; NaN for a class absent from both the truth and
        the prediction (its union is empty, so it has no IoU).
    """
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.full_like(tp, math.nan)
    present = union > 0
    iou[present] = tp[present] / union[present]
    return iou


def mean_iou(iou: torch.Tensor) -> float:
    """Mean over the classes that have an IoU (NaN entries left out); NaN when none has."""
    finite = iou[~torch.isnan(iou)]
    return float(finite.mean()) if finite.numel() else math.nan


def iou_metrics(confusion: torch.Tensor, prefix: str = "val/") -> dict[str, float]:
    """``{prefix}iou_<class>`` for every class, ``{prefix}miou`` and ``{prefix}pixel_acc``."""
    iou = class_iou(confusion)
    out = {f"{prefix}iou_{name}": float(v) for name, v in zip(PARSE_CLASSES, iou)}
    out[f"{prefix}miou"] = mean_iou(iou)
    total = int(confusion.sum())
    out[f"{prefix}pixel_acc"] = float(confusion.diagonal().sum()) / total if total else math.nan
    return out


# --------------------------------------------------------------------------------- training pieces


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean_c (2 |P_c Y_c| + 1) / (|P_c| + |Y_c| + 1)`` over the classes present in ``target``:
    softmax probabilities ``P`` against one-hot truth ``Y``, summed over the batch's pixels. Every
    class counts alike however few pixels it has, which is what IoU rewards.

    Args:
        logits: ``[N, C, H, W]``; target: int64 ``[N, H, W]``.
    """
    prob = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(prob.dtype)
    inter = (prob * onehot).sum((0, 2, 3))
    sizes = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = (2 * inter + 1) / (sizes + 1)
    return 1 - dice[present].mean()


def parse_loss(outputs: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor,
               aux_weight: float = 1.0, class_weights: torch.Tensor | None = None, dice_weight: float = 0.0,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the main head plus ``aux_weight`` times each auxiliary head's.

    Args:
        outputs: logits ``[N, C, H, W]``, or ``(main, aux16, aux32)`` as BiSeNet returns them
            with ``return_aux=True`` in training mode.
        target: int64 ``[N, H, W]`` classes.
        aux_weight: weight of each auxiliary term.
        class_weights: ``[C]`` weight of each class's pixels (``parsenet.class_weights``), or None;
            the weighted mean divides by the summed weights of the pixels, as PyTorch's does.
        dice_weight: weight of :func:`soft_dice_loss` on the main head (``parsenet.dice_weight``).

    Returns:
        ``(total, terms)`` with terms ``loss_main`` (and ``loss_aux16``, ``loss_aux32``, ``loss_dice``), detached.
    """
    heads = outputs if isinstance(outputs, tuple) else (outputs,)
    names = ("loss_main", "loss_aux16", "loss_aux32")[: len(heads)]
    values = [F.cross_entropy(logits, target, weight=class_weights) for logits in heads]
    total = values[0] + aux_weight * sum(values[1:], torch.zeros((), device=target.device))
    terms = {name: v.detach() for name, v in zip(names, values)}
    if dice_weight > 0:
        dice = soft_dice_loss(heads[0], target)
        total = total + dice_weight * dice
        terms["loss_dice"] = dice.detach()
    return total, terms


def masked_views(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The views of a :class:`dfmvr.data.batch.Batch` that have masks, as single images.

    Returns:
        ``images [M, 3, S, S]`` in [-1, 1] and ``masks [M, S, S]`` int64, ``M = 3 * (masked triplets)``.
    """
    keep = batch.has_masks
    return batch.images[keep].flatten(0, 1), batch.masks[keep].flatten(0, 1)


def random_hflip(images: torch.Tensor, masks: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each image (and its mask) left-right with probability 1/2, relabelling the classes
    by :data:`FLIP_CLASSES` so that "left" stays the subject's left.

    Args:
        images: ``[N, 3, H, W]``; masks: int64 ``[N, H, W]``; generator: CPU generator.
    """
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    if not bool(flip.any()):
        return images, masks
    flip = flip.to(images.device)
    lut = torch.tensor(FLIP_CLASSES, dtype=masks.dtype, device=masks.device)
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    masks = torch.where(flip[:, None, None], lut[masks.flip(-1)], masks)
    return images, masks


def triplet_views(batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """The views of triplet batches (:class:`dfmvr.data.batch.Batch`) that have masks:
    ``(images [M, 3, S, S], masks [M, S, S], masked triplets, unmasked triplets)`` per batch."""
    for batch in batches:
        unmasked = int((~batch.has_masks).sum())
        if not bool(batch.has_masks.any()):
            yield batch.images[:0].flatten(0, 1), batch.masks[:0].flatten(0, 1), 0, unmasked
            continue
        images, masks = masked_views(batch)
        yield images, masks, int(batch.has_masks.sum()), unmasked


def parsing_views(batches: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """The views of parsing batches (:class:`dfmvr.data.parsing_shards.ParsingBatch`), as
    :func:`triplet_views` gives them (a sample is one view, and every one has its mask)."""
    for images, masks in batches:
        yield images, masks, int(images.shape[0]), 0


def split_views(data_url: str, split: str, *, data_cfg, batch_size: int, seed: int,
                ) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, int, int]]]:
    """A one-pass, unshuffled reader of ``split``'s views at ``data_url`` (multi-view captures or
    single-view parsing shards, by the manifest's views), for validation: call it for each pass."""
    from dfmvr.data.loader import make_loader
    from dfmvr.data.parsing_shards import make_parsing_loader
    from dfmvr.data.shards import read_manifest

    endpoint = data_cfg.s3_endpoint or None
    manifest = read_manifest(data_url, endpoint=endpoint)
    manifest.split(split)  # fail now, not after training
    if manifest.is_parsing:
        loader = make_parsing_loader(data_url, split, image_size=data_cfg.image_size, batch_size=3 * batch_size,
                                     endpoint=endpoint, shuffle=False, seed=seed, rank=0, world_size=1,
                                     num_workers=data_cfg.num_workers)
        return lambda: parsing_views(loader)
    loader = make_loader(dataclasses.replace(data_cfg, url=data_url, color_jitter=0.0), split, rank=0, world_size=1,
                         resampled=False, shuffle=False, batch_size=batch_size, seed=seed)
    return lambda: triplet_views(loader)


@torch.no_grad()
def evaluate(model: ParseNet, views: Iterable, *, device: torch.device | str = "cpu",
             max_samples: int = 0, perturb: PhotoAugment | None = None, seed: int = 0,
             prefix: str = "val/") -> tuple[dict[str, float], torch.Tensor]:
    """Per-class IoU of ``model`` over masked views.

    Args:
        model: the parse net (put in eval mode for the pass, its mode restored after).
        views: one pass of ``(images, masks, masked samples, unmasked samples)`` batches
            (:func:`triplet_views`, :func:`parsing_views`, :func:`split_views`).
        device: where to run.
        max_samples: stop after this many masked samples (triplets, or single views; 0: all).
        perturb: degrade every view (and move its mask) with this augmentation first, drawn from
            ``seed``: the same perturbed views on every call (the robustness figure).
        prefix: of the metric names.

    Returns:
        ``(metrics, confusion)``: :func:`iou_metrics` plus ``{prefix}samples`` (masked samples
        seen) and ``{prefix}unmasked`` (samples without masks, not scored); the ``[C, C]`` counts.
    """
    was_training = model.training
    model.eval()
    confusion = torch.zeros((model.n_classes, model.n_classes), dtype=torch.int64)
    samples = unmasked = 0
    rng = np.random.default_rng(seed)
    try:
        for images, masks, n_masked, n_unmasked in views:
            unmasked += n_unmasked
            if not n_masked:
                continue
            if max_samples and samples + n_masked > max_samples:
                keep = (max_samples - samples) * images.shape[0] // n_masked
                images, masks, n_masked = images[:keep], masks[:keep], max_samples - samples
            if perturb is not None:
                images, masks = augment_views(images, masks, perturb, rng)
            pred = model(images.to(device)).argmax(1).cpu()
            confusion += confusion_matrix(pred, masks, model.n_classes)
            samples += n_masked
            if max_samples and samples >= max_samples:
                break
    finally:
        model.train(was_training)
    metrics = iou_metrics(confusion, prefix)
    metrics.update({f"{prefix}samples": float(samples), f"{prefix}unmasked": float(unmasked)})
    return metrics, confusion


# --------------------------------------------------------------------------------- training


@dataclass(kw_only=True)
class ParseTrainResult:
    """What :func:`train_parsenet` returns."""

    model: ParseNet
    """The trained net (training mode, on the training device)."""
    steps: int
    """Optimiser steps taken (non-finite steps are skipped and not counted)."""
    losses: list[float] = field(default_factory=list)
    """Total loss of every step, in order."""
    val: dict[str, float] = field(default_factory=dict)
    """Metrics of the last validation (:func:`evaluate`)."""
    val_history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """``(step, metrics)`` of every validation."""
    skipped_samples: int = 0
    """Bad samples the loaders skipped."""
    unmasked_samples: int = 0
    """Training triplets without masks (not trained on)."""
    seconds: float = 0.0
    """Wall time of the training loop, validations included."""


def _manifest(url: str, cfg: Config):
    from dfmvr.data.shards import read_manifest

    return read_manifest(url, endpoint=cfg.data.s3_endpoint or None)


class TrainingViews:
    """The parse net's training views, ``3 * parsenet.batch_size`` a step: the masked views of
    ``data.url``'s training triplets, and with ``parsenet.data_url`` a ``parsenet.data_share`` of
    each step's views from those single-view parsing shards (``python -m sharding.pack_parsing``:
    CelebAMask-HQ, LaPa), drawn with replacement from both.

    Iterating yields ``(images [M, 3, S, S] in [-1, 1], masks int64 [M, S, S])``; ``skipped``
    counts the bad samples the loaders skipped and ``unmasked`` the triplets without masks.

    Raises (when iterated): ValueError after :data:`MAX_UNMASKED_BATCHES` triplet batches in a
    row without a masked sample.
    """

    def __init__(self, cfg: Config) -> None:
        from dfmvr.data.loader import make_loader
        from dfmvr.data.parsing_shards import make_parsing_loader

        pcfg = cfg.parsenet
        self.n_views = 3 * pcfg.batch_size
        self.n_parsing = round(pcfg.data_share * self.n_views) if pcfg.data_url else 0
        self.n_triplets = math.ceil((self.n_views - self.n_parsing) / 3)
        self.unmasked = 0
        self.triplets = self.parsing = None
        self.url = cfg.data.url
        self.split = cfg.data.split
        if self.n_triplets:
            self.triplets = make_loader(cfg.data, cfg.data.split, rank=0, world_size=1, resampled=True,
                                        batch_size=self.n_triplets, seed=cfg.seed)
        if self.n_parsing:
            self.parsing = make_parsing_loader(
                pcfg.data_url, "train", image_size=cfg.data.image_size, batch_size=self.n_parsing,
                endpoint=cfg.data.s3_endpoint or None, resampled=True, epoch_samples=cfg.data.epoch_samples,
                shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, rank=0, world_size=1,
                num_workers=cfg.data.num_workers, color_jitter=cfg.data.color_jitter,
                max_bad_shards_in_a_row=cfg.data.max_bad_shards_in_a_row)

    @property
    def skipped(self) -> int:
        return sum(loader.skipped for loader in (self.triplets, self.parsing) if loader is not None)

    def describe(self) -> str:
        parts = [f"{self.n_triplets} triplets of {self.url}"] if self.triplets is not None else []
        if self.parsing is not None:
            parts.append(f"{self.n_parsing} views of {self.parsing.manifest.url}")
        return " + ".join(parts)

    def _triplet_views(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        streak = 0
        for images, masks, n_masked, n_unmasked in triplet_views(_batches(self.triplets)):
            self.unmasked += n_unmasked
            if not n_masked:
                streak += 1
                if streak >= MAX_UNMASKED_BATCHES:
                    raise ValueError(
                        f"{self.url}: split {self.split!r} gave {streak} batches in a row without a sample that "
                        "has masks; the parse net trains on masked shards (synthetic ones, shards packed with "
                        "masks, or parsing shards: parsenet.data_url)")
                continue
            streak = 0
            yield images[:self.n_views - self.n_parsing], masks[:self.n_views - self.n_parsing]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        triplets = self._triplet_views() if self.triplets is not None else None
        parsing = _batches(self.parsing) if self.parsing is not None else None
        while True:
            parts = [next(triplets)] if triplets is not None else []
            if parsing is not None:
                parts.append(tuple(next(parsing)))
            yield torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(loader) -> Iterator:
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise ValueError(f"{loader.manifest.url}: split {loader.split!r} yielded no samples (all bad?)")


def train_parsenet(cfg: Config, *, device: torch.device | str | None = None,
                   log_metrics: Callable[[dict[str, float], int], None] | None = None) -> ParseTrainResult:
    """Train a parse net on ``cfg.data``'s shards (and ``parsenet.data_url``'s parsing shards, see
    :class:`TrainingViews`) with ``cfg.parsenet``'s settings.

    Args:
        cfg: the whole config; uses ``data`` (url, split, val_split, image_size, num_workers,
            shuffle_buffer, epoch_samples, color_jitter, s3_endpoint), ``parsenet`` and ``seed``.
        device: default CUDA when available, else CPU.
        log_metrics: called with ``(metrics, step)`` every ``parsenet.log_every`` steps
            (``train/...``) and at every validation (``val/...``).

    Returns:
        :class:`ParseTrainResult`.

    Raises:
        dfmvr.data.shards.ManifestError: the validation split is not in the manifest (checked first),
            or ``parsenet.data_url`` is not a parsing manifest.
        ValueError: no masked sample in :data:`MAX_UNMASKED_BATCHES` training batches in a row.
        FloatingPointError: :data:`MAX_NONFINITE_STEPS` non-finite losses in a row.
    """
    pcfg = cfg.parsenet
    device = torch.device(device) if device is not None else default_device()
    amp_dtype = autocast_dtype(device, amp=pcfg.amp, cpu_amp=pcfg.amp)
    data = dataclasses.replace(cfg.data, color_jitter=0.0)
    val_views = split_views(cfg.data.url, cfg.data.val_split, data_cfg=data, batch_size=pcfg.batch_size,
                            seed=cfg.seed)
    real_val = None
    if pcfg.data_url and "val" in _manifest(pcfg.data_url, cfg).splits:
        real_val = split_views(pcfg.data_url, "val", data_cfg=data, batch_size=pcfg.batch_size, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    flip_rng = torch.Generator().manual_seed(cfg.seed)
    augment = PhotoAugment(AugmentSettings(strength=pcfg.augment)) if pcfg.augment > 0 else None
    augment_rng = np.random.default_rng(cfg.seed)
    # the robustness figure: the validation views degraded the same way every time, at full strength
    perturb = PhotoAugment(AugmentSettings(strength=1.0)) if pcfg.robustness else None

    model = create_parsenet(pcfg.arch, n_classes=N_PARSE_CLASSES, width=pcfg.width).to(device)
    class_weights = torch.tensor(pcfg.class_weights, device=device) if pcfg.class_weights else None
    opt = torch.optim.Adam(model.parameters(), lr=pcfg.lr, weight_decay=pcfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps=pcfg.steps, cosine_after=0, min_lr_ratio=pcfg.min_lr_ratio))
    sources = TrainingViews(cfg)
    _logger.info("parse net: %s width %d, %d parameters, %d steps of %d views (%s) on %s", pcfg.arch, pcfg.width,
                 sum(p.numel() for p in model.parameters()), pcfg.steps, 3 * pcfg.batch_size, sources.describe(),
                 device)

    result = ParseTrainResult(model=model, steps=0)
    window: dict[str, float] = {}
    window_n = nonfinite_streak = 0
    t0 = t_window = time.perf_counter()
    val_seconds = 0.0  # spent validating: left out of the training time each validation reports
    images_since = 0
    model.train()
    batches = iter(sources)
    while result.steps < pcfg.steps:
        images, masks = next(batches)
        if pcfg.hflip:
            images, masks = random_hflip(images, masks, flip_rng)
        if augment is not None:
            images, masks = augment_views(images, masks, augment, augment_rng)
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            heads = model(images, return_aux=True)
        heads = tuple(h.float() for h in heads) if isinstance(heads, tuple) else heads.float()
        total, terms = parse_loss(heads, masks, pcfg.aux_weight, class_weights, pcfg.dice_weight)
        if not torch.isfinite(total):
            nonfinite_streak += 1
            _logger.warning("parse net: non-finite loss at step %d (%d in a row); step skipped",
                            result.steps, nonfinite_streak)
            if nonfinite_streak >= MAX_NONFINITE_STEPS:
                raise FloatingPointError(f"parse net: {nonfinite_streak} non-finite losses in a row at step "
                                         f"{result.steps}; lower parsenet.lr (now {pcfg.lr})")
            continue
        nonfinite_streak = 0
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        result.steps += 1
        result.losses.append(float(total.detach()))
        images_since += images.shape[0]
        window_n += 1
        for name, value in {"loss": total.detach(), **terms}.items():
            window[name] = window.get(name, 0.0) + float(value)
        step = result.steps
        if step % pcfg.log_every == 0 or step == pcfg.steps:
            now = time.perf_counter()
            metrics = {f"train/{k}": v / window_n for k, v in window.items()}
            metrics["train/lr"] = sched.get_last_lr()[0]
            metrics["train/images_per_s"] = images_since / max(now - t_window, 1e-9)
            metrics["train/skipped_samples"] = float(sources.skipped)
            _logger.info("parse net step %d/%d: loss %.4f", step, pcfg.steps, metrics["train/loss"])
            if log_metrics is not None:
                log_metrics(metrics, step)
            window, window_n, images_since, t_window = {}, 0, 0, now
        if step % pcfg.val_every == 0 or step == pcfg.steps:
            t_val = time.perf_counter()
            val, _ = evaluate(model, val_views(), device=device, max_samples=pcfg.val_samples)
            if perturb is not None:
                val.update(evaluate(model, val_views(), device=device, max_samples=pcfg.val_samples, perturb=perturb,
                                    seed=cfg.seed, prefix="val_photo/")[0])
            if real_val is not None:
                val.update(evaluate(model, real_val(), device=device, max_samples=pcfg.val_samples,
                                    prefix="val_real/")[0])
            # training seconds so far, validations left out: what a curve of mIoU against time plots
            val["val/train_seconds"] = t_val - t0 - val_seconds
            val_seconds += time.perf_counter() - t_val
            result.val = val
            result.val_history.append((step, val))
            _logger.info("parse net step %d: val mIoU %.4f (%d triplets)", step, val["val/miou"],
                         int(val["val/samples"]))
            if log_metrics is not None:
                log_metrics(val, step)
    result.skipped_samples = sources.skipped
    result.unmasked_samples = sources.unmasked
    result.seconds = time.perf_counter() - t0
    return result


def score_parse_net(cfg: Config, bundle: dict, *, source: str = "the parse net",
                    device: torch.device | str | None = None) -> dict[str, Any]:
    """A given parse net (a :func:`dfmvr.nets.read_parsenet_file` dict) scored as its training
    job scores it: per-class IoU on ``data.val_split`` (``parsenet.val_samples``), and on the same
    views degraded as photos are (``parsenet.robustness``). What the training job reports for a
    parse net it did not train (``model.parse_net`` names one, or ``builtin``).

    Returns:
        ``miou``, ``iou`` (class -> IoU or None), ``miou_photo``, ``iou_photo``, ``val_samples``.
    """
    from dfmvr.model import frozen_parse_net

    device = torch.device(device) if device is not None else default_device()
    net = frozen_parse_net(bundle, source, device, amp=cfg.train.parse_net_amp)
    data = dataclasses.replace(cfg.data, color_jitter=0.0)
    views = split_views(cfg.data.url, cfg.data.val_split, data_cfg=data, batch_size=cfg.parsenet.batch_size,
                        seed=cfg.seed)
    val, _ = evaluate(net, views(), device=device, max_samples=cfg.parsenet.val_samples)
    if cfg.parsenet.robustness:
        val.update(evaluate(net, views(), device=device, max_samples=cfg.parsenet.val_samples, seed=cfg.seed,
                            perturb=PhotoAugment(AugmentSettings(strength=1.0)), prefix="val_photo/")[0])
    return {
        "miou": _or_none(val.get("val/miou", math.nan)),
        "iou": {k: _or_none(val.get(f"val/iou_{k}", math.nan)) for k in PARSE_CLASSES},
        "miou_photo": _or_none(val.get("val_photo/miou", math.nan)),
        "iou_photo": {k: _or_none(val.get(f"val_photo/iou_{k}", math.nan)) for k in PARSE_CLASSES},
        "val_samples": int(val.get("val/samples", 0)),
    }


# --------------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_masks(model: ParseNet, images: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Argmax class maps for uint8 RGB images.

    Images are scaled to [-1, 1]; when their side differs from the size the net was trained
    at (``model.meta["image_size"]``, when known) they are resized to it (bilinear, antialiased
    when shrinking) and the logits are resized back (bilinear) before the argmax.

    Args:
        model: the parse net (evaluated in eval mode; its mode is restored after).
        images: uint8 ``[M, S, S, 3]`` RGB.
        batch_size: images per forward pass.

    Returns:
        uint8 ``[M, S, S]`` classes ``0..n_classes-1``.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"predict_masks: images must be uint8 [M, S, S, 3], got {images.dtype} {list(images.shape)}")
    device = next(model.parameters()).device
    size = images.shape[1:3]
    net_size = int(model.meta.get("image_size", 0)) or None
    was_training = model.training
    model.eval()
    out = np.empty(images.shape[:3], dtype=np.uint8)
    try:
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(images[start:start + batch_size]).to(device)
            x = chunk.permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0  # as dfmvr.data.transforms.to_model_range
            if net_size is not None and tuple(size) != (net_size, net_size):
                x = F.interpolate(x, size=(net_size, net_size), mode="bilinear", align_corners=False,
                                  antialias=net_size < size[0])
                logits = F.interpolate(model(x), size=tuple(size), mode="bilinear", align_corners=False)
            else:
                logits = model(x)
            out[start:start + len(chunk)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------------- the job


def checkpoint_path(cfg: Config) -> Path:
    """Where the job exports the checkpoint: ``parsenet.out`` or ``<work_dir>/parsenet/parsenet.pt``."""
    return Path(cfg.parsenet.out) if cfg.parsenet.out else Path(cfg.work_dir) / "parsenet" / CHECKPOINT_NAME


def _or_none(value: float) -> float | None:
    """NaN (no IoU) as None: JSON has no NaN."""
    return float(value) if math.isfinite(value) else None


def run_job(cfg: Config, *, overrides_note: str = "", device: torch.device | str | None = None) -> dict[str, Any]:
    """The parse-net training job: data, one MLflow run, training, exported checkpoint.

    With ``data.url`` empty, trains on ``<work_dir>/shards``, generated with synthetic triplets
    when missing (as the reconstruction job does). MLflow: ``tracking.tracking_uri``, else
    ``MLFLOW_TRACKING_URI``, else SQLite under the work dir; experiment ``tracking.experiment``,
    run ``parsenet.run_name``; params = the flattened config, metrics ``train/*`` and
    ``val/iou_<class>``, ``val/miou``; the checkpoint is logged as an artifact too.

    Returns:
        The summary: ``status``, ``steps``, ``miou``, ``iou`` (class -> IoU, None when the class
        has none), ``pixel_acc``, ``checkpoint`` (local path), ``mlflow_run_id``, ...
    """
    from dfmvr import tracking
    from dfmvr.data.embedded import ensure_data

    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = apply_overrides(cfg, {"work_dir": str(work)})
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking, work)
    tracking.check_reachable(tracking_uri)
    data_url = ensure_data(cfg)
    cfg = apply_overrides(cfg, {"data.url": data_url})
    out = checkpoint_path(cfg)
    device = torch.device(device) if device is not None else default_device()

    experiment_id = tracking.setup_experiment(tracking_uri, cfg.tracking.experiment, work)
    mlc = tracking.client(tracking_uri)
    run_id = tracking.start_run(mlc, experiment_id, cfg.parsenet.run_name)
    status = "FAILED"
    try:
        tracking.log_params(mlc, run_id, flatten(cfg))
        tracking.set_tags(mlc, run_id, {"dfmvr.job": "parsenet", "dfmvr.data_url": data_url,
                                        "dfmvr.overrides": overrides_note, "dfmvr.device": str(device)})
        mlc.log_dict(run_id, tracking.redact_all(to_dict(cfg)), "config.json")
        _logger.info("MLflow run %s in %s", run_id, tracking.redact(tracking_uri))
        result = train_parsenet(cfg, device=device,
                                log_metrics=lambda m, step: tracking.log_metrics(mlc, run_id, m, step))
        iou = {name: result.val.get(f"val/iou_{name}", math.nan) for name in PARSE_CLASSES}
        meta = {
            "image_size": cfg.data.image_size,
            "classes": list(PARSE_CLASSES),
            "input": "RGB [N, 3, S, S] in [-1, 1] (uint8 / 127.5 - 1)",
            "steps": result.steps,
            "miou": result.val.get("val/miou", math.nan),
            "iou": {k: _or_none(v) for k, v in iou.items()},
            "data_url": tracking.redact(data_url),
            "mlflow_run_id": run_id,
            "config": tracking.redact_all(to_dict(cfg)),
        }
        save_parsenet(out, result.model.cpu(), meta)
        mlc.log_artifact(run_id, str(out), artifact_path="parsenet")
        status = "FINISHED"
    finally:
        tracking.end_run(mlc, run_id, status)
    return {
        "status": status,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "miou": _or_none(result.val.get("val/miou", math.nan)),
        "pixel_acc": _or_none(result.val.get("val/pixel_acc", math.nan)),
        "iou": {k: _or_none(v) for k, v in iou.items()},
        # the same views degraded as photos are (parsenet.robustness): the robustness figure
        "miou_photo": _or_none(result.val.get("val_photo/miou", math.nan)),
        "iou_photo": {k: _or_none(result.val.get(f"val_photo/iou_{k}", math.nan)) for k in PARSE_CLASSES},
        "val_samples": int(result.val.get("val/samples", 0)),
        "skipped_samples": result.skipped_samples,
        "checkpoint": str(out.resolve()),
        "use_with": f"model.parse_net={out.resolve()}",
        "shards": tracking.redact(data_url),
        "device": str(device),
        "mlflow_tracking_uri": tracking.redact(tracking_uri),
        "mlflow_run_id": run_id,
    }


__all__ = [
    "CHECKPOINT_NAME", "FLIP_CLASSES", "ParseTrainResult", "checkpoint_path", "class_iou", "confusion_matrix",
    "evaluate", "iou_metrics", "masked_views", "mean_iou", "parse_loss", "predict_masks", "random_hflip",
    "run_job", "train_parsenet",
]
