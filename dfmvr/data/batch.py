"""The typed batch the loader yields, and the collate function that builds it.

A DataLoader worker decodes each sample into a :class:`TripletItem` (NumPy arrays), batches
them with :func:`collate` and sends the :class:`Batch` to the training process.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch


@dataclass(kw_only=True, slots=True)
class TripletItem:
    """One decoded, transformed sample (worker side, NumPy)."""

    key: str
    subject: str
    images: np.ndarray
    """float32 [V, 3, S, S] in [-1, 1]."""
    masks: np.ndarray | None
    """uint8 [V, S, S] class ids (the pipeline's masks: the sample's own, or the parse net's from
    the mask cache), or None when the sample has none."""
    weights: np.ndarray
    """float32 [V, 1, S, S] photometric weights from ``masks`` (ones when there is no mask)."""
    lmk2d: np.ndarray
    """float32 [V, 68, 2] pixels at the model's image size."""
    yaw_deg: np.ndarray
    """float32 [V] nominal yaw per view (NaN when the sample does not say)."""
    lmk3d: np.ndarray | None = None
    """float32 [K, 3] decimetres."""
    coeffs: np.ndarray | None = None
    """float32 [C] true coefficients."""
    gt_vertices: np.ndarray | None = None
    """float32 [N, 3] ground-truth mesh vertices."""
    gt_faces: np.ndarray | None = None
    """int64 [F, 3] ground-truth mesh faces."""
    given_masks: np.ndarray | None = None
    """uint8 [V, S, S] the sample's own masks when ``masks`` are the parse net's and the loader was
    asked to keep them (validation's given-mask figure)."""


@dataclass(kw_only=True, slots=True)
class Batch:
    """A batch of triplets (views left, front, right).

    Optional per-sample entries are padded and come with a presence flag so that one batch can
    mix samples with and without them.
    """

    keys: list[str]
    """Sample keys ``{subject}-{capture}``, length B."""
    subjects: list[str]
    """Subject ids, length B."""
    images: torch.Tensor
    """float32 [B, V, 3, S, S] RGB in [-1, 1]."""
    masks: torch.Tensor
    """int64 [B, V, S, S] parsing classes 0..9 (zeros where ``has_masks`` is False): the masks
    the network reads and the losses use; whose they are, ``mask_source`` says."""
    has_masks: torch.Tensor
    """bool [B]."""
    weights: torch.Tensor
    """float32 [B, V, 1, S, S] photometric weight maps in (0, 1], from ``masks``."""
    lmk2d: torch.Tensor
    """float32 [B, V, 68, 2] pixels (x right, y down) at size S."""
    yaw_deg: torch.Tensor
    """float32 [B, V] nominal yaw of each view in degrees (NaN if unknown)."""
    lmk3d: torch.Tensor
    """float32 [B, K, 3] sparse 3D landmarks in decimetres, zero-padded to the largest K."""
    lmk3d_valid: torch.Tensor
    """bool [B, K]: which rows of ``lmk3d`` are real."""
    has_lmk3d: torch.Tensor
    """bool [B]."""
    coeffs: torch.Tensor
    """float32 [B, C] true coefficients (C = 0 when no sample has them)."""
    has_coeffs: torch.Tensor
    """bool [B]."""
    gt_vertices: list[torch.Tensor] | None = None
    """Per sample float32 [N_i, 3] (decimetres) or an empty [0, 3]; None unless loaded with ``with_gt``."""
    gt_faces: list[torch.Tensor] | None = None
    """Per sample int64 [F_i, 3] or an empty [0, 3]; None unless loaded with ``with_gt``."""
    mask_source: str = "given"
    """Whose ``masks`` are: ``given`` (the samples' own) or ``parse_net:<digest>`` (the parse net's,
    :mod:`dfmvr.data.parsed_masks`)."""
    given_masks: torch.Tensor | None = None
    """int64 [B, V, S, S] the samples' own masks beside the parse net's (zeros where
    ``has_given_masks`` is False), when the loader keeps them; else None."""
    has_given_masks: torch.Tensor | None = None
    """bool [B], with ``given_masks``."""
    skipped: int = 0
    """Bad samples the producing worker skipped since its previous batch (summed by the loader)."""
    extra: dict = field(default_factory=dict)
    """Room for callers; not touched by the loader."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def image_size(self) -> int:
        """Side ``S``."""
        return int(self.images.shape[-1])

    def _map(self, fn) -> "Batch":
        values = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, torch.Tensor):
                value = fn(value)
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                value = [fn(v) for v in value]
            values[spec.name] = value
        return Batch(**values)

    def select(self, index: list[int]) -> "Batch":
        """The samples at ``index`` (in that order), as a batch of their own."""
        idx = torch.as_tensor(index, dtype=torch.long)
        values = {}
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, torch.Tensor):  # every tensor field is batch-first
                value = value[idx]
            elif isinstance(value, list):
                value = [value[i] for i in index]
            values[spec.name] = value
        values["skipped"] = 0
        return Batch(**values)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy in pinned memory (DataLoader ``pin_memory=True`` calls this)."""
        return self._map(lambda t: t.pin_memory())


