"""Pure-PyTorch triangle rasteriser: the ``torch`` backend (no compiled code, any device).

Semantics follow pytorch3d with ``blur_radius=0, faces_per_pixel=1, perspective_correct=True``:
a pixel is covered when its centre ``(j + 0.5, i + 0.5)`` lies inside a triangle's screen-space
projection; the nearest covering face wins (z-buffer); the attribute at the pixel is the
perspective-correct barycentric interpolation of the face's vertex attributes. Visibility is
piecewise constant, so gradients reach vertex positions and attributes only through the
barycentric weights (as in pytorch3d and nvdiffrast), never through coverage changes.

Cost scales with the pixels faces cover, not pixels x faces:

1. under ``no_grad``, every face's pixel bounding box is enumerated (vectorised with
   ``repeat_interleave``; chunked when the candidates exceed a budget, so huge triangles
   are rasterised exactly, never dropped or approximated);
2. barycentrics and depth are computed per candidate, candidates outside are discarded and a
   z-buffer keeps the nearest face per pixel with one ``scatter_reduce(amin)`` on a packed
   int64 key ``(float32 depth bits << 32) | face`` (positive floats order like their bits);
3. barycentrics are recomputed with autograd for the visible pixels only, from the
   differentiable screen-space vertices.

Barycentrics are perspective-correct: screen-space weights ``b_i`` become
``(b_i / z_i) / sum_j (b_j / z_j)``, and depth ``1 / sum_j (b_j / z_j)`` is the exact distance
along the view axis of the 3D point seen at the pixel centre.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

_logger = logging.getLogger(__name__)

DEFAULT_MAX_CANDIDATES = 1 << 22
"""(face, pixel) tests evaluated at once; bounds peak memory (about 20 bytes each)."""
DEFAULT_TILE = 8
"""Largest bounding-box side tested as one stencil; bigger boxes are cut into tiles this size."""

_EMPTY_KEY = torch.iinfo(torch.int64).max
_FACE_BITS = 32
_INSIDE_EPS = 1e-6
"""Barycentric slack (float32 rounding) so pixel centres exactly on a shared edge are never lost."""


@dataclass(slots=True)
class Fragments:
    """The visible surface, stored sparsely over the covered pixels only (``P`` of them).

    Args:
        pix_to_face: ``[B, H, W]`` long, index (``0..F-1``) of the visible face; -1 where empty.
        pixel_index: ``[P]`` long, flat index into ``B * H * W`` of each covered pixel.
        face_index: ``[P]`` long, the visible face at each covered pixel.
        vert_index: ``[P, 3]`` long, that face's vertices as flat indices into ``B * N``
            (vertex ``n`` of mesh ``b`` is ``b * N + n``), ready to gather vertex attributes.
        bary: ``[P, 3]`` perspective-correct barycentric weights, differentiable w.r.t. the
            screen-space vertices.
        depth: ``[P]`` distance from the camera along the view axis, differentiable.
    """

    pix_to_face: torch.Tensor
    pixel_index: torch.Tensor
    face_index: torch.Tensor
    vert_index: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor


def rasterize(screen: torch.Tensor, tri: torch.Tensor, image_size: int, *, znear: float, zfar: float,
              max_candidates: int = DEFAULT_MAX_CANDIDATES, tile: int = DEFAULT_TILE) -> Fragments:
    """Rasterise a batch of meshes sharing one topology.

    Args:
        screen: ``[B, N, 3]`` screen-space vertices: pixel x (right), pixel y (down), depth
            (distance from the camera along the view axis). Gradients flow into it.
        tri: ``[F, 3]`` long vertex indices.
        image_size: square image side ``S`` in pixels.
        znear, zfar: faces with any vertex depth outside ``[znear, zfar]`` are dropped.
        max_candidates: pixel tests per chunk (bounds memory; results do not depend on it).
        tile: bounding boxes up to ``tile x tile`` pixels are tested whole, larger ones in
            tiles of that size (speed only; results do not depend on it).

    Returns:
        :class:`Fragments` for ``H = W = S``.
    """
    batch, n_verts, _ = screen.shape
    pix_to_face = _visible_faces(screen.detach(), tri, image_size, znear, zfar, max_candidates, tile)

    flat = pix_to_face.view(-1)
    pixel_index = (flat >= 0).nonzero().squeeze(1)
    face_index = flat[pixel_index]
    hw = image_size * image_size
    image_of_pixel = torch.div(pixel_index, hw, rounding_mode="floor")
    within = pixel_index - image_of_pixel * hw
    py = torch.div(within, image_size, rounding_mode="floor")
    px = within - py * image_size

    # Only the visible pixels go through autograd: their faces' vertices, gathered from the
    # differentiable screen-space positions.
    vert_index = tri[face_index] + (image_of_pixel * n_verts).unsqueeze(1)  # [P, 3]
    corners = screen.reshape(batch * n_verts, 3)[vert_index.view(-1)].view(-1, 3, 3)
    dtype = screen.dtype
    b1, b2 = _screen_barycentrics(corners[:, :, 0], corners[:, :, 1],
                                  px.to(dtype) + 0.5, py.to(dtype) + 0.5)
    screen_bary = torch.stack([1.0 - b1 - b2, b1, b2], dim=1)
    weights = screen_bary / corners[:, :, 2]
    inv_depth = weights.sum(dim=1)
    bary = weights / inv_depth.unsqueeze(1)
    return Fragments(pix_to_face=pix_to_face, pixel_index=pixel_index, face_index=face_index,
                     vert_index=vert_index, bary=bary, depth=1.0 / inv_depth)


def _screen_barycentrics(x: torch.Tensor, y: torch.Tensor, px: torch.Tensor,
                         py: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Screen-space weights of vertices 1 and 2 at points ``(px, py)``; ``x, y``: ``[P, 3]``.

    Expressed relative to vertex 0 so small triangles far from the origin keep their precision
    in float32 (an ``a x + b y + c`` edge equation cancels catastrophically there).
    """
    e1x, e1y = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
    e2x, e2y = x[:, 2] - x[:, 0], y[:, 2] - y[:, 0]
    dx, dy = px - x[:, 0], py - y[:, 0]
    area = e1x * e2y - e1y * e2x
    return (dx * e2y - dy * e2x) / area, (e1x * dy - e1y * dx) / area


