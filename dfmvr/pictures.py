"""Pictures of a reconstruction at the resolution of what it is shown over.

The network sees 64 px crops (the tiny preset), but a user looks at the reconstruction over
their photo, which may be 4000 px wide. Scaling a 64 px render up gives a blocky smear next to
the photo, so the mesh is rendered again at the size it is shown at: the camera of
:mod:`dfmvr.render.camera` scales with the image side (focal and principal point in proportion),
so the same coefficients rendered at side ``T`` are the crop's picture ``T / S`` times finer,
and the photo -> crop matrix at ``T`` is the one at ``S`` times ``T / S``.

- :func:`render_views`: one capture's views rendered at any side.
- :func:`crisp_crops`: the views' crops at that side, warped again from the photos (or resized
  from the crops when there are no photos).
- :func:`photo_view_overlay`: one view's render over its photo at the photo's own resolution.
- :func:`photo_colors`: vertex colours sampled from the views where each vertex is seen best
  (the surface facing the camera, not hidden behind the nose): ``mesh_photo.ply``.

Pixel convention as :mod:`dfmvr.data.align`: pixel ``(i, j)`` is centred at ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from dfmvr.data.align import invert_similarity, transform_points, warp_back, warp_image
from dfmvr.facemodel import geometry
from dfmvr.render.camera import Camera

MAX_RENDER_SIDE = 1024
"""Largest side a view is rendered at (a face 1024 px across is finer than any screen shows it)."""
VISIBLE_DEPTH_DM = 0.05
"""A vertex counts as seen in a view when it is at most this far (decimetres, 5 mm) behind the
rendered surface at its pixel."""


def camera_at(camera: Camera, side: int) -> Camera:
    """``camera`` (at its own side) scaled to ``side`` pixels."""
    return Camera.at_size(side, focal_224=camera.focal * 224.0 / camera.image_size, distance=camera.distance,
                          znear=camera.znear, zfar=camera.zfar)


@torch.no_grad()
def render_views(model, posed: torch.Tensor, colors: torch.Tensor, side: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One capture's views rendered at ``side`` px.

    Args:
        model: the :class:`dfmvr.model.DFMVR` (its face model's triangles, its renderer and camera).
        posed: ``[V, N, 3]`` world-frame vertices per view; colors: ``[V, N, 3]`` in [0, 1].
        side: the square render's side.

    Returns:
        ``(image [V, T, T, 3] in [0, 1], cover [V, T, T] 0/1, depth [V, T, T])`` numpy arrays.
    """
    fm = model.face.model
    cam = camera_at(model.renderer.camera, side)
    r = model.renderer(posed.float(), fm.tri, colors.float().clamp(0, 1), camera=cam)
    return (r.image.permute(0, 2, 3, 1).cpu().numpy(), r.mask[:, 0].cpu().numpy(), r.depth.cpu().numpy())


def photo_side(matrix: np.ndarray, size: int) -> int:
    """Render side at which one crop pixel of ``matrix`` (photo -> crop at ``size``) is one photo
    pixel, at most :data:`MAX_RENDER_SIDE`."""
    scale = float(np.sqrt(abs(np.linalg.det(np.asarray(matrix, np.float64)[:, :2]))))  # crop px per photo px
    return int(min(MAX_RENDER_SIDE, max(size, round(size / max(scale, 1e-9)))))


def crisp_crops(images: np.ndarray, side: int, photos: list[np.ndarray] | None = None,
                matrices: np.ndarray | None = None) -> np.ndarray:
    """The views' crops at ``side`` px: warped again from the photos when there are photos (no
    upscaling blur), else the crops resized (``images``: uint8 ``[V, S, S, 3]``)."""
    size = images.shape[1]
    if photos is not None and matrices is not None:
        return np.stack([warp_image(np.asarray(p, np.uint8), m * (side / size), side) for p, m in zip(photos, matrices)])
    interp = cv2.INTER_LINEAR if side > size else cv2.INTER_AREA
    return np.stack([cv2.resize(v, (side, side), interpolation=interp) for v in images])


