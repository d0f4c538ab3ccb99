"""The differentiable renderer: one API over two rasterisers (pure PyTorch and pytorch3d).

Both backends share the camera (:class:`dfmvr.render.camera.Camera`), the semantics
(pytorch3d's ``blur_radius=0, faces_per_pixel=1``: visibility is piecewise constant, the
nearest face at each pixel centre wins, no back-face culling) and perspective-correct
barycentric interpolation of per-vertex colours, so they give the same images pixel for
pixel away from triangle edges. Gradients flow from ``image`` (and ``depth``) to vertex
positions and colours through the barycentric weights.

Use::

    renderer = Renderer(Camera.at_size(224), backend="auto")
    out = renderer(vertices, tri, colors, labels)   # out.image [B, 3, H, W], ...
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dfmvr.render import pytorch3d_backend
from dfmvr.render.camera import Camera
from dfmvr.render.rasterize import rasterize

_logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "pytorch3d")


@dataclass(slots=True)
class Rendered:
    """What a render returns (``S = H = W``; ``B`` meshes, usually batch x views flattened).

    Args:
        image: ``[B, 3, H, W]`` interpolated colour where covered, 0 elsewhere.
        mask: ``[B, 1, H, W]`` float 0/1, a face is visible at the pixel centre.
        region: ``[B, H, W]`` long, label of the visible face's vertex with the largest
            barycentric weight; 0 (background) where uncovered or when no labels were given.
        depth: ``[B, H, W]`` distance from the camera along the view axis (decimetres), 0 where
            uncovered.
        vertices_2d: ``[B, N, 2]`` every vertex projected to pixels (x right, y down).
    """

    image: torch.Tensor
    mask: torch.Tensor
    region: torch.Tensor
    depth: torch.Tensor
    vertices_2d: torch.Tensor


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """The concrete backend ``"torch"`` or ``"pytorch3d"`` for a requested name and device.

    ``auto`` picks pytorch3d on CUDA when it can be imported, else the pure-PyTorch rasteriser
    (pytorch3d's CPU rasteriser is naive and far slower). Asking for ``pytorch3d`` explicitly
    when it cannot be imported raises :class:`ImportError` with the install command.
    """
    if backend not in BACKENDS:
        raise ValueError(f"renderer backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "pytorch3d":
        pytorch3d_backend.require()
        return backend
    if backend == "torch":
        return backend
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and pytorch3d_backend.available():
        return "pytorch3d"
    return "torch"


class Renderer:
    """Render batches of meshes that share one triangle list.

    Args:
        camera: the pinhole camera (image size, focal, clipping range).
        backend: ``"auto"``, ``"torch"`` or ``"pytorch3d"``.
        device: the device inputs will live on, used to resolve ``auto`` up front; with
            ``auto`` each call still follows the device of its ``vertices``.
    """

    def __init__(self, camera: Camera, backend: str = "auto", device: torch.device | str | None = None):
        self.camera = camera
        self.requested_backend = backend
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backend = resolve_backend(backend, device)
        _logger.debug("renderer: backend %s (requested %s) for %s", self.backend, backend, device)

    def __repr__(self) -> str:
        return f"Renderer(backend={self.backend!r}, image_size={self.camera.image_size})"

    def __call__(self, vertices: torch.Tensor, tri: torch.Tensor, colors: torch.Tensor,
                 labels: torch.Tensor | None = None, *, camera: Camera | None = None) -> Rendered:
        """Render.

        Args:
            vertices: ``[B, N, 3]`` float, world frame (after the per-view rigid pose).
            tri: ``[F, 3]`` long, 0-based vertex indices shared by all ``B`` meshes.
            colors: ``[B, N, 3]`` float per-vertex colour, any range.
            labels: optional ``[N]`` long per-vertex parsing class.
            camera: overrides the renderer's camera for this call.

        Returns:
            :class:`Rendered`.
        """
        camera = camera or self.camera
        check_inputs(vertices, tri, colors, labels)
        backend = self.backend
        if self.requested_backend == "auto":
            backend = resolve_backend("auto", vertices.device)
        if backend == "pytorch3d":
            image, mask, region, depth = pytorch3d_backend.render(vertices, tri, colors, labels, camera)
        else:
            image, mask, region, depth = render_torch(vertices, tri, colors, labels, camera)
        return Rendered(image=image, mask=mask, region=region, depth=depth,
                        vertices_2d=camera.project(vertices))


def create_renderer(render_cfg, device: torch.device | str | None = None) -> Renderer:
    """The renderer a :class:`dfmvr.config.RenderConfig` describes."""
    return Renderer(Camera.from_config(render_cfg), backend=render_cfg.backend, device=device)


def check_inputs(vertices: torch.Tensor, tri: torch.Tensor, colors: torch.Tensor,
                 labels: torch.Tensor | None) -> None:
    """Shape, dtype, device and index-range checks with expected vs actual in each message."""
    if vertices.dim() != 3 or vertices.shape[2] != 3:
        raise ValueError(f"vertices must have shape (B, N, 3); got {tuple(vertices.shape)}")
    if not vertices.is_floating_point():
        raise TypeError(f"vertices must be a floating-point tensor; got {vertices.dtype}")
    batch, n_verts, _ = vertices.shape
    if tri.dim() != 2 or tri.shape[1] != 3:
        raise ValueError(f"tri must have shape (F, 3); got {tuple(tri.shape)}")
    if tri.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tri must be an int64 (or int32) tensor; got {tri.dtype}")
    if colors.shape != (batch, n_verts, 3):
        raise ValueError(f"colors must have shape (B, N, 3) = {(batch, n_verts, 3)} to match vertices; "
                         f"got {tuple(colors.shape)}")
    if not colors.is_floating_point():
        raise TypeError(f"colors must be a floating-point tensor; got {colors.dtype}")
    if labels is not None:
        if labels.shape != (n_verts,):
            raise ValueError(f"labels must have shape (N,) = ({n_verts},) to match vertices; "
                             f"got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"labels must be an integer tensor; got {labels.dtype}")
    for name, t in (("tri", tri), ("colors", colors), ("labels", labels)):
        if t is not None and t.device != vertices.device:
            raise ValueError(f"{name} is on {t.device} but vertices are on {vertices.device}")
    if tri.numel() > 0:
        lo, hi = int(tri.min()), int(tri.max())  # note: a host sync, cheap next to rendering
        if lo < 0 or hi >= n_verts:
            raise ValueError(f"tri indices must lie in [0, {n_verts - 1}] (N = {n_verts} vertices); "
                             f"got [{lo}, {hi}]")


def render_torch(vertices: torch.Tensor, tri: torch.Tensor, colors: torch.Tensor,
                 labels: torch.Tensor | None, camera: Camera) -> tuple[torch.Tensor, ...]:
    """The ``torch`` backend: pure-PyTorch rasterisation and interpolation (any device).

    Returns ``image [B, 3, H, W], mask [B, 1, H, W], region [B, H, W], depth [B, H, W]``.
    """
    batch, n_verts, _ = vertices.shape
    size = camera.image_size
    tri = tri.long()
    frags = rasterize(camera.to_screen(vertices), tri, size, znear=camera.znear, zfar=camera.zfar)
    n_pixels = batch * size * size
    corner_colors = colors.reshape(batch * n_verts, 3).index_select(0, frags.vert_index.view(-1))
    values = (frags.bary.unsqueeze(2) * corner_colors.view(-1, 3, 3)).sum(1)  # [P, 3]
    index = (frags.pixel_index,)
    image = colors.new_zeros(n_pixels, 3).index_put(index, values)
    image = image.view(batch, size, size, 3).permute(0, 3, 1, 2).contiguous()
    depth = frags.depth.new_zeros(n_pixels).index_put(index, frags.depth).view(batch, size, size)
    mask = (frags.pix_to_face >= 0).to(vertices.dtype).unsqueeze(1)
    region = torch.zeros(n_pixels, dtype=torch.int64, device=vertices.device)
    if labels is not None:
        corner_labels = labels.long().repeat(batch).index_select(0, frags.vert_index.view(-1)).view(-1, 3)
        nearest = frags.bary.detach().argmax(dim=1, keepdim=True)
        region = region.index_put(index, corner_labels.gather(1, nearest).squeeze(1))
    return image, mask, region.view(batch, size, size), depth