@torch.no_grad()
def _visible_faces(screen: torch.Tensor, tri: torch.Tensor, size: int, znear: float, zfar: float,
                   max_candidates: int, tile: int) -> torch.Tensor:
    """Z-buffer pass: ``[B, S, S]`` index of the nearest face covering each pixel centre, or -1.

    Faces are grouped by the exact shape ``(rows, cols)`` of their pixel bounding box and each
    group is tested as one dense ``[faces, rows, cols]`` stencil: no wasted candidates, no
    per-candidate gathers or divisions. Boxes larger than ``tile`` on a side are cut into
    ``tile x tile`` pieces that join those groups, so large triangles are rasterised exactly
    by the same code.
    """
    batch, n_verts, _ = screen.shape
    n_faces = tri.shape[0]
    device = screen.device
    zbuf = torch.full((batch * size * size,), _EMPTY_KEY, dtype=torch.int64, device=device)

    corners = screen.index_select(1, tri.view(-1)).view(batch * n_faces, 3, 3)
    x, y, z = corners.unbind(-1)  # [B*F, 3] each
    # Pixel (i, j) has its centre at (j + 0.5, i + 0.5): centres inside [lo, hi] are
    # j = ceil(lo - 0.5) .. floor(hi - 0.5).
    col0 = (x.amin(-1) - 0.5).ceil().clamp(0, size)
    col1 = (x.amax(-1) - 0.5).floor().clamp(-1, size - 1)
    row0 = (y.amin(-1) - 0.5).ceil().clamp(0, size)
    row1 = (y.amax(-1) - 0.5).floor().clamp(-1, size - 1)
    ncol = (col1 - col0 + 1).long()
    nrow = (row1 - row0 + 1).long()

    # Barycentrics of vertices 1 and 2 at pixel centre (col0 + c + 0.5, row0 + r + 0.5), written
    # relative to vertex 0 so float32 keeps its precision anywhere in the image:
    # b1 = base1 + c * a - r * b, b2 = base2 + r * e - c * d, b0 = 1 - b1 - b2.
    e1x, e1y = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
    e2x, e2y = x[:, 2] - x[:, 0], y[:, 2] - y[:, 0]
    area = e1x * e2y - e1y * e2x
    inv_area = 1.0 / area
    a, b, e, d = e2y * inv_area, e2x * inv_area, e1x * inv_area, e1y * inv_area
    ox, oy = col0 + 0.5 - x[:, 0], row0 + 0.5 - y[:, 0]
    base1 = ox * a - oy * b
    base2 = oy * e - ox * d
    bary = torch.stack([
        torch.stack([1.0 - base1 - base2, d - a, b - e], dim=1),  # value at the box corner, per col, per row
        torch.stack([base1, a, -b], dim=1),
        torch.stack([base2, -d, e], dim=1),
    ], dim=1)  # [B*F, 3 (vertex), 3]
    # 1 / depth is affine in screen space too (that is what makes perspective-correct
    # interpolation work), so it gets the same (corner, per col, per row) form.
    inv_depth = (bary * (1.0 / z).unsqueeze(2)).sum(1, keepdim=True)
    table = torch.cat([bary, inv_depth], dim=1).view(-1, 12)  # 4 affine channels

    ok = ((z >= znear) & (z <= zfar)).all(-1) & (area != 0) & area.isfinite() & (ncol > 0) & (nrow > 0)
    image = torch.div(torch.arange(batch * n_faces, device=device), n_faces, rounding_mode="floor")
    face_id = torch.arange(n_faces, device=device).repeat(batch)
    origin = image * (size * size) + row0.long() * size + col0.long()
    small = ok & (ncol <= tile) & (nrow <= tile)
    outside_key = tile * tile  # shape key of faces not rasterised in this pass
    shape_key = torch.where(small, (nrow - 1) * tile + (ncol - 1), outside_key)
    _stencil_pass(zbuf, table, origin, face_id, shape_key, tile, size, max_candidates)

    big = (ok & ~small).nonzero().squeeze(1)
    if big.numel() > 0:
        _tile_pass(zbuf, table[big], origin[big], face_id[big], ncol[big], nrow[big], tile, size,
                   max_candidates)
    pix_to_face = torch.where(zbuf == _EMPTY_KEY, -1, zbuf & ((1 << _FACE_BITS) - 1))
    return pix_to_face.view(batch, size, size)