def photo_view_overlay(model, photo: np.ndarray, matrix: np.ndarray, posed: torch.Tensor, colors: torch.Tensor,
                       alpha: float = 0.6) -> tuple[np.ndarray, int]:
    """One view's render over its photo, rendered at the photo's resolution.

    Args:
        photo: uint8 ``[H, W, 3]``; matrix: ``[2, 3]`` photo -> crop at the model's size.
        posed, colors: ``[N, 3]`` the view's posed vertices and colours.

    Returns:
        ``(uint8 [H, W, 3], the render's side)``.
    """
    size = model.image_size
    side = photo_side(matrix, size)
    image, cover, _ = render_views(model, posed[None], colors[None], side)
    m_side = np.asarray(matrix, np.float64) * (side / size)
    render = warp_back(image[0].astype(np.float32), m_side, photo.shape)
    a = alpha * np.clip(warp_back(cover[0].astype(np.float32), m_side, photo.shape), 0, 1)[..., None]
    out = (1 - a) * photo.astype(np.float64) + a * np.clip(render, 0, 1) * 255
    return (out + 0.5).clip(0, 255).astype(np.uint8), side


def _sample(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear colours of ``image`` (uint8 ``[H, W, 3]``) at ``points [N, 2]`` (pixel convention
    above) -> float ``[N, 3]`` in [0, 1]."""
    xy = (np.asarray(points, np.float32) - 0.5).reshape(-1, 1, 2)
    out = cv2.remap(image, xy[..., 0], xy[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(-1, 3).astype(np.float64) / 255.0


@torch.no_grad()
def photo_colors(model, posed: torch.Tensor, views: list[np.ndarray], matrices: np.ndarray | None = None,
                 fallback: np.ndarray | None = None, sharpness: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Vertex colours sampled from the views.

    Each view votes for a vertex with weight ``cos(angle to its camera) ** sharpness`` where the
    vertex is seen (in front of the view's rendered surface, facing the camera); a vertex no
    view sees keeps ``fallback`` (e.g. the albedo).

    Args:
        posed: ``[V, N, 3]`` world-frame vertices per view.
        views: per view the picture to sample: photos (with ``matrices``, photo -> crop at the
            model's size) or the model's crops (uint8 ``[S, S, 3]``, ``matrices`` None).
        fallback: ``[N, 3]`` colours for unseen vertices (default mid grey).

    Returns:
        ``(colors [N, 3] in [0, 1], seen [N] bool)``.
    """
    fm = model.face.model
    size = model.image_size
    cam = model.renderer.camera
    v, n = posed.shape[:2]
    normals = geometry.vertex_normals(posed.float(), fm.tri)  # [V, N, 3]
    to_cam = torch.tensor([0.0, 0.0, cam.distance]) .to(posed) - posed
    cos = (normals * torch.nn.functional.normalize(to_cam, dim=-1)).sum(-1).clamp(min=0).cpu().numpy()  # [V, N]
    acc = np.zeros((n, 3))
    wsum = np.zeros(n)
    for i in range(v):
        m = None if matrices is None else np.asarray(matrices[i], np.float64)
        side = size if m is None else photo_side(m, size)
        _, cover, depth = render_views(model, posed[i:i + 1], torch.ones_like(posed[i:i + 1]), side)
        uv = cam.project(posed[i].float()).cpu().numpy() * (side / size)  # render pixels at ``side``
        px = np.clip(np.floor(uv).astype(int), 0, side - 1)
        surface = depth[0][px[:, 1], px[:, 0]]
        covered = cover[0][px[:, 1], px[:, 0]] > 0
        vertex_depth = cam.depth(posed[i].float()).cpu().numpy()
        seen = covered & (vertex_depth <= surface + VISIBLE_DEPTH_DM) & (cos[i] > 0)
        points = uv * (size / side) if m is None else transform_points(invert_similarity(m), uv * (size / side))
        w = np.where(seen, cos[i] ** sharpness, 0.0)
        acc += w[:, None] * _sample(np.asarray(views[i], np.uint8), points)
        wsum += w
    seen_any = wsum > 1e-6
    base = np.full((n, 3), 0.5) if fallback is None else np.asarray(fallback, np.float64)
    colors = np.where(seen_any[:, None], acc / np.maximum(wsum, 1e-12)[:, None], base)
    return colors.clip(0, 1), seen_any


__all__ = ["MAX_RENDER_SIDE", "camera_at", "crisp_crops", "photo_colors", "photo_side", "photo_view_overlay",
           "render_views"]
