"""Load a trained DF-MVR and run it on new captures.

``dfmvr.serving.load(uri)`` takes a checkpoint directory, ``s3://``, ``runs:/RUN_ID/model`` or
``models:/NAME/VERSION`` and returns a :class:`Reconstructor`; ``reconstruct(left, front,
right)`` turns three uint8 face crops into a mesh. :class:`DFMVRPyfunc` is the MLflow pyfunc
wrapper the training job logs and registers, so the MLflow UI's model can be served as is.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from dfmvr.config import Config, from_dict
from dfmvr.facemodel import build_face_model
from dfmvr.model import DFMVR
from dfmvr.train.checkpoint import check_face_signature, load_checkpoint, resolve_checkpoint

_logger = logging.getLogger(__name__)


class Reconstructor:
    """A loaded model in eval mode with the config it was trained with."""

    def __init__(self, model: DFMVR, cfg: Config, parse_net: torch.nn.Module | None = None,
                 payload: dict | None = None):
        self.model = model.eval()
        self.cfg = cfg
        self.parse_net = parse_net
        self.payload = payload or {}

    @classmethod
    def from_checkpoint(cls, uri: str | Path, device: str | torch.device = "cpu") -> "Reconstructor":
        local = resolve_checkpoint(str(uri))
        payload = load_checkpoint(local, map_location=device)
        cfg = from_dict(Config, payload["config"])
        face_model = build_face_model(cfg.facemodel)
        check_face_signature(payload, face_model.signature(), str(uri))
        model = DFMVR(cfg.model, cfg.render, face_model)
        model.load_state_dict(payload["model"])
        model.to(device)
        parse_net = None
        if cfg.model.parse_net:
            from dfmvr.nets import load_parsenet

            try:
                parse_net = load_parsenet(cfg.model.parse_net, device)
            except FileNotFoundError:
                _logger.warning("parse net %s not found: inputs must come with masks", cfg.model.parse_net)
        return cls(model, cfg, parse_net, payload)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def predict(self, images: torch.Tensor, masks: torch.Tensor | None = None, *, render: bool = False):
        """``images [B, V, 3, S, S]`` in [-1, 1] (+ masks) -> :class:`dfmvr.model.ReconOutput`."""
        images = images.to(self.device)
        if masks is None and self.cfg.model.mask_input:
            if self.parse_net is None:
                raise ValueError("this model takes masks (model.mask_input) and no parse net is loaded: pass masks")
            b, v = images.shape[:2]
            masks = self.parse_net(images.flatten(0, 1)).argmax(1).view(b, v, *images.shape[-2:])
        if masks is not None:
            masks = masks.to(self.device)
        return self.model(images, masks, render=render)

    def reconstruct(self, left: np.ndarray, front: np.ndarray, right: np.ndarray,
                    masks: list[np.ndarray] | None = None) -> dict[str, Any]:
        """Three uint8 ``[S, S, 3]`` RGB face crops (aligned as the shards are) -> a mesh.

        Returns:
            ``vertices [N, 3]`` (model frame, decimetres), ``faces [F, 3]``, ``albedo [N, 3]``,
            ``coeffs [269]``, ``lm3d [68, 3]`` (the iBUG-68 vertices).
        """
        s = self.model.image_size
        views = []
        for name, img in (("left", left), ("front", front), ("right", right)):
            img = np.asarray(img)
            if img.shape != (s, s, 3) or img.dtype != np.uint8:
                raise ValueError(f"{name} view: expected uint8 image of shape ({s}, {s}, 3); got "
                                 f"{img.dtype} {img.shape}")
            views.append(torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)
        images = torch.stack(views)[None]
        mask_t = None
        if masks is not None:
            mask_t = torch.stack([torch.as_tensor(np.asarray(m), dtype=torch.long) for m in masks])[None]
        out = self.predict(images, mask_t)
        fm = self.model.face.model
        return {
            "vertices": out.shape[0].cpu().numpy(),
            "faces": fm.tri.cpu().numpy(),
            "albedo": out.albedo[0].clamp(0, 1).cpu().numpy(),
            "coeffs": out.coeffs[0].cpu().numpy(),
            "lm3d": out.shape[0, fm.keypoints].cpu().numpy(),
        }


def load(uri: str | Path, device: str | torch.device = "cpu") -> Reconstructor:
    """Load a trained model from a checkpoint path or URI (see the module docstring)."""
    return Reconstructor.from_checkpoint(uri, device)


class DFMVRPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: input ``{"images": uint8 [B, 3, S, S, 3]}`` (+ ``"masks"``) -> coefficients ``[B, 269]``."""

    def load_context(self, context) -> None:
        self.reconstructor = Reconstructor.from_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None):
        images = torch.as_tensor(np.asarray(model_input["images"])).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
        masks = model_input.get("masks") if isinstance(model_input, dict) else None
        masks = torch.as_tensor(np.asarray(masks), dtype=torch.long) if masks is not None else None
        return self.reconstructor.predict(images, masks).coeffs.cpu().numpy()