def _tile_pass(zbuf: torch.Tensor, table: torch.Tensor, origin: torch.Tensor, face_id: torch.Tensor,
               ncol: torch.Tensor, nrow: torch.Tensor, tile: int, size: int, max_candidates: int) -> None:
    """Cut bounding boxes larger than ``tile`` into ``tile x tile`` pieces and rasterise those."""
    tiles_c = torch.div(ncol + tile - 1, tile, rounding_mode="floor")
    tiles_r = torch.div(nrow + tile - 1, tile, rounding_mode="floor")
    n_tiles = tiles_c * tiles_r
    owner = torch.repeat_interleave(torch.arange(n_tiles.numel(), device=zbuf.device), n_tiles)
    k = torch.arange(owner.numel(), device=zbuf.device) - (n_tiles.cumsum(0) - n_tiles)[owner]
    tr = torch.div(k, tiles_c[owner], rounding_mode="floor")
    tc = k - tr * tiles_c[owner]
    step_c, step_r = tc * tile, tr * tile
    t = table[owner]
    for col in (0, 3, 6, 9):  # shift each affine channel to the tile's corner pixel
        t[:, col] += step_c.to(t.dtype) * t[:, col + 1] + step_r.to(t.dtype) * t[:, col + 2]
    rows = torch.clamp(nrow[owner] - step_r, max=tile)
    cols = torch.clamp(ncol[owner] - step_c, max=tile)
    shape_key = (rows - 1) * tile + (cols - 1)
    _stencil_pass(zbuf, t, origin[owner] + step_r * size + step_c, face_id[owner], shape_key, tile, size,
                  max_candidates)


def _stencil_pass(zbuf: torch.Tensor, table: torch.Tensor, origin: torch.Tensor, face_id: torch.Tensor,
                  shape_key: torch.Tensor, tile: int, size: int, max_candidates: int) -> None:
    """Sort boxes by shape (``shape_key = (rows-1) * tile + cols-1``; ``tile**2`` = skip) and
    test each shape group, at most ``max_candidates`` pixels at a time."""
    group_sizes = torch.bincount(shape_key, minlength=tile * tile + 1)[: tile * tile].tolist()
    n_active = sum(group_sizes)
    if n_active == 0:
        return
    order = torch.sort(shape_key, stable=True).indices[:n_active]
    table = table.index_select(0, order)
    origin, face_id = origin.index_select(0, order), face_id.index_select(0, order)
    start = 0
    for key, n in enumerate(group_sizes):
        rows, cols = key // tile + 1, key % tile + 1
        per_chunk = max(1, max_candidates // (rows * cols))
        for lo in range(start, start + n, per_chunk):
            hi = min(start + n, lo + per_chunk)
            _stencil(zbuf, table[lo:hi], origin[lo:hi], face_id[lo:hi], rows, cols, size)
        start += n


def _stencil(zbuf: torch.Tensor, table: torch.Tensor, origin: torch.Tensor, face_id: torch.Tensor,
             rows: int, cols: int, size: int) -> None:
    """Test ``[n, rows, cols]`` pixel centres against ``n`` faces; fold the inside ones into ``zbuf``."""
    cv = torch.arange(cols, dtype=table.dtype, device=table.device)
    rv = torch.arange(rows, dtype=table.dtype, device=table.device).unsqueeze(1)
    # channel k at pixel (r, c) of each box: corner + c * per_col + r * per_row, [n, rows, cols]
    values = [(table[:, k, None] + table[:, k + 1, None] * cv)[:, None, :] + table[:, k + 2, None, None] * rv
              for k in (0, 3, 6, 9)]
    inside = (values[0] >= -_INSIDE_EPS) & (values[1] >= -_INSIDE_EPS) & (values[2] >= -_INSIDE_EPS)
    keep = inside.view(-1).nonzero().squeeze(1)
    if keep.numel() == 0:
        return
    cells = rows * cols
    face = torch.div(keep, cells, rounding_mode="floor")
    cell = keep - face * cells
    drow = torch.div(cell, cols, rounding_mode="floor")
    pixel = origin.index_select(0, face) + drow * (size - cols) + cell
    depth = 1.0 / values[3].reshape(-1).index_select(0, keep)
    # Positive float32 values order like their int32 bit patterns, so one int64 amin picks the
    # nearest depth and, on exact ties, the lowest face index (as pytorch3d does).
    bits = depth.float().view(torch.int32).to(torch.int64)
    key = (bits << _FACE_BITS) | face_id.index_select(0, face)
    zbuf.scatter_reduce_(0, pixel, key, reduce="amin", include_self=True)
