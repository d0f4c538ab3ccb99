"""Test-time multi-view fitting: the network's coefficients, refined against each capture's own evidence.

A regressor trained on other faces (synthetic ones, here) predicts a good start; a few hundred
steps of optimisation against the capture itself then move it where the views say. HRN fits
multi-view at test time; this is that step for DF-MVR::

    rec = dfmvr.load("models:/dfmvr@champion")
    out = rec.reconstruct(left, front, right, fit_steps=200)   # or jobs/reconstruct.py --fit-steps 200

What moves (:class:`FitConfig`): the identity and the albedo, shared by the three views; per
view the pose (angles, translation) and, with ``per_view`` (default), the expression and the
lighting as each view's deviation from the shared ones (three photos need not be one moment: a
turn of the head between shots changes the smile and the light on it). The shared expression
and lighting are what the mesh and its colours are made with.

Against what, each term the training objective's own function (:mod:`dfmvr.losses`): every
view's 2D landmarks (given, or found by a landmarker; NaN points are left out), the weighted
photometric term over the face the render and the masks share, the mask term (the frozen parse
net on the render against the masks), and the regularisers (coefficients, lighting colour,
albedo flatness). The masks are the parse net's of the views (what the network reads) unless
given. The render-based terms (photometric, mask) count on every ``picture_every``-th step at
that many times their weight; the steps between project only the 68 landmark vertices, so a
step costs a fraction of a render.

Batched over captures: every tensor carries the capture axis ``B``, and each capture's terms
are reported before and after (:attr:`FitResult.before`, :attr:`FitResult.after`).
Shapes: ``B`` captures, ``V`` views, ``S`` the model's image side, ``N`` vertices.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from dfmvr.config import LossConfig
from dfmvr.data.batch import Batch
from dfmvr.data.transforms import weight_map
from dfmvr.facemodel import geometry
from dfmvr.facemodel.decode import decode_faces
from dfmvr.facemodel.layout import Coeffs
from dfmvr.model import DFMVR, ReconOutput, network_masks, parsed_masks
from dfmvr.nets import initial_coefficients
from dfmvr.train.objective import reconstruction_losses

_logger = logging.getLogger(__name__)

FIT_TERMS = ("lm2d", "photo", "mask", "reg", "gamma", "reflect")


@dataclass(kw_only=True, slots=True)
class FitConfig:
    """How :func:`fit` optimises (the defaults were measured: docs/evaluation.md, "Fitting")."""

    steps: int = 200
    """Optimiser steps (0: no fitting)."""
    lr: float = 1e-2
    """Adam's learning rate on the coefficients."""
    start: Literal["network", "mean"] = "network"
    """Where the fit starts: the network's prediction, or the mean face at each view's nominal
    yaw (optimisation alone: what the network is worth beside it)."""
    per_view: bool = True
    """Each view its own deviation of the expression and the lighting (regularised like them)."""
    picture_every: int = 4
    """Steps per render: the photometric and mask terms count on every n-th step at n times
    their weight; the steps between project only the landmark vertices."""
    lm2d: float = 2.5e-3
    """2D landmark term's weight (pixels at 224, as in training)."""
    photo: float = 3.0
    """Photometric term's weight."""
    mask: float = 1.0
    """Mask term's weight (0, or no parse net: off)."""
    reg: float = 3e-5
    """Coefficient regulariser's weight (a tenth of training's: a fit may leave the prior more
    than a regressor should)."""
    gamma: float = 10.0
    """Lighting colour regulariser's weight."""
    reflect: float = 5.0
    """Albedo flatness regulariser's weight."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"fit steps: expected >= 0, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"fit lr: expected a number > 0, got {self.lr}")
        if self.start not in ("network", "mean"):
            raise ValueError(f"fit start: expected 'network' or 'mean', got {self.start!r}")
        if self.picture_every < 1:
            raise ValueError(f"fit picture_every: expected >= 1, got {self.picture_every}")
        for name in ("lm2d", "photo", "mask", "reg", "gamma", "reflect"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"fit {name} weight: expected >= 0, got {getattr(self, name)}")

    def loss_config(self) -> LossConfig:
        """The training objective's switches with the fit's weights (no 3D landmarks: a capture has none)."""
        return LossConfig(photo=self.photo, mask=self.mask, lm2d=self.lm2d, lm3d=0.0, reg=self.reg,
                          gamma=self.gamma, reflect=self.reflect, mask_loss=self.mask > 0, lm3d_loss=False,
                          picture_every=self.picture_every)


@dataclass(kw_only=True)
class FitResult:
    """What :func:`fit` returns."""

    coeffs: torch.Tensor
    """``[B, 269]`` the fitted coefficients in the model's layout (the shared expression and lighting)."""
    start: torch.Tensor
    """``[B, 269]`` where the fit started."""
    exp_views: torch.Tensor | None = None
    """``[B, V, n_exp]`` each view's expression (``per_view``), else None."""
    gamma_views: torch.Tensor | None = None
    """``[B, V, 27]`` each view's lighting (``per_view``), else None."""
    output: ReconOutput | None = None
    """The fitted faces decoded and rendered (shared expression and lighting)."""
    before: list[dict[str, float]] = field(default_factory=list)
    """Per capture: each term (unweighted) and the weighted ``total`` at the start."""
    after: list[dict[str, float]] = field(default_factory=list)
    """The same after fitting."""
    seconds: float = 0.0


