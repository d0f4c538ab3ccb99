"""Input preparation, the one place where user pictures become model input.

uint8 RGB views (any square side) are checked and resized to the model's side
(:func:`prepare_view`), then turned into the model's range (:func:`to_model_tensor`: ``[B, V, 3, S,
S]`` float in [-1, 1], as :func:`dfmvr.data.transforms.to_model_range` does for the shards); masks
stay class ids. Views without masks get them from the model's parse net
(:meth:`dfmvr.serving.Reconstructor.make_masks`). :func:`to_uint8` goes back for pictures.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from dfmvr.data.shards import N_CLASSES
from dfmvr.data.transforms import to_model_range


class CaptureError(ValueError):
    """A capture cannot be used; the message names its folder or file and the problem."""


def prepare_view(image: np.ndarray, size: int, source: str, *, mask: bool = False) -> np.ndarray:
    """Check one view (or mask) and bring it to ``size`` x ``size``.

    Args:
        image: uint8 ``[H, W, 3]`` RGB (``[H, W]`` grey and ``[H, W, 4]`` RGBA are accepted and
            converted) or, with ``mask``, uint8 ``[H, W]`` classes 0..9.
        size: the model's side ``S``.
        source: file name for messages.

    Returns:
        uint8 ``[S, S, 3]`` (or ``[S, S]`` for a mask).

    Raises:
        CaptureError: not uint8, not square, wrong channels, or mask classes outside 0..9.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise CaptureError(f"{source}: expected 8-bit pixels, got {image.dtype}")
    if mask:
        if image.ndim == 3 and image.shape[2] in (3, 4) and (image[..., :3] == image[..., :1]).all():
            image = image[..., 0]
        if image.ndim != 2:
            raise CaptureError(f"{source}: a mask must be a single-channel class map, got shape {list(image.shape)}")
        if image.size and int(image.max()) >= N_CLASSES:
            raise CaptureError(f"{source}: mask holds class {int(image.max())}, expected 0..{N_CLASSES - 1}")
    else:
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        if image.ndim != 3 or image.shape[2] != 3:
            raise CaptureError(f"{source}: expected an RGB image, got shape {list(image.shape)}")
    h, w = image.shape[:2]
    if h != w:
        raise CaptureError(f"{source}: image is {w} x {h} px; expected a square face-aligned crop (as in the "
                           f"shards), which is resized to the model's {size} x {size}")
    if h == size:
        return np.ascontiguousarray(image)
    if mask:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if h > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def prepare_capture(views, masks, size: int, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Three views (left, front, right; uint8, any square side) and optionally their three masks
    -> uint8 ``[3, S, S, 3]`` and int64 ``[3, S, S]`` (or None), each checked by :func:`prepare_view`.

    Raises:
        CaptureError: a view or mask that is not a square 8-bit image, or not three of them.
    """
    names = ("left", "front", "right")
    if len(views) != 3 or (masks is not None and len(masks) != 3):
        raise CaptureError(f"{source}: expected 3 views (and 0 or 3 masks: left, front, right), got "
                           f"{len(views)} and {0 if masks is None else len(masks)}")
    images = np.stack([prepare_view(v, size, f"{source} {n} view") for n, v in zip(names, views)])
    if masks is None:
        return images, None
    return images, np.stack([prepare_view(m, size, f"{source} {n} mask", mask=True)
                             for n, m in zip(names, masks)]).astype(np.int64)


def to_model_tensor(views: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, V, S, S, 3]`` (as :func:`prepare_view` makes them) -> float32 ``[B, V, 3, S, S]`` in [-1, 1]."""
    views = np.asarray(views)
    return torch.from_numpy(np.stack([to_model_range(v) for v in views]))


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model-range images ``[..., 3, S, S]`` in [-1, 1] -> uint8 ``[..., S, S, 3]`` (for pictures and files)."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    return ((np.moveaxis(x, -3, -1) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


__all__ = ["CaptureError", "prepare_capture", "prepare_view", "to_model_tensor", "to_uint8"]
