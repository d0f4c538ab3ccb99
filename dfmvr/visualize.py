"""Pictures people look at, all in one place: validation grids (input | render | overlay with
landmarks), reconstruction overlays on crops and on the original photos, contact sheets, and
:func:`write_png`.

The drawing functions return uint8 RGB arrays ``[H, W, 3]``; :func:`write_png` writes one.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from dfmvr.inputs import to_uint8

TRUE_COLOR = (40, 220, 40)
PRED_COLOR = (230, 40, 40)
RENDER_ALPHA = 0.7
"""Opacity of the render over the input in overlays: the input must stay visible to judge the fit."""


def draw_landmarks(image: np.ndarray, points: np.ndarray | None, color, scale: float = 1.0,
                   radius: int = 1) -> np.ndarray:
    """Dots at ``points [K, 2]`` (pixels of the unscaled image) on a copy of ``image`` (None: no dots)."""
    out = image.copy()
    if points is None:
        return out
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
            inp = to_uint8(images[i, j])
            comp = render[i, j] * mask[i, j] + (images[i, j] + 1) / 2 * (1 - mask[i, j])
            comp = to_uint8(comp * 2 - 1)  # [0, 1] -> the model's range
            over = (0.5 * inp + 0.5 * comp).astype(np.uint8)
            up = lambda a: cv2.resize(a, (tile, tile), interpolation=cv2.INTER_NEAREST)  # noqa: E731
            over = draw_landmarks(up(over), view["lm_true"][i, j].numpy(), TRUE_COLOR, scale, 2)
            over = draw_landmarks(over, view["lm_pred"][i, j].numpy(), PRED_COLOR, scale, 2)
            tiles += [up(inp), up(comp), over]
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def label_strip(image: np.ndarray, text: str, height: int = 18) -> np.ndarray:
    """``image`` with a white strip above holding ``text``."""
    strip = np.full((height, image.shape[1], 3), 255, np.uint8)
    scale = height / 30
    cv2.putText(strip, text, (3, height - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, image], axis=0)


def blend_render(image: np.ndarray, render: np.ndarray, cover: np.ndarray) -> np.ndarray:
    """The render over the input where it covers: ``image [S, S, 3]`` uint8, ``render [S, S, 3]``
    in [0, 1], ``cover [S, S]`` in [0, 1] -> uint8 ``[S, S, 3]``."""
    alpha = RENDER_ALPHA * np.clip(cover, 0, 1)[..., None]
    out = (1 - alpha) * image.astype(np.float64) + alpha * np.clip(render, 0, 1) * 255
    return (out + 0.5).clip(0, 255).astype(np.uint8)


def view_tiles(image: np.ndarray, render: np.ndarray, cover: np.ndarray, lm_pred: np.ndarray,
               lm_true: np.ndarray | None, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input, overlay)`` tiles of side ``tile`` for one view: the render over the input with
    landmarks (given ones green, predicted red). Shapes as :func:`blend_render`, landmarks
    ``[68, 2]`` pixels at the view's size."""
    s = image.shape[0]
    scale = tile / s
    up = (lambda a: cv2.resize(a, (tile, tile), interpolation=cv2.INTER_LINEAR)) if tile != s else (lambda a: a.copy())
    radius = max(1, tile // 100)
    over = up(blend_render(image, render, cover))
    over = draw_landmarks(over, lm_true, TRUE_COLOR, scale, radius)
    over = draw_landmarks(over, lm_pred, PRED_COLOR, scale, radius)
    return up(image), over


def overlay_row(images: np.ndarray, renders: np.ndarray, covers: np.ndarray, lm_pred: np.ndarray,
                lm_true: np.ndarray | None = None, *, tile: int = 192, title: str = "") -> np.ndarray:
    """One capture: per view (left, front, right) input | render over input with landmarks.

    Args:
        images: uint8 ``[V, S, S, 3]``.
        renders: ``[V, S, S, 3]`` in [0, 1]; covers: ``[V, S, S]`` render coverage.
        lm_pred: ``[V, 68, 2]`` predicted landmarks, pixels; lm_true: given ones or None.
        tile: side of each tile in pixels.
        title: text in a strip above (empty: no strip).

    Returns:
        uint8 ``[tile (+ strip), 2 * V * tile, 3]``.
    """
    tiles = []
    for v in range(images.shape[0]):
        inp, over = view_tiles(images[v], renders[v], covers[v], lm_pred[v],
                               None if lm_true is None else lm_true[v], tile)
        tiles += [inp, over]
    row = np.concatenate(tiles, axis=1)
    return label_strip(row, title) if title else row


def contact_sheet(cells: list[tuple[str, np.ndarray]], *, columns: int = 3, cell_view: int = 96) -> np.ndarray:
    """A labelled grid: per capture its views' overlays side by side.

    Args:
        cells: ``(name, views)`` with ``views`` uint8 ``[V, S, S, 3]`` (render over input).
        columns: captures per row.
        cell_view: side of each view's thumbnail in pixels.

    Returns:
        uint8 ``[rows * (cell_view + 18), columns * V * cell_view, 3]`` (white where empty).
    """
    if not cells:
        raise ValueError("contact_sheet: expected at least one capture, got none")
    n_views = cells[0][1].shape[0]
    blocks = []
    for name, views in cells:
        thumbs = [cv2.resize(v, (cell_view, cell_view), interpolation=cv2.INTER_AREA) for v in views]
        block = label_strip(np.concatenate(thumbs, axis=1), name)
        block[:, -1] = 255  # a white line between neighbours
        blocks.append(block)
    blank = np.full_like(blocks[0], 255)
    while len(blocks) % columns:
        blocks.append(blank)
    rows = [np.concatenate(blocks[i:i + columns], axis=1) for i in range(0, len(blocks), columns)]
    sheet = np.concatenate(rows, axis=0)
    assert sheet.shape[1] == columns * n_views * cell_view
    return sheet


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write uint8 RGB ``[H, W, 3]`` as PNG (raises OSError naming the file when it cannot)."""
    path = Path(path)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")
    return path