@dataclass
class _Evidence:
    """One batch of captures as the objective reads it."""

    batch: Batch
    parse_net: torch.nn.Module | None


def _evidence(model: DFMVR, images: torch.Tensor, masks: torch.Tensor | None, lmk2d: torch.Tensor | None,
              parse_net: torch.nn.Module | None) -> _Evidence:
    b, v, _, s, _ = images.shape
    given = masks is not None
    if masks is None:
        if parse_net is None:
            raise ValueError("fitting needs the views' masks (the photometric term's face, the mask term's "
                             "target): give masks or a parse net")
        masks = parsed_masks(parse_net, images)
    weights = torch.from_numpy(weight_map(masks.cpu().numpy().astype(np.uint8))).to(images.device)[:, :, None]
    if lmk2d is None:
        lmk2d = torch.full((b, v, 68, 2), math.nan, device=images.device)
    batch = Batch(keys=[str(i) for i in range(b)], subjects=[""] * b, images=images, masks=masks.long(),
                  has_masks=torch.ones(b, dtype=torch.bool, device=images.device), weights=weights.float(),
                  lmk2d=lmk2d.float(), yaw_deg=torch.full((b, v), math.nan, device=images.device),
                  lmk3d=torch.zeros(b, 0, 3, device=images.device),
                  lmk3d_valid=torch.zeros(b, 0, dtype=torch.bool, device=images.device),
                  has_lmk3d=torch.zeros(b, dtype=torch.bool, device=images.device),
                  coeffs=torch.zeros(b, 0, device=images.device),
                  has_coeffs=torch.zeros(b, dtype=torch.bool, device=images.device),
                  mask_source="given" if given else f"parse_net:{getattr(parse_net, 'arch', '')}")
    return _Evidence(batch=batch, parse_net=parse_net)


