"""The ``pytorch3d`` backend: pytorch3d's ``MeshRasterizer`` with dfmvr's camera and outputs.

pytorch3d is optional (``pip install "dfmvr[pytorch3d]"``; its only wheel, easypytorch3d,
needs torch==2.12.1 exactly, Linux x86-64) and imported on first use.

Camera conversion. pytorch3d's view frame is +X left, +Y up, +Z into the screen, with
world-to-view ``X_view = X_world @ R + T`` (row vectors). Our camera sits at world ``z = d``
looking down -z with image x to world +x, so ``R = diag(-1, 1, -1)``, ``T = (0, 0, d)``:
view depth is ``d - z`` (our :meth:`Camera.depth`). A screen-space
``PerspectiveCameras(in_ndc=False)`` with our focal length and principal point then maps
points to the same pixel coordinates as :meth:`Camera.project`, and pytorch3d's pixel
``(i, j)`` centre is ``(j + 0.5, i + 0.5)`` in those coordinates, like ours.

Settings that make it agree with the ``torch`` backend: ``blur_radius=0``,
``faces_per_pixel=1``, ``perspective_correct=True``, no back-face culling, and faces with
any vertex outside ``[znear, zfar]`` removed before rasterising (pytorch3d clips nothing by
default). ``bin_size=None`` lets pytorch3d choose: coarse-to-fine binning on CUDA, the naive
per-pixel loop on CPU (about 15 s per 224 px image with 70k faces, forward + backward).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

import torch

from dfmvr.render.camera import Camera

_logger = logging.getLogger(__name__)

_MODULE = "pytorch3d"
"""The package imported on demand (a name tests can point elsewhere)."""

INSTALL_HINT = ('the pytorch3d renderer backend needs pytorch3d: pip install "dfmvr[pytorch3d]" '
                '(the easypytorch3d wheel; needs torch==2.12.1 exactly, Linux x86-64), '
                'or use backend="torch"')


def _import() -> ModuleType:
    return importlib.import_module(_MODULE)


def available() -> bool:
    """Whether pytorch3d can be imported here."""
    try:
        require()
    except ImportError:
        return False
    return True


def require() -> ModuleType:
    """Import pytorch3d's renderer or raise :class:`ImportError` saying how to install it."""
    try:
        _import()
        return importlib.import_module(f"{_MODULE}.renderer")
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} (import failed: {err})") from err


def cameras(camera: Camera, batch: int, device: torch.device):
    """``batch`` pytorch3d ``PerspectiveCameras`` equivalent to ``camera`` (see module docstring)."""
    renderer = require()
    rot = torch.diag(torch.tensor([-1.0, 1.0, -1.0], device=device)).expand(batch, 3, 3)
    trans = torch.tensor([[0.0, 0.0, camera.distance]], device=device).expand(batch, 3)
    size = camera.image_size
    return renderer.PerspectiveCameras(
        focal_length=((camera.focal, camera.focal),) * batch,
        principal_point=((camera.center, camera.center),) * batch,
        image_size=((size, size),) * batch, in_ndc=False, R=rot, T=trans, device=device)


def render(vertices: torch.Tensor, tri: torch.Tensor, colors: torch.Tensor, labels: torch.Tensor | None,
           camera: Camera) -> tuple[torch.Tensor, ...]:
    """Rasterise with pytorch3d and interpolate colours with ``interpolate_face_attributes``.

    Args and shapes as :meth:`dfmvr.render.Renderer.__call__`.

    Returns:
        ``image [B, 3, H, W], mask [B, 1, H, W], region [B, H, W], depth [B, H, W]``.
    """
    renderer = require()
    structures = importlib.import_module(f"{_MODULE}.structures")
    ops = importlib.import_module(f"{_MODULE}.ops")
    batch, n_verts, _ = vertices.shape
    size = camera.image_size
    device = vertices.device
    tri = tri.long()

    depth_v = camera.depth(vertices.detach())  # [B, N]
    in_range = ((depth_v >= camera.znear) & (depth_v <= camera.zfar))[:, tri].all(-1)  # [B, F]
    faces = [tri[in_range[b]] for b in range(batch)]
    if sum(f.shape[0] for f in faces) == 0:
        return _empty(vertices, colors, size)
    meshes = structures.Meshes(verts=list(vertices.unbind(0)), faces=faces)
    settings = renderer.RasterizationSettings(
        image_size=size, blur_radius=0.0, faces_per_pixel=1, bin_size=None,
        perspective_correct=True, cull_backfaces=False)
    rasterizer = renderer.MeshRasterizer(cameras=cameras(camera, batch, device), raster_settings=settings)
    frags = rasterizer(meshes)
    pix_to_face = frags.pix_to_face  # [B, H, W, 1], index into the packed faces
    covered = pix_to_face[..., 0] >= 0

    faces_packed = meshes.faces_packed()  # [F', 3] indices into the packed (B * N) vertices
    face_colors = colors.reshape(batch * n_verts, 3)[faces_packed]  # [F', 3, 3]
    image = ops.interpolate_face_attributes(pix_to_face, frags.bary_coords, face_colors)[..., 0, :]
    image = image.permute(0, 3, 1, 2).contiguous()
    depth = torch.where(covered, frags.zbuf[..., 0], torch.zeros_like(frags.zbuf[..., 0]))
    mask = covered.to(vertices.dtype).unsqueeze(1)
    region = torch.zeros(batch, size, size, dtype=torch.int64, device=device)
    if labels is not None:
        face_labels = labels.long().repeat(batch)[faces_packed]  # [F', 3]
        nearest = frags.bary_coords[..., 0, :].detach().argmax(-1, keepdim=True)  # [B, H, W, 1]
        picked = face_labels[pix_to_face[..., 0].clamp_min(0)].gather(-1, nearest)[..., 0]
        region = torch.where(covered, picked, region)
    return image, mask, region, depth


def _empty(vertices: torch.Tensor, colors: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Nothing in range: blank outputs, still connected to the inputs so backward() works."""
    batch = vertices.shape[0]
    zeros = vertices.new_zeros(batch, size, size)
    image = colors.new_zeros(batch, 3, size, size) + 0.0 * (vertices.sum() + colors.sum())
    return (image, zeros.unsqueeze(1), torch.zeros(batch, size, size, dtype=torch.int64,
                                                    device=vertices.device), zeros)
