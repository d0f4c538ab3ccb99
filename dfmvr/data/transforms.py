"""Per-sample transforms run in DataLoader workers: weight maps, resizing, colour jitter.

All functions work on NumPy arrays (OpenCV does the pixel work) and are deterministic given
their inputs and ``rng``; the loader turns their outputs into tensors in
:func:`dfmvr.data.batch.collate`.

Photometric weight maps (paper Fig. 4; docs/design.md "Weight map")
--------------------------------------------------------------------
``kind="paper"`` (default):
    the face (every non-background class, 1..9) is dilated by ``20 * S / 224`` pixels
    (Euclidean distance, so "dilated by r" means every pixel within r pixels of the face);
    feature classes 2..9 (brows, eyes, nose, mouth, lips) get 254, the rest of the dilated
    face 128, everything else 32; the map is divided by 255.
``kind="reference"``:
    the reference implementation's variant: only the feature classes 2..9 are dilated, with a
    square ``k x k`` kernel, ``k = round(10 * S / 224)`` (OpenCV's anchor sits at the kernel
    centre, ``(k/2, k/2)``, so an even kernel grows a region ``k/2 - 1`` pixels up/left and
    ``k/2`` pixels down/right: 4 and 5 at 224 px);
    the dilated features get 0.99, the rest of the face (classes 1..9) 0.5, background 0.25.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

WEIGHT_MAP_KINDS = ("paper", "reference")
FEATURE_CLASSES = tuple(range(2, 10))
"""Parsing classes weighted as facial features (brows, eyes, nose, mouth, lips)."""

PAPER_LEVELS = (254 / 255, 128 / 255, 32 / 255)
"""Paper weight levels: features, rest of the dilated face, background."""
REFERENCE_LEVELS = (0.99, 0.5, 0.25)
"""Reference-code weight levels: dilated features, rest of the face, background."""
PAPER_DILATION_PX = 20.0
"""Face dilation radius at 224 px (paper)."""
REFERENCE_KERNEL_PX = 10
"""Feature dilation kernel side at 224 px (reference code)."""
REFERENCE_SIZE = 224


def _as_class_map(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype.kind not in "iu":
        raise ValueError(f"weight_map: mask must hold integer class ids 0..9, got dtype {mask.dtype}")
    if mask.ndim < 2 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"weight_map: mask must be [..., S, S], got shape {list(mask.shape)}")
    return mask


def _weight_map_one(mask: np.ndarray, kind: str) -> np.ndarray:
    size = mask.shape[-1]
    features = (mask >= FEATURE_CLASSES[0]) & (mask <= FEATURE_CLASSES[-1])
    face = mask > 0
    if kind == "paper":
        feature_level, face_level, background_level = PAPER_LEVELS
        radius = PAPER_DILATION_PX * size / REFERENCE_SIZE
        if face.any():
            # Distance from every pixel to the nearest face pixel (0 on the face itself).
            distance = cv2.distanceTransform((~face).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            dilated = distance <= radius
        else:
            dilated = face
        weights = np.full(mask.shape, background_level, dtype=np.float32)
        weights[dilated] = face_level
        weights[features] = feature_level
        return weights
    feature_level, face_level, background_level = REFERENCE_LEVELS
    side = max(1, int(round(REFERENCE_KERNEL_PX * size / REFERENCE_SIZE)))
    dilated = cv2.dilate(features.astype(np.uint8), np.ones((side, side), np.uint8)).astype(bool)
    weights = np.full(mask.shape, background_level, dtype=np.float32)
    weights[face] = face_level
    weights[dilated] = feature_level
    return weights


def weight_map(mask: np.ndarray, kind: str = "paper") -> np.ndarray:
    """Photometric loss weights from a parsing mask (see the module docstring for both kinds).

    Args:
        mask: integer class map ``[S, S]`` or ``[..., S, S]`` (e.g. ``[V, S, S]``), classes 0..9.
        kind: ``"paper"`` or ``"reference"``.

    Returns:
        float32 weights in (0, 1], same shape as ``mask``.
    """
    if kind not in WEIGHT_MAP_KINDS:
        raise ValueError(f"weight_map: kind must be one of {WEIGHT_MAP_KINDS}, got {kind!r}")
    mask = _as_class_map(mask)
    if mask.ndim == 2:
        return _weight_map_one(mask, kind)
    flat = mask.reshape(-1, *mask.shape[-2:])
    return np.stack([_weight_map_one(m, kind) for m in flat]).reshape(mask.shape)


def resize_views(
    images: np.ndarray,
    masks: np.ndarray | None,
    lmk2d: np.ndarray,
    size: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Resize every view to ``size`` x ``size`` and scale the landmarks with it.

    Pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``, so continuous landmark coordinates scale by
    exactly ``size / S``.

    Args:
        images: uint8 ``[V, S, S, 3]``.
        masks: uint8 ``[V, S, S]`` class maps (nearest-neighbour resampling keeps them classes) or None.
        lmk2d: float32 ``[V, 68, 2]`` pixels.
        size: target side.

    Returns:
        ``(images [V, size, size, 3], masks [V, size, size] or None, lmk2d [V, 68, 2])``.
    """
    current = images.shape[1]
    if current == size:
        return images, masks, lmk2d
    images = np.stack([resize_image(view, size) for view in images])
    lmk2d = (lmk2d * (size / current)).astype(np.float32)
    return images, resize_masks(masks, size), lmk2d


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> ``[size, size, 3]``: area averaging when shrinking, bilinear when growing."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrinking = size < min(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def resize_masks(masks: np.ndarray | None, size: int) -> np.ndarray | None:
    """uint8 class maps ``[V, S, S]`` resized to ``size`` by nearest neighbour (they stay classes).

    OpenCV's ``INTER_NEAREST_EXACT`` samples each output pixel's centre, as the area-averaged
    image's pixels are centred; plain ``INTER_NEAREST`` takes each output pixel's top-left source
    pixel, which shifts a map shrunk by ``k`` by ``(k - 1) / 2`` source pixels against its image."""
    if masks is None or masks.shape[-1] == size:
        return masks
    return np.stack([cv2.resize(view, (size, size), interpolation=cv2.INTER_NEAREST_EXACT) for view in masks])


