"""Pictures people look at: input | render | overlay grids with landmarks.

All functions return uint8 RGB arrays ``[H, W, 3]``; writing them is the caller's business.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

TRUE_COLOR = (40, 220, 40)
PRED_COLOR = (230, 40, 40)


def to_uint8(image: torch.Tensor, *, signed: bool) -> np.ndarray:
    """``[3, S, S]`` float (in [-1, 1] when ``signed`` else [0, 1]) -> ``[S, S, 3]`` uint8."""
    x = image.detach().float().cpu()
    if signed:
        x = (x + 1) / 2
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def draw_landmarks(image: np.ndarray, points: np.ndarray, color, scale: float = 1.0, radius: int = 1) -> np.ndarray:
    """Dots at ``points [K, 2]`` (pixels of the unscaled image) on a copy of ``image``."""
    out = image.copy()
    for x, y in np.asarray(points, dtype=np.float64) * scale:
        if np.isfinite(x) and np.isfinite(y):
            cv2.circle(out, (int(round(x)), int(round(y))), radius, color, -1, lineType=cv2.LINE_AA)
    return out


def validation_grid(view: dict, tile: int = 160) -> np.ndarray:
    """Rows: samples; per view three tiles: input | render over input | overlay with landmarks
    (true green, predicted red).

    Args:
        view: ``images [b, V, 3, S, S]`` in [-1, 1], ``render [b, V, 3, S, S]`` in [0, 1],
            ``render_mask [b, V, 1, S, S]``, ``lm_pred``/``lm_true [b, V, 68, 2]`` pixels.
        tile: side of each tile in the grid, pixels.
    """
    images, render, mask = view["images"], view["render"], view["render_mask"]
    b, v, _, s, _ = images.shape
    scale = tile / s
    rows = []
    for i in range(b):
        tiles = []
        for j in range(v):
            inp = to_uint8(images[i, j], signed=True)
            comp = render[i, j] * mask[i, j] + (images[i, j] + 1) / 2 * (1 - mask[i, j])
            comp = to_uint8(comp, signed=False)
            over = (0.5 * inp + 0.5 * comp).astype(np.uint8)
            up = lambda a: cv2.resize(a, (tile, tile), interpolation=cv2.INTER_NEAREST)  # noqa: E731
            over = draw_landmarks(up(over), view["lm_true"][i, j].numpy(), TRUE_COLOR, scale, 2)
            over = draw_landmarks(over, view["lm_pred"][i, j].numpy(), PRED_COLOR, scale, 2)
            tiles += [up(inp), up(comp), over]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)
