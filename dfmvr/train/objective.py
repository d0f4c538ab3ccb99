"""The training objective: one forward pass of DF-MVR on a batch, every active loss term.

Used by the plain-PyTorch loop, the Ray worker, validation and the tests alike.
"""

from __future__ import annotations

import torch

from dfmvr import losses
from dfmvr.model import DFMVR, ReconOutput


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)


def composite(out: ReconOutput, images: torch.Tensor) -> torch.Tensor:
    """The render pasted over the input (``[B, V, 3, S, S]`` in [-1, 1]) where it covers the face.

    The parse net sees a whole picture, as it was trained on, not a face on black.
    """
    target01 = (images + 1) / 2
    comp = out.image * out.render_mask + target01 * (1 - out.render_mask)
    return comp * 2 - 1


def reconstruction_losses(model: DFMVR, out: ReconOutput, batch, loss_cfg, step: int,
                          parse_net: torch.nn.Module | None = None, *,
                          lazy: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All active loss terms for ``out = model(batch...)``.

    Args:
        model: the (unwrapped) :class:`DFMVR`; supplies the face model.
        out: its output on ``batch`` (rendered).
        batch: a :class:`dfmvr.data.batch.Batch`.
        loss_cfg: :class:`dfmvr.config.LossConfig`.
        step: optimiser step (the mask loss starts at ``loss_cfg.mask_loss_start_step``).
        parse_net: the frozen parse net; without it the mask loss is off.
        lazy: follow ``loss.picture_every`` (training: ``out`` is rendered only where
            :func:`dfmvr.losses.picture_step` says so); False counts every term once (validation).

    Returns:
        ``(total, terms)``: weighted total and the unweighted terms plus ``total``.
    """
    has_lm3d = batch.lmk3d is not None and bool(batch.has_lmk3d.any())
    active = losses.active_terms(loss_cfg, step, has_lm3d=has_lm3d, has_parse_net=parse_net is not None,
                                 lazy=lazy)
    fm = model.face.model
    s = model.image_size
    values: dict[str, torch.Tensor] = {}
    if any(t in active for t in losses.PICTURE_TERMS) and out.image is None:
        raise ValueError(f"step {step}: the {[t for t in losses.PICTURE_TERMS if t in active]} term(s) need "
                         "the render; call the model with render=True on this step")
    if "photo" in active:
        face_mask = (batch.masks > 0).unsqueeze(2).to(out.image.dtype)  # [B, V, 1, S, S]
        values["photo"] = losses.photo_loss(
            _flat(out.image), _flat((batch.images + 1) / 2), _flat(out.render_mask), _flat(face_mask),
            _flat(batch.weights),
        )
    if "mask" in active:
        logits = parse_net(_flat(composite(out, batch.images)))  # in bf16 where train.parse_net_amp says
        region = _flat(batch.masks > 0) | _flat(out.render_mask[:, :, 0] > 0)
        values["mask"] = losses.mask_loss(logits, _flat(batch.masks), region)
    if "lm2d" in active:
        values["lm2d"] = losses.lm2d_loss(_flat(out.lm2d), _flat(batch.lmk2d), s)
    if "lm3d" in active:
        if batch.lmk3d.shape[1] != out.lm3d.shape[1]:
            raise ValueError(
                f"batch {batch.keys[0]}...: 3D landmarks have {batch.lmk3d.shape[1]} points but the face model's "
                f"sparse set has {out.lm3d.shape[1]}; pack them for this face model or set loss.lm3d_loss=false"
            )
        values["lm3d"] = losses.lm3d_loss(out.lm3d, batch.lmk3d, batch.has_lmk3d)
    if "reg" in active:
        values["reg"] = losses.reg_loss(out.parts.id, out.parts.exp, out.parts.tex)
    if "gamma" in active:
        values["gamma"] = losses.gamma_loss(out.parts.gamma)
    if "reflect" in active:
        values["reflect"] = losses.reflect_loss(out.albedo, fm.skinmask)
    return losses.combine(values, loss_cfg, lazy=lazy)