def _stack_optional(
    values: list[np.ndarray | None], dtype: torch.dtype, tail: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad variable-length optional arrays ``[L_i, *tail]`` to ``[B, L, *tail]`` with masks."""
    present = [v is not None for v in values]
    longest = max((len(v) for v in values if v is not None), default=0)
    out = torch.zeros((len(values), longest, *tail), dtype=dtype)
    valid = torch.zeros((len(values), longest), dtype=torch.bool)
    for i, value in enumerate(values):
        if value is not None:
            out[i, : len(value)] = torch.from_numpy(np.asarray(value))
            valid[i, : len(value)] = True
    return out, valid, torch.tensor(present, dtype=torch.bool)


def _stack_masks(masks: list[np.ndarray | None], views: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros((len(masks), views, size, size), dtype=torch.int64)
    for i, mask in enumerate(masks):
        if mask is not None:
            out[i] = torch.from_numpy(mask)
    return out, torch.tensor([m is not None for m in masks], dtype=torch.bool)


def collate(items: list[TripletItem], *, skipped: int = 0, with_gt: bool = False, mask_source: str = "given",
            keep_given: bool = False) -> Batch:
    """Stack decoded items into a :class:`Batch`.

    Args:
        items: at least one item, all of the same image size.
        skipped: bad samples to report with this batch.
        with_gt: keep the ground-truth meshes (as lists of tensors).
        mask_source: whose the items' ``masks`` are (:attr:`Batch.mask_source`).
        keep_given: carry the items' ``given_masks`` (:attr:`Batch.given_masks`).

    Returns:
        The batch (CPU tensors).
    """
    if not items:
        raise ValueError("collate: expected at least one item, got none")
    sizes = {item.images.shape for item in items}
    if len(sizes) != 1:
        raise ValueError(f"collate: items have different image shapes {sorted(sizes)}; resize before collating")
    batch_size = len(items)
    _, views, _, size, _ = (batch_size, *items[0].images.shape)
    masks, has_masks = _stack_masks([item.masks for item in items], views, size)
    given_masks = has_given = None
    if keep_given:
        given_masks, has_given = _stack_masks([item.given_masks for item in items], views, size)
    lmk3d, lmk3d_valid, has_lmk3d = _stack_optional([item.lmk3d for item in items], torch.float32, (3,))
    coeff_sizes = {len(item.coeffs) for item in items if item.coeffs is not None}
    if len(coeff_sizes) > 1:
        raise ValueError(f"collate: samples carry coefficient vectors of different lengths {sorted(coeff_sizes)}")
    coeffs, _, has_coeffs = _stack_optional([item.coeffs for item in items], torch.float32, ())
    gt_vertices = gt_faces = None
    if with_gt:
        gt_vertices = [
            torch.from_numpy(item.gt_vertices) if item.gt_vertices is not None else torch.zeros((0, 3))
            for item in items
        ]
        gt_faces = [
            torch.from_numpy(item.gt_faces) if item.gt_faces is not None else torch.zeros((0, 3), dtype=torch.int64)
            for item in items
        ]
    return Batch(
        keys=[item.key for item in items],
        subjects=[item.subject for item in items],
        images=torch.from_numpy(np.stack([item.images for item in items])),
        masks=masks,
        has_masks=has_masks,
        weights=torch.from_numpy(np.stack([item.weights for item in items])),
        lmk2d=torch.from_numpy(np.stack([item.lmk2d for item in items])),
        yaw_deg=torch.from_numpy(np.stack([item.yaw_deg for item in items])),
        lmk3d=lmk3d,
        lmk3d_valid=lmk3d_valid,
        has_lmk3d=has_lmk3d,
        coeffs=coeffs,
        has_coeffs=has_coeffs,
        gt_vertices=gt_vertices,
        gt_faces=gt_faces,
        mask_source=mask_source,
        given_masks=given_masks,
        has_given_masks=has_given,
        skipped=skipped,
    )


__all__ = ["Batch", "TripletItem", "collate"]