class _Decoder:
    """Coefficients (and per-view deviations) -> what the objective reads, full or landmarks only."""

    def __init__(self, model: DFMVR) -> None:
        self.model = model
        fm = model.face.model
        self.fm = fm
        kp = fm.keypoints
        rows = (3 * kp[:, None] + torch.arange(3, device=kp.device)).reshape(-1)
        self.kp_mean = fm.mean_shape[kp]  # [68, 3]
        self.kp_id = fm.id_base[rows]  # [204, n_id]
        self.kp_exp = fm.exp_base[rows]  # [204, n_exp]

    def views(self, parts: Coeffs, exp_views: torch.Tensor | None, gamma_views: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each view's expression ``[B, V, n_exp]`` and lighting ``[B, V, 27]``."""
        v = parts.angles.shape[1]
        exp = parts.exp[:, None].expand(-1, v, -1)
        gamma = parts.gamma[:, None].expand(-1, v, -1)
        return (exp if exp_views is None else exp + exp_views), (gamma if gamma_views is None else gamma + gamma_views)

    def landmarks(self, parts: Coeffs, exp_v: torch.Tensor) -> torch.Tensor:
        """The 68 landmark vertices of every view, projected: ``[B, V, 68, 2]`` (no render, no mesh)."""
        b, v = parts.angles.shape[:2]
        offset = parts.id @ self.kp_id.T  # [B, 204]
        kp = self.kp_mean + (offset[:, None] + exp_v @ self.kp_exp.T).view(b, v, 68, 3)
        posed = geometry.rigid_transform(kp.flatten(0, 1), parts.angles.reshape(-1, 3), parts.trans.reshape(-1, 3))
        return self.model.renderer.camera.project(posed).view(b, v, 68, 2)

    def decode(self, coeffs: torch.Tensor, exp_views: torch.Tensor | None, gamma_views: torch.Tensor | None, *,
               render: bool) -> ReconOutput:
        model, fm = self.model, self.fm
        parts = model.layout.split(coeffs)
        b, v, s = coeffs.shape[0], model.n_views, model.image_size
        exp_v, gamma_v = self.views(parts, exp_views, gamma_views)
        reg_parts = parts._replace(
            exp=parts.exp if exp_views is None else torch.cat([parts.exp, exp_views.flatten(1)], 1),
            gamma=parts.gamma if gamma_views is None else torch.cat([parts.gamma, gamma_views.flatten(1)], 1))
        if not render:
            return ReconOutput(coeffs=coeffs, parts=reg_parts, shape=None, albedo=geometry.compute_albedo(fm, parts.tex),
                               posed=None, colors=None, image=None, render_mask=None, region=None,
                               lm2d=self.landmarks(parts, exp_v), lm3d=None)
        # every view decoded as a face of its own: its expression and lighting, one pose
        per_view = Coeffs(parts.id.repeat_interleave(v, 0), exp_v.flatten(0, 1), parts.tex.repeat_interleave(v, 0),
                          gamma_v.flatten(0, 1), parts.angles.reshape(b * v, 1, 3), parts.trans.reshape(b * v, 1, 3))
        d = decode_faces(fm, per_view, model.renderer, render=True)
        n = d.posed.shape[1]
        shape = geometry.compute_shape(fm, parts.id, parts.exp)
        return ReconOutput(
            coeffs=coeffs, parts=reg_parts, shape=shape, albedo=d.albedo.view(b, v, n, 3)[:, 0],
            posed=d.posed.view(b, v, n, 3), colors=d.colors.view(b, v, n, 3), image=d.image.view(b, v, 3, s, s),
            render_mask=d.mask.view(b, v, 1, s, s), region=d.region.view(b, v, s, s), lm2d=d.lm2d.view(b, v, 68, 2),
            lm3d=shape[:, fm.lm3d_index])


def _per_capture_terms(model: DFMVR, decoder: _Decoder, ev: _Evidence, loss_cfg: LossConfig, coeffs: torch.Tensor,
                       exp_views, gamma_views) -> list[dict[str, float]]:
    out = []
    with torch.no_grad():
        for i in range(coeffs.shape[0]):
            sub = _Evidence(batch=ev.batch.select([i]), parse_net=ev.parse_net)
            rec = decoder.decode(coeffs[i:i + 1], None if exp_views is None else exp_views[i:i + 1],
                                 None if gamma_views is None else gamma_views[i:i + 1], render=True)
            _, terms = reconstruction_losses(model, rec, sub.batch, loss_cfg, 0, sub.parse_net, lazy=False)
            out.append({k: float(v) for k, v in terms.items()})
    return out


def fit(model: DFMVR, images: torch.Tensor, *, masks: torch.Tensor | None = None, lmk2d: torch.Tensor | None = None,
        init: torch.Tensor | None = None, cfg: FitConfig | None = None,
        parse_net: torch.nn.Module | None = None) -> FitResult:
    """Fit the coefficients of ``B`` captures to their views.

    Args:
        model: the network (eval mode; its weights do not change) with its face model and renderer.
        images: ``[B, V, 3, S, S]`` in [-1, 1], the model's crops.
        masks: ``[B, V, S, S]`` parsing classes the terms use; None: ``parse_net``'s of ``images``.
        lmk2d: ``[B, V, 68, 2]`` landmarks in pixels at ``S`` (NaN: missing); None: no landmark term.
        init: ``[B, 269]`` start; None: ``cfg.start`` (the network's prediction or the mean face).
        cfg: :class:`FitConfig`.
        parse_net: the frozen parse net (the mask term, and the masks when none are given); default
            the model's own (``model.input_parse_net``).

    Returns:
        :class:`FitResult` (``output``: the fitted faces rendered; terms per capture before and after).

    Raises:
        ValueError: no masks and no parse net; shapes that do not fit the model.
    """
    cfg = cfg or FitConfig()
    t0 = time.perf_counter()
    parse_net = parse_net if parse_net is not None else model.input_parse_net
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ev = _evidence(model, images, masks, lmk2d, parse_net)
            if init is None:
                if cfg.start == "network":
                    init = model(images, network_masks(model, ev.batch), render=False).coeffs
                else:
                    init = initial_coefficients(model.layout, model.cfg.view_yaw_deg).to(images.device)
                    init = init.expand(images.shape[0], -1)
        loss_cfg = cfg.loss_config()
        if parse_net is None:
            loss_cfg = replace(loss_cfg, mask_loss=False)
        decoder = _Decoder(model)
        b, v = images.shape[:2]
        coeffs = init.detach().clone().float().requires_grad_(True)
        params = [coeffs]
        exp_views = gamma_views = None
        if cfg.per_view:
            exp_views = torch.zeros(b, v, model.layout.n_exp, device=images.device, requires_grad=True)
            gamma_views = torch.zeros(b, v, model.layout.n_gamma, device=images.device, requires_grad=True)
            params += [exp_views, gamma_views]
        before = _per_capture_terms(model, decoder, ev, loss_cfg, coeffs, exp_views, gamma_views)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        for step in range(cfg.steps):
            picture = step % cfg.picture_every == 0
            out = decoder.decode(coeffs, exp_views, gamma_views, render=picture)
            total, _ = reconstruction_losses(model, out, ev.batch, loss_cfg, step, parse_net, lazy=True)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        coeffs, exp_views = coeffs.detach(), None if exp_views is None else exp_views.detach()
        gamma_views = None if gamma_views is None else gamma_views.detach()
        after = _per_capture_terms(model, decoder, ev, loss_cfg, coeffs, exp_views, gamma_views)
        with torch.no_grad():
            output = model.decode(coeffs, render=True)
    finally:
        model.train(was_training)
    result = FitResult(coeffs=coeffs, start=init.detach(), exp_views=exp_views, gamma_views=gamma_views, output=output,
                       before=before, after=after, seconds=time.perf_counter() - t0)
    _logger.info("fitted %d capture(s) in %d steps, %.2f s a capture: total %.4g -> %.4g (means)", b, cfg.steps,
                 result.seconds / max(b, 1), float(np.mean([t["total"] for t in before])),
                 float(np.mean([t["total"] for t in after])))
    return result


__all__ = ["FIT_TERMS", "FitConfig", "FitResult", "fit"]
