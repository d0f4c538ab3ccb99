"""Pure-PyTorch triangle rasteriser: the ``torch`` backend (no compiled code, any device).

Semantics follow pytorch3d with ``blur_radius=0, faces_per_pixel=1, perspective_correct=True``:
a pixel is covered when its centre ``(j + 0.5, i + 0.5)`` lies inside a triangle's screen-space
projection; the nearest covering face wins (z-buffer); the attribute at the pixel is the
perspective-correct barycentric interpolation of the face's vertex attributes. Visibility is
piecewise constant, so gradients reach vertex positions and attributes only through the
barycentric weights (as in pytorch3d and nvdiffrast), never through coverage changes.

Cost scales with the pixels faces cover (their bounding boxes), not pixels x faces:

1. under ``no_grad``, faces are sorted by the exact shape ``(rows, cols)`` of their pixel
   bounding box; each shape group is one dense ``[rows, cols, faces]`` evaluation of the
   barycentric and 1/depth channels, which are affine in screen space (faces innermost, so
   every operation runs over long contiguous rows; no per-candidate gathers or divisions).
   Boxes larger than ``tile`` pixels on a side are cut into tiles that join those groups and
   groups are chunked at ``max_candidates`` pixel tests, so large triangles are rasterised
   exactly (never dropped or approximated) in bounded memory;
2. pixel centres outside are discarded and a z-buffer keeps the nearest face per pixel with
   one ``scatter_reduce(amin)`` per group on a packed int64 key
   ``(float32 depth bits << 32) | face`` (positive floats order like their bit patterns);
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
    face_index = flat.index_select(0, pixel_index)
    hw = image_size * image_size
    image_of_pixel = torch.div(pixel_index, hw, rounding_mode="floor")
    within = pixel_index - image_of_pixel * hw
    py = torch.div(within, image_size, rounding_mode="floor")
    px = within - py * image_size

    # Only the visible pixels go through autograd: their faces' vertices, gathered from the
    # differentiable screen-space positions.
    vert_index = tri.index_select(0, face_index) + (image_of_pixel * n_verts).unsqueeze(1)  # [P, 3]
    corners = screen.reshape(batch * n_verts, 3).index_select(0, vert_index.view(-1)).view(-1, 3, 3)
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

    Faces are sorted by the exact shape ``(rows, cols)`` of their pixel bounding box and each
    shape group is tested as one dense ``[rows, cols, faces]`` stencil (faces innermost, so
    every operation runs over long contiguous rows): no per-pixel gathers or divisions, no
    candidates outside a face's box. Boxes larger than ``tile`` on a side are cut into
    ``tile x tile`` pieces that join those groups, so large triangles are rasterised exactly
    by the same code.
    """
    batch, n_verts, _ = screen.shape
    n_faces = tri.shape[0]
    device = screen.device
    zbuf = torch.full((batch * size * size,), _EMPTY_KEY, dtype=torch.int64, device=device)
    coords = screen.reshape(-1, 3).T.contiguous()  # [3, B*N]: x, y, depth rows
    # vertex v of face f in mesh b, as a flat index into B*N; face columns ordered b * F + f
    offsets = torch.arange(batch, device=device) * n_verts
    vid = (tri.T.unsqueeze(1) + offsets.view(1, -1, 1)).reshape(3, -1).contiguous()  # [3, B*F]

    # Pass 1, every face: its pixel box (from x, y only), to sort faces by box shape.
    x = coords[0].index_select(0, vid.view(-1)).view(3, -1)
    y = coords[1].index_select(0, vid.view(-1)).view(3, -1)
    depth_ok = (coords[2] >= znear) & (coords[2] <= zfar)
    ok = depth_ok.index_select(0, vid.view(-1)).view(3, -1).all(0)
    _, ncol = _pixel_span(x, size)
    _, nrow = _pixel_span(y, size)
    area = (x[1] - x[0]) * (y[2] - y[0]) - (y[1] - y[0]) * (x[2] - x[0])
    ok &= (area != 0) & area.isfinite() & (ncol > 0) & (nrow > 0)
    small = (ncol <= tile) & (nrow <= tile)
    n_shapes = tile * tile  # keys: box shapes 0..n_shapes-1, then "tile it", then "skip"
    shape_key = torch.where(small, (nrow - 1) * tile + (ncol - 1), n_shapes)
    # narrow keys sort several times faster
    key_dtype = torch.uint8 if n_shapes + 1 <= torch.iinfo(torch.uint8).max else torch.int32
    shape_key = torch.where(ok, shape_key, n_shapes + 1).to(key_dtype)
    counts = torch.bincount(shape_key, minlength=n_shapes + 2).tolist()  # note: host sync
    n_small, n_big = sum(counts[:n_shapes]), counts[n_shapes]
    if n_small + n_big == 0:
        return torch.full((batch, size, size), -1, dtype=torch.int64, device=device)
    order = torch.argsort(shape_key)[: n_small + n_big]

    # Pass 2, faces with a box, in shape order: the per-face constants, one row each.
    # (Gathers of per-face arrays instead of // and %: int64 division is slow on CPU.)
    face_id = torch.arange(n_faces, device=device).repeat(batch).index_select(0, order)
    first_pixel = torch.arange(batch, device=device).mul_(size * size).repeat_interleave(n_faces)
    table, origin, ncol, nrow = _face_table(coords, vid.index_select(1, order), size)
    origin += first_pixel.index_select(0, order)
    _test_groups(zbuf, table[:, :n_small], origin[:n_small], face_id[:n_small], counts[:n_shapes],
                 tile, size, max_candidates)
    if n_big > 0:
        big = slice(n_small, n_small + n_big)
        _test_tiles(zbuf, table[:, big], origin[big], face_id[big], ncol[big], nrow[big], tile, size,
                    max_candidates)
    pix_to_face = torch.where(zbuf == _EMPTY_KEY, -1, zbuf & ((1 << _FACE_BITS) - 1))
    return pix_to_face.view(batch, size, size)


