"""Coefficients -> meshes, shading, renders and landmarks: the one decoder.

The network (:meth:`dfmvr.model.DFMVR.decode`), the synthetic data generator
(:func:`dfmvr.data.synth.render_views`) and the face-model previews
(:func:`dfmvr.facemodel.preview.render_face`) all turn coefficients into pictures here, so a
model trained on synthetic data renders its faces exactly as the data was rendered (checked by
``tests/unit/test_decode.py`` against stored synthetic images).

Shapes: ``B`` faces, ``V`` views per face, ``N`` vertices, ``S`` image side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dfmvr.facemodel import geometry
from dfmvr.facemodel.layout import Coeffs
from dfmvr.facemodel.model import FaceModel


@dataclass
class DecodedFaces:
    """What :func:`decode_faces` produces.

    Attributes:
        shape: ``[B, N, 3]`` model-frame vertices (decimetres).
        albedo: ``[B, N, 3]`` reflectance (the texture basis's value; see ``clamp_albedo``).
        posed: ``[B * V, N, 3]`` world-frame vertices, view-major within each face.
        colors: ``[B * V, N, 3]`` albedo lit by the SH lighting (normals of the posed surface:
            the light is fixed in the world).
        lm2d: ``[B * V, 68, 2]`` the iBUG-68 vertices projected, pixels.
        image: ``[B * V, 3, S, S]`` rendered colour (0 off the face), or None without rendering.
        mask: ``[B * V, 1, S, S]`` coverage, or None.
        region: ``[B * V, S, S]`` parsing class of the rendered surface, or None.
    """

    shape: torch.Tensor
    albedo: torch.Tensor
    posed: torch.Tensor
    colors: torch.Tensor
    lm2d: torch.Tensor
    image: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    region: torch.Tensor | None = None


def decode_faces(fm: FaceModel, parts: Coeffs, renderer, *, render: bool = True,
                 clamp_albedo: bool = False, shape_grad_2d: float = 1.0) -> DecodedFaces:
    """Decode ``parts`` (``id``/``exp``/``tex``/``gamma`` ``[B, K]``, ``angles``/``trans`` ``[B, V, 3]``).

    Args:
        fm: the face model.
        parts: coefficients split by the layout.
        renderer: a :class:`dfmvr.render.Renderer` (its camera projects the landmarks).
        render: rasterise the views (False: geometry, shading and landmarks only).
        clamp_albedo: clamp the reflectance to [0, 1] before shading. The texture basis can push
            it slightly outside; real skin cannot go there, so data and pictures clamp. Training
            does not: a clamped value has no gradient, and the regularisers must pull it back.
        shape_grad_2d: scale of the gradient that reaches the shape (identity and expression)
            through the posed mesh, i.e. from the picture-space terms (photometric, mask, 2D
            landmarks). 1 is plain backpropagation; 0 lets only the 3D landmarks (through
            ``shape``) teach the shape. Values are unchanged either way.
    """
    b, v = parts.angles.shape[:2]
    shape = geometry.compute_shape(fm, parts.id, parts.exp)
    albedo = geometry.compute_albedo(fm, parts.tex)
    if clamp_albedo:
        albedo = albedo.clamp(0.0, 1.0)
    posed = geometry.rigid_transform(geometry.expand_views(scale_grad(shape, shape_grad_2d), v), parts.angles.reshape(-1, 3),
                                     parts.trans.reshape(-1, 3))
    normals = geometry.vertex_normals(posed, fm.tri)
    colors = geometry.sh_shading(geometry.expand_views(albedo, v), normals, geometry.expand_views(parts.gamma, v))
    out = DecodedFaces(shape=shape, albedo=albedo, posed=posed, colors=colors,
                       lm2d=renderer.camera.project(posed[:, fm.keypoints]))
    if render:
        r = renderer(posed, fm.tri, colors, labels=fm.region)
        out.image, out.mask, out.region = r.image, r.mask, r.region
    return out


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` in the forward pass; ``scale`` times its gradient in the backward pass."""
    if scale == 1.0 or not x.requires_grad:
        return x
    held = x.detach()
    return held + scale * (x - held) if scale else held


def views_from_yaws(yaws_deg, trans: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(angles [1, V, 3], trans [1, V, 3])`` for views that turn the face by ``yaws_deg`` about
    the vertical axis (previews), at the origin unless ``trans`` is given."""
    import math

    angles = torch.zeros(1, len(yaws_deg), 3)
    angles[0, :, 1] = torch.tensor([math.radians(y) for y in yaws_deg])
    return angles, (torch.zeros(1, len(yaws_deg), 3) if trans is None else trans)


__all__ = ["DecodedFaces", "decode_faces", "views_from_yaws"]