_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]], dtype=np.float64
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
_LUMA = _RGB_TO_YIQ[0]
HUE_TURNS_PER_STRENGTH = 0.1
"""Largest hue rotation at strength 1, in turns (0.1 turn = 36 degrees)."""


def color_jitter_matrix(strength: float, rng: np.random.Generator, mean_luma: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw one colour transform ``rgb' = A @ rgb + t`` (brightness, contrast, saturation, hue).

    Factors are drawn uniformly: brightness, contrast and saturation in ``[max(0, 1 - s), 1 + s]``,
    hue rotation (about the grey axis in YIQ space) in ``+-0.1 * s`` turns.

    Args:
        strength: ``s`` >= 0.
        rng: random generator.
        mean_luma: mean luminance (0..1) the contrast change pivots about.

    Returns:
        ``A`` float32 ``[3, 3]`` and ``t`` float32 ``[3]`` for RGB in 0..1.
    """
    low = max(0.0, 1.0 - strength)
    brightness, contrast, saturation = rng.uniform(low, 1.0 + strength, size=3)
    angle = rng.uniform(-1.0, 1.0) * HUE_TURNS_PER_STRENGTH * strength * 2.0 * math.pi
    cos, sin = math.cos(angle), math.sin(angle)
    hue = _YIQ_TO_RGB @ np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]]) @ _RGB_TO_YIQ
    grey = np.outer(np.ones(3), _LUMA)
    saturate = saturation * np.eye(3) + (1.0 - saturation) * grey
    # brightness, then contrast about the (brightened) mean grey, then saturation, then hue
    matrix = hue @ saturate @ (contrast * brightness * np.eye(3))
    offset = hue @ saturate @ np.full(3, (1.0 - contrast) * brightness * mean_luma)
    return matrix.astype(np.float32), offset.astype(np.float32)


def color_jitter(images: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Apply ONE random colour transform to every view (the three views stay consistent).

    The transform is a per-pixel affine map of RGB, so the same input colour becomes the same
    output colour in every view; the contrast pivot is the mean luminance over all views.

    Args:
        images: float32 ``[V, H, W, 3]`` RGB in 0..1.
        strength: 0 returns ``images`` unchanged.
        rng: random generator (one draw per call).

    Returns:
        float32 ``[V, H, W, 3]`` in 0..1.
    """
    if strength <= 0:
        return images
    mean_luma = float(images.reshape(-1, 3).mean(axis=0) @ _LUMA)
    matrix, offset = color_jitter_matrix(strength, rng, mean_luma)
    out = images.reshape(-1, 3) @ matrix.T + offset
    return np.clip(out, 0.0, 1.0, out=out).reshape(images.shape).astype(np.float32, copy=False)


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 ``[V, S, S, 3]`` (or float 0..1) RGB -> float32 ``[V, 3, S, S]`` in [-1, 1]."""
    if images.dtype == np.uint8:
        out = images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    else:
        out = images.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


__all__ = [
    "FEATURE_CLASSES",
    "PAPER_LEVELS",
    "REFERENCE_LEVELS",
    "WEIGHT_MAP_KINDS",
    "color_jitter",
    "color_jitter_matrix",
    "resize_views",
    "to_model_range",
    "weight_map",
]
