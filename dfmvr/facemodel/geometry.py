"""Shape and albedo formation, rigid pose, normals and SH shading (Deep3DFaceRecon conventions).

All functions are batched, differentiable and device-agnostic; shapes use ``B`` batch,
``V`` views, ``N`` vertices, ``F`` faces.
"""

from __future__ import annotations

import math

import torch

from dfmvr.facemodel.model import FaceModel

SH_DC_INIT = 0.8
"""Added to each channel's DC SH coefficient, so zero lighting coefficients mean ambient light."""

# 2nd-order SH normalisation constants (Lambertian kernel a_l times basis constants c_l)
_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_C = (1 / math.sqrt(4 * math.pi), math.sqrt(3.0) / math.sqrt(4 * math.pi), 3 * math.sqrt(5.0) / math.sqrt(12 * math.pi))


def _check_coeff(name: str, t: torch.Tensor, size: int) -> None:
    if t.dim() != 2 or t.shape[1] != size:
        raise ValueError(f"{name} coefficients must have shape (B, {size}); got {tuple(t.shape)}")


def compute_shape(model: FaceModel, id_coeff: torch.Tensor, exp_coeff: torch.Tensor) -> torch.Tensor:
    """``mean + idBase @ id + exBase @ exp``: ``[B, N, 3]`` in decimetres, model frame."""
    _check_coeff("identity", id_coeff, model.id_base.shape[1])
    _check_coeff("expression", exp_coeff, model.exp_base.shape[1])
    offset = id_coeff @ model.id_base.T + exp_coeff @ model.exp_base.T  # [B, 3N]
    return model.mean_shape.unsqueeze(0) + offset.view(id_coeff.shape[0], -1, 3)


def compute_albedo(model: FaceModel, tex_coeff: torch.Tensor) -> torch.Tensor:
    """``meantex + texBase @ tex``: ``[B, N, 3]`` albedo, nominally in [0, 1]."""
    _check_coeff("texture", tex_coeff, model.tex_base.shape[1])
    tex = model.mean_tex.unsqueeze(0) + tex_coeff @ model.tex_base.T
    return tex.view(tex_coeff.shape[0], -1, 3)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """``R = Rz @ Ry @ Rx`` from ``angles [..., 3]`` (x, y, z in radians): ``[..., 3, 3]``.

    A point ``p`` (column vector) goes to ``R @ p``. Positive y-angle (yaw) turns the nose
    towards +x (image right).
    """
    if angles.shape[-1] != 3:
        raise ValueError(f"angles must have shape (..., 3); got {tuple(angles.shape)}")
    x, y, z = angles.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    cx, sx, cy, sy, cz, sz = x.cos(), x.sin(), y.cos(), y.sin(), z.cos(), z.sin()
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).unflatten(-1, (3, 3))
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).unflatten(-1, (3, 3))
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).unflatten(-1, (3, 3))
    return rz @ ry @ rx


def rigid_transform(points: torch.Tensor, angles: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Pose model-frame points into the world frame: ``R p + t``.

    Args:
        points: ``[B, N, 3]``.
        angles: ``[B, 3]`` radians.
        trans: ``[B, 3]`` decimetres.

    Returns:
        ``[B, N, 3]``.
    """
    rot = rotation_matrix(angles)  # [B, 3, 3]
    return points @ rot.transpose(1, 2) + trans.unsqueeze(1)


def face_normals(vertices: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Unnormalised face normals ``[B, F, 3]`` (length = twice the triangle area)."""
    v0, v1, v2 = (vertices[:, tri[:, i]] for i in range(3))
    return torch.cross(v1 - v0, v2 - v0, dim=-1)


def vertex_normals(vertices: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals ``[B, N, 3]`` from all adjacent faces."""
    fn = face_normals(vertices, tri)  # [B, F, 3]
    vn = torch.zeros_like(vertices)
    for i in range(3):
        vn = vn.index_add(1, tri[:, i], fn)
    return torch.nn.functional.normalize(vn, dim=-1, eps=1e-8)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """The 9 SH basis values (with the Lambertian kernel) per normal: ``[..., 9]``."""
    x, y, z = normals.unbind(-1)
    a0c0 = _A[0] * _C[0]
    a1c1 = _A[1] * _C[1]
    a2c2 = _A[2] * _C[2]
    return torch.stack(
        [
            torch.full_like(x, a0c0),
            -a1c1 * y,
            a1c1 * z,
            -a1c1 * x,
            a2c2 * x * y,
            -a2c2 * y * z,
            0.5 * a2c2 / math.sqrt(3.0) * (3 * z * z - 1),
            -a2c2 * x * z,
            0.5 * a2c2 * (x * x - y * y),
        ],
        dim=-1,
    )


def sh_shading(albedo: torch.Tensor, normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Lambertian shading under 2nd-order SH light.

    Args:
        albedo: ``[B, N, 3]``.
        normals: ``[B, N, 3]`` unit normals in the frame the light is defined in (world).
        gamma: ``[B, 27]`` SH coefficients, 9 per channel (R, G, B); 0.8 is added to each DC.

    Returns:
        ``[B, N, 3]`` shaded colour.
    """
    _check_coeff("SH lighting (gamma)", gamma, 27)
    g = gamma.view(-1, 3, 9).clone()
    g[..., 0] = g[..., 0] + SH_DC_INIT
    light = sh_basis(normals) @ g.transpose(1, 2)  # [B, N, 9] @ [B, 9, 3]
    return albedo * light


def expand_views(t: torch.Tensor, n_views: int) -> torch.Tensor:
    """``[B, ...] -> [B * V, ...]`` repeating each sample once per view (view-major inside a sample)."""
    return t.unsqueeze(1).expand(t.shape[0], n_views, *t.shape[1:]).reshape(-1, *t.shape[1:])