def _pixel_span(c: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First pixel index and count (long, ``[M]``) whose centres lie in the span of ``c [3, M]``.

    Pixel ``j`` has its centre at ``j + 0.5``, so the centres in ``[lo, hi]`` are
    ``ceil(lo - 0.5) .. floor(hi - 0.5)``, clipped to the image.
    """
    # in-place ops: fresh allocations (page faults) cost more than the arithmetic here
    lo = torch.minimum(c[0], c[1])
    lo = torch.minimum(lo, c[2], out=lo).sub_(0.5).ceil_().clamp_(0, size)
    hi = torch.maximum(c[0], c[1])
    hi = torch.maximum(hi, c[2], out=hi).sub_(0.5).floor_().clamp_(-1, size - 1)
    count = hi.sub_(lo).add_(1).clamp_min_(0)
    return lo.long(), count.long()


def _face_table(coords: torch.Tensor, vid: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Per-face constants of the affine channels b0, b1, b2 (barycentrics) and 1/depth.

    Each channel is ``corner + col * per_col + row * per_row`` over the face's pixel box, where
    ``corner`` is its value at the first pixel centre of the box. 1/depth is affine in screen
    space too (which is what makes perspective-correct interpolation work). Offsets are taken
    from vertex 0 so float32 keeps its precision anywhere in the image (an ``a x + b y + c``
    edge equation cancels catastrophically for small faces far from the origin).

    Args:
        coords: ``[3, B*N]`` screen x, y, depth.
        vid: ``[3, M]`` flat vertex indices of ``M`` faces.

    Returns:
        table ``[12, M]`` (rows: b0 corner, per col, per row, then b1, b2, 1/depth), origin
        ``[M]`` (flat index into ``S*S`` of the box's first pixel), ncol, nrow ``[M]``.
    """
    flat = vid.reshape(-1)
    x, y, z = (coords[k].index_select(0, flat).view(3, -1) for k in range(3))
    col0, ncol = _pixel_span(x, size)
    row0, nrow = _pixel_span(y, size)
    t = torch.empty(12, x.shape[1], dtype=x.dtype, device=x.device)
    (b0, b0_col, b0_row, b1, b1_col, b1_row, b2, b2_col, b2_row, iz, iz_col, iz_row) = t.unbind(0)
    # edges from vertex 0, in place over the vertex 1 and 2 rows (x, y are ours to overwrite)
    e1x, e2x = x[1].sub_(x[0]), x[2].sub_(x[0])
    e1y, e2y = y[1].sub_(y[0]), y[2].sub_(y[0])
    inv_area = torch.mul(e1x, e2y).sub_(e1y * e2x).reciprocal_()
    # b1 = (dx * e2y - dy * e2x) / area, b2 = (dy * e1x - dx * e1y) / area at (dx, dy) from vertex 0
    torch.mul(e2y, inv_area, out=b1_col)
    torch.mul(e2x, inv_area, out=b1_row).neg_()
    torch.mul(e1y, inv_area, out=b2_col).neg_()
    torch.mul(e1x, inv_area, out=b2_row)
    dx = x[0].neg_().add_(col0.to(x.dtype)).add_(0.5)
    dy = y[0].neg_().add_(row0.to(x.dtype)).add_(0.5)
    torch.mul(dx, b1_col, out=b1).add_(dy * b1_row)
    torch.mul(dx, b2_col, out=b2).add_(dy * b2_row)
    torch.add(b1, b2, out=b0).neg_().add_(1.0)
    torch.add(b1_col, b2_col, out=b0_col).neg_()
    torch.add(b1_row, b2_row, out=b0_row).neg_()
    # 1/depth = iz0 + b1 * (iz1 - iz0) + b2 * (iz2 - iz0)
    z.reciprocal_()
    d1, d2 = z[1].sub_(z[0]), z[2].sub_(z[0])
    torch.mul(b1, d1, out=iz).add_(b2 * d2).add_(z[0])
    torch.mul(b1_col, d1, out=iz_col).add_(b2_col * d2)
    torch.mul(b1_row, d1, out=iz_row).add_(b2_row * d2)
    return t, row0.mul_(size).add_(col0), ncol, nrow


def _test_tiles(zbuf: torch.Tensor, table: torch.Tensor, origin: torch.Tensor, face_id: torch.Tensor,
                ncol: torch.Tensor, nrow: torch.Tensor, tile: int, size: int, max_candidates: int) -> None:
    """Cut boxes larger than ``tile`` into ``tile x tile`` pieces and test those."""
    tiles_c = torch.div(ncol + tile - 1, tile, rounding_mode="floor")
    tiles_r = torch.div(nrow + tile - 1, tile, rounding_mode="floor")
    n_tiles = tiles_c * tiles_r
    owner = torch.repeat_interleave(torch.arange(n_tiles.numel(), device=zbuf.device), n_tiles)
    k = torch.arange(owner.numel(), device=zbuf.device) - (n_tiles.cumsum(0) - n_tiles)[owner]
    tr = torch.div(k, tiles_c[owner], rounding_mode="floor")
    tc = k - tr * tiles_c[owner]
    shift_c, shift_r = tc * tile, tr * tile
    rows = torch.clamp(nrow[owner] - shift_r, max=tile)
    cols = torch.clamp(ncol[owner] - shift_c, max=tile)
    shape_key = (rows - 1) * tile + (cols - 1)
    order = torch.argsort(shape_key)
    owner, shift_c, shift_r = owner[order], shift_c[order], shift_r[order]
    t = table.index_select(1, owner)
    for k in (0, 3, 6, 9):  # move each channel's corner value to the tile's first pixel
        t[k] += shift_c.to(t.dtype) * t[k + 1] + shift_r.to(t.dtype) * t[k + 2]
    counts = torch.bincount(shape_key, minlength=tile * tile).tolist()
    _test_groups(zbuf, t, origin[owner] + shift_r * size + shift_c, face_id[owner], counts, tile, size,
                 max_candidates)


def _test_groups(zbuf: torch.Tensor, table: torch.Tensor, origin: torch.Tensor, face_id: torch.Tensor,
                 counts: list[int], tile: int, size: int, max_candidates: int) -> None:
    """Faces sorted by box shape (``counts[(rows-1) * tile + cols-1]`` of each): test each group,
    at most ``max_candidates`` pixel centres at a time."""
    start = 0
    for key, n in enumerate(counts):
        rows, cols = key // tile + 1, key % tile + 1
        per_chunk = max(1, max_candidates // (rows * cols))
        for lo in range(start, start + n, per_chunk):
            hi = min(start + n, lo + per_chunk)
            _stencil(zbuf, table[:, lo:hi], origin[lo:hi], face_id[lo:hi], rows, cols, size)
        start += n


def _stencil(zbuf: torch.Tensor, table: torch.Tensor, origin: torch.Tensor, face_id: torch.Tensor,
             rows: int, cols: int, size: int) -> None:
    """Test the ``rows x cols`` boxes of ``n`` faces (``table [12, n]``); fold hits into ``zbuf``."""
    n = table.shape[1]
    cv = torch.arange(cols, dtype=table.dtype, device=table.device).view(cols, 1)
    rv = torch.arange(rows, dtype=table.dtype, device=table.device).view(rows, 1, 1)
    # channel k over the boxes: corner + col * per_col + row * per_row, [rows, cols, n]
    values = [(table[k] + table[k + 1] * cv) + table[k + 2] * rv for k in (0, 3, 6, 9)]
    inside = (values[0] >= -_INSIDE_EPS) & (values[1] >= -_INSIDE_EPS) & (values[2] >= -_INSIDE_EPS)
    keep = inside.view(-1).nonzero().squeeze(1)
    if keep.numel() == 0:
        return
    cell = torch.div(keep, n, rounding_mode="floor")
    face = keep - cell * n
    drow = torch.div(cell, cols, rounding_mode="floor")
    pixel = origin.index_select(0, face) + drow * (size - cols) + cell
    depth = 1.0 / values[3].view(-1).index_select(0, keep)
    # Positive float32 values order like their int32 bit patterns, so one int64 amin picks the
    # nearest depth and, on exact ties, the lowest face index (as pytorch3d does).
    bits = depth.float().view(torch.int32).to(torch.int64)
    key = (bits << _FACE_BITS) | face_id.index_select(0, face)
    zbuf.scatter_reduce_(0, pixel, key, reduce="amin", include_self=True)
