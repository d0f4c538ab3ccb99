"""Training-time validation metrics (the evaluation issue brings the field's full protocols).

``aligned_vertex_rmse_mm``: vertex-to-vertex RMSE in mm between meshes of the same topology
after a similarity (Umeyama) alignment of the prediction onto the ground truth, so pose and
global scale errors do not count, only shape.
"""

from __future__ import annotations

import torch

from dfmvr.facemodel.model import MM_PER_UNIT


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The least-squares similarity taking ``src [B, N, 3]`` onto ``dst [B, N, 3]`` (Umeyama 1991:
    rotation without reflection, uniform scale, translation), in float64.

    Returns:
        ``(scale [B], rot [B, 3, 3], trans [B, 3])`` with ``dst ~ scale * src @ rot.T + trans``.
    """
    src64, dst64 = src.double(), dst.double()
    mu_s, mu_d = src64.mean(1, keepdim=True), dst64.mean(1, keepdim=True)
    xs, xd = src64 - mu_s, dst64 - mu_d
    cov = xd.transpose(1, 2) @ xs / src.shape[1]  # [B, 3, 3]
    u, sig, vt = torch.linalg.svd(cov)
    d = torch.ones_like(sig)
    d[:, -1] = torch.sign(torch.linalg.det(u @ vt))
    rot = u @ torch.diag_embed(d) @ vt
    var_s = (xs ** 2).sum((1, 2)) / src.shape[1]
    scale = (sig * d).sum(1) / var_s.clamp_min(1e-12)
    trans = mu_d[:, 0] - scale[:, None] * (mu_s @ rot.transpose(1, 2))[:, 0]
    return scale, rot, trans


def similarity_align(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Align ``src [B, N, 3]`` onto ``dst [B, N, 3]`` with the least-squares similarity transform.

    Returns:
        ``[B, N, 3]`` the transformed ``src`` (Umeyama 1991: rotation, uniform scale, translation).
    """
    scale, rot, trans = similarity_transform(src, dst)
    out = scale[:, None, None] * src.double() @ rot.transpose(1, 2) + trans[:, None]
    return out.to(src.dtype)


def aligned_vertex_rmse_mm(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-sample RMSE in mm after similarity alignment: ``pred, gt [B, N, 3]`` in decimetres -> ``[B]``."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth must have the same shape (B, N, 3); got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    aligned = similarity_align(pred, gt)
    return ((aligned - gt) ** 2).sum(-1).mean(-1).sqrt() * MM_PER_UNIT
