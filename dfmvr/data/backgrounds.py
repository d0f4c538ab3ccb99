"""Procedural backgrounds for synthetic renders: flat colours, gradients and noise textures.

Everything is generated with numpy (and ``cv2.resize`` for smooth noise) from a
``numpy.random.Generator``, so a background is a pure function of its generator's state.
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = ("flat", "linear", "radial", "noise", "blend")


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour in [0, 1], biased away from the extremes so faces stay distinguishable."""
    return rng.uniform(0.05, 0.95, size=3)


def _smooth_noise(rng: np.random.Generator, size: int, octaves: int = 4) -> np.ndarray:
    """Multi-octave value noise in [0, 1]: ``[size, size]`` float64."""
    out = np.zeros((size, size), np.float64)
    total = 0.0
    for o in range(octaves):
        cells = 2 ** (o + 2)
        amp = 0.5 ** o
        grid = rng.random((cells, cells)).astype(np.float32)
        out += amp * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float64)
        total += amp
    out /= total
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-9)


def _linear(rng: np.random.Generator, size: int) -> np.ndarray:
    theta = rng.uniform(0.0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (xs - 0.5) * np.cos(theta) + (ys - 0.5) * np.sin(theta)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    a, b = _colour(rng), _colour(rng)
    return a * (1 - t[..., None]) + b * t[..., None]


def _radial(rng: np.random.Generator, size: int) -> np.ndarray:
    cx, cy = rng.uniform(0.0, 1.0, size=2)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    r = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    t = np.clip(r / max(r.max(), 1e-9), 0, 1)
    a, b = _colour(rng), _colour(rng)
    return a * (1 - t[..., None]) + b * t[..., None]


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    a, b = _colour(rng), _colour(rng)
    t = _smooth_noise(rng, size, octaves=int(rng.integers(2, 6)))
    return a * (1 - t[..., None]) + b * t[..., None]


def random_background(rng: np.random.Generator, size: int, kind: str | None = None) -> np.ndarray:
    """One background image.

    Args:
        rng: the generator to draw from (consumed deterministically).
        size: side in pixels.
        kind: one of :data:`KINDS`; ``None`` draws one uniformly.

    Returns:
        ``[size, size, 3]`` float32 RGB in [0, 1].
    """
    if kind is None:
        kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "flat":
        img = np.broadcast_to(_colour(rng), (size, size, 3))
    elif kind == "linear":
        img = _linear(rng, size)
    elif kind == "radial":
        img = _radial(rng, size)
    elif kind == "noise":
        img = _noise(rng, size)
    elif kind == "blend":
        w = _smooth_noise(rng, size, octaves=3)[..., None]
        img = _linear(rng, size) * (1 - w) + _noise(rng, size) * w
    else:
        raise ValueError(f"background kind: expected one of {list(KINDS)}, got {kind!r}")
    # a little per-pixel grain so flat areas are not perfectly flat (cameras are not)
    img = img + rng.normal(0.0, 0.01, size=(size, size, 3))
    return np.clip(img, 0.0, 1.0).astype(np.float32)
