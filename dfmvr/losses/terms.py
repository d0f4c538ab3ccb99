"""The loss terms of DF-MVR (paper Sec. IV; docs/design.md "Losses"), one function each.

Images here are in [0, 1] (inputs arrive in [-1, 1] and are mapped by the caller). Shapes use
``B`` samples, ``V`` views; per-view tensors are flattened to ``B*V`` by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfmvr.facemodel.model import MM_PER_UNIT

LM2D_REFERENCE_SIZE = 224.0
"""Landmark distances are measured in pixels of a 224 px image, whatever the training size."""

# iBUG-68 indices with weight 20 in the landmark loss: nose bridge/tip (28-30) and inner mouth.
_LM_HEAVY = [28, 29, 30, *range(60, 68)]


def landmark_weights(device: torch.device | None = None) -> torch.Tensor:
    """``[68]`` weights: 20 on the nose (28-30) and the inner mouth (60-67), 1 elsewhere."""
    w = torch.ones(68, device=device)
    w[_LM_HEAVY] = 20.0
    return w


def photo_loss(render: torch.Tensor, target: torch.Tensor, render_mask: torch.Tensor,
               face_mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mask-weighted photometric loss over the region the render and the input face share.

    Per image: ``sum_i w_i * ||I_i - R_i||_2 / sum_i w_i`` over pixels ``i`` where the render
    covers the face AND the input mask is face (a render-coverage-only region lets the model
    shrink the face away from hard pixels); then the mean over images (views and samples).

    Args:
        render: ``[BV, 3, H, W]`` rendered colour in [0, 1].
        target: ``[BV, 3, H, W]`` input image in [0, 1].
        render_mask: ``[BV, 1, H, W]`` coverage of the render (0/1).
        face_mask: ``[BV, 1, H, W]`` 1 where the input's parsing mask is any face class.
        weight: ``[BV, 1, H, W]`` the paper's weight map (levels / 255).

    Returns:
        scalar.
    """
    dist = torch.sqrt(((render - target) ** 2).sum(1, keepdim=True) + 1e-8)  # [BV, 1, H, W]
    w = weight * render_mask * face_mask
    per_image = (w * dist).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-6)
    return per_image.mean()


def mask_loss(parse_logits: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the frozen parse net's prediction on the render and the input mask.

    Args:
        parse_logits: ``[BV, C, H, W]`` parse net logits on the rendered (composited) image.
        target: ``[BV, H, W]`` long, the input's parsing mask.
        region: ``[BV, H, W]`` bool, pixels counted (the input's face pixels and the render's).

    Returns:
        scalar: mean cross-entropy over the counted pixels (0 when there are none).
    """
    ce = F.cross_entropy(parse_logits, target, reduction="none")  # [BV, H, W]
    region = region.to(ce.dtype)
    return (ce * region).sum() / region.sum().clamp_min(1.0)


def lm2d_loss(pred: torch.Tensor, target: torch.Tensor, image_size: int) -> torch.Tensor:
    """Weighted squared landmark distance, in pixels of a 224 px image (Deep3DFaceRecon's form).

    ``mean_k w_k * ||p_k - t_k||^2`` with weights 20 on nose and inner mouth; landmarks that are
    NaN in the target (missing) are left out.

    Args:
        pred: ``[BV, 68, 2]`` projected landmarks, pixels.
        target: ``[BV, 68, 2]`` given landmarks, pixels.
        image_size: pixels of the side the landmarks are in.
    """
    scale = LM2D_REFERENCE_SIZE / image_size
    valid = torch.isfinite(target).all(-1)  # [BV, 68]
    diff = (pred - torch.nan_to_num(target)) * scale
    w = landmark_weights(pred.device) * valid
    return ((diff ** 2).sum(-1) * w).sum() / valid.sum().clamp_min(1)


def lm3d_loss(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Euclidean distance in mm between predicted and given sparse 3D landmarks.

    Both are in the face-model frame (decimetres); the packer brings real data's landmarks into
    that frame (see docs/data.md).

    Args:
        pred: ``[B, K, 3]``.
        target: ``[B, K, 3]``.
        present: ``[B]`` bool, samples that carry 3D landmarks (others are left out).
    """
    dist = (pred - target).norm(dim=-1).mean(-1) * MM_PER_UNIT  # [B]
    if present is None:
        return dist.mean()
    present = present.to(dist.dtype)
    return (dist * present).sum() / present.sum().clamp_min(1.0)


def reg_loss(id_coeff: torch.Tensor, exp_coeff: torch.Tensor, tex_coeff: torch.Tensor) -> torch.Tensor:
    """``||id||^2 + 0.8 ||exp||^2 + 0.017 ||tex||^2``, mean over the batch."""
    return (id_coeff.pow(2).sum(1) + 0.8 * exp_coeff.pow(2).sum(1) + 0.017 * tex_coeff.pow(2).sum(1)).mean()


def gamma_loss(gamma: torch.Tensor) -> torch.Tensor:
    """Variance of the SH coefficients across R, G, B (prefers white light): ``gamma [B, 27]``."""
    g = gamma.view(-1, 3, 9)
    return ((g - g.mean(1, keepdim=True)) ** 2).mean()


def reflect_loss(albedo: torch.Tensor, skinmask: torch.Tensor) -> torch.Tensor:
    """Albedo variance over the skin vertices (a flat skin albedo): ``albedo [B, N, 3]``, ``skinmask [N]``."""
    skin = albedo[:, skinmask]  # [B, Ns, 3]
    if skin.shape[1] == 0:
        return albedo.sum() * 0.0
    return ((skin - skin.mean(1, keepdim=True)) ** 2).sum(-1).mean()
