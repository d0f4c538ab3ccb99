"""Load a trained DF-MVR and run it on new captures.

``dfmvr.serving.load(uri)`` takes a checkpoint directory, ``s3://``, ``runs:/RUN_ID/model`` or
``models:/NAME/VERSION`` and returns a :class:`Reconstructor`; ``reconstruct(left, front,
right)`` turns three uint8 face crops into a mesh (the MLflow pyfunc over it that the training
job logs and registers is :class:`dfmvr.bundle.DFMVRPyfunc`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from dfmvr.config import Config, apply_overrides, from_dict
from dfmvr.inputs import prepare_capture, to_model_tensor
from dfmvr.model import DFMVR, build_model, frozen_parse_net, parsed_masks, reads_parse_net_masks
from dfmvr.train.checkpoint import load_checkpoint_uri

_logger = logging.getLogger(__name__)


class Reconstructor:
    """A loaded model in eval mode with the config it was trained with.

    Attributes:
        model: the :class:`DFMVR` network (eval mode).
        cfg: its config (the checkpoint's, with any overrides the caller applied).
        parse_net: the frozen parse net that makes masks for inputs that come without, or None.
        payload: the checkpoint's dict (step, metrics, extra, ...).
        source: the URI or path it was loaded from (for messages and MLflow).
    """

    def __init__(self, model: DFMVR, cfg: Config, parse_net: torch.nn.Module | None = None,
                 payload: dict | None = None, source: str = ""):
        self.model = model.eval()
        self.cfg = cfg
        self.parse_net = parse_net
        if reads_parse_net_masks(cfg.model) and parse_net is not None:
            model.set_input_parse_net(parse_net)
        self.payload = payload or {}
        self.source = source
        self._detector = None  # dlib's models, loaded at the first photo (photo_aligner)

    @classmethod
    def from_checkpoint(cls, uri: str | Path, device: str | torch.device = "cpu",
                        overrides: Mapping[str, Any] | None = None, *,
                        tracking_uri: str | None = None) -> "Reconstructor":
        """Load from a checkpoint path or URI (``s3://``, ``runs:/``, ``models:/``). MLflow URIs are
        looked up where the jobs log: ``tracking_uri``, else ``MLFLOW_TRACKING_URI`` (or
        ``mlflow.set_tracking_uri``), else ``work/mlflow.db`` in the current folder
        (:func:`dfmvr.tracking.registry_store`).

        Args:
            uri: where the checkpoint is.
            device: where to put the model.
            overrides: dotted config overrides applied on top of the checkpoint's config (e.g.
                ``facemodel.bfm_path`` on another machine, ``model.parse_net``).

        Raises:
            FileNotFoundError: nothing at ``uri``.
            ValueError: not a dfmvr checkpoint, or made for another face model or coefficient
                layout (the message names the checkpoint and both signatures).
        """
        payload = load_checkpoint_uri(str(uri), map_location=device, tracking_uri=tracking_uri)
        return cls.from_payload(payload, str(uri), device, overrides)

    @classmethod
    def from_payload(cls, payload: dict, source: str, device: str | torch.device = "cpu",
                     overrides: Mapping[str, Any] | None = None) -> "Reconstructor":
        """Build from a loaded checkpoint dict (see :meth:`from_checkpoint`); ``source`` names it."""
        cfg = from_dict(Config, payload["config"])
        if overrides:
            cfg = apply_overrides(cfg, overrides)
        parse_net = _bundled_parse_net(payload, cfg, source, device, overrides)
        model = build_model(cfg, device=device, payload=payload, source=source, parse_net=parse_net)
        return cls(model, cfg, parse_net, payload, source)

    def landmark_detector(self):
        """The face detector and landmarker (:class:`dfmvr.detect.FaceDetector`), loaded once."""
        from dfmvr.detect import FaceDetector

        if self._detector is None:
            self._detector = FaceDetector()
        return self._detector

    def photo_aligner(self, *, largest: bool = False):
        """A :class:`dfmvr.detect.PhotoAligner` for this model's crops (its face model's mean face
        at ``model.view_yaw_deg``, at its input size); the detector is loaded once.

        Raises:
            dfmvr.detect.DetectExtraMissing: the ``detect`` extra is not installed.
        """
        from dfmvr.detect import PhotoAligner

        return PhotoAligner.for_model(self.model.face.model, self.cfg.model.view_yaw_deg, self.model.image_size,
                                      detector=self.landmark_detector(), largest=largest)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def make_masks(self, images: torch.Tensor) -> torch.Tensor:
        """Parsing masks from the parse net: ``images [B, V, 3, S, S]`` in [-1, 1] -> ``[B, V, S, S]`` class ids.

        Raises:
            ValueError: no parse net is loaded (``model.parse_net`` empty or not found).
        """
        if self.parse_net is None:
            raise ValueError(f"model {self.source}: takes masks (model.mask_input) and has no parse net (none "
                             "bundled, model.parse_net not found): pass masks")
        return parsed_masks(self.parse_net, images.to(self.device))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, masks: torch.Tensor | None = None, *, render: bool = False):
        """``images [B, V, 3, S, S]`` in [-1, 1] (+ masks) -> :class:`dfmvr.model.ReconOutput`."""
        images = images.to(self.device)
        if reads_parse_net_masks(self.cfg.model):
            masks = None  # the network reads its own parse net's masks, whatever masks come with the views
        elif masks is None and self.cfg.model.mask_input:
            masks = self.make_masks(images)
        if masks is not None:
            masks = masks.to(self.device)
        return self.model(images, masks, render=render)

    def fit(self, images: torch.Tensor, masks: torch.Tensor | None = None, lmk2d: torch.Tensor | None = None, *,
            init: torch.Tensor | None = None, cfg=None):
        """Test-time fitting of ``B`` captures (:func:`dfmvr.fit.fit` with this model and its parse
        net): ``images [B, V, 3, S, S]`` in [-1, 1], ``masks [B, V, S, S]`` or None (the parse
        net's), ``lmk2d [B, V, 68, 2]`` pixels at ``S`` (NaN: missing) or None; ``init`` the
        start (None: ``cfg.start``) -> :class:`dfmvr.fit.FitResult`."""
        from dfmvr.fit import fit

        dev = self.device
        return fit(self.model, images.to(dev), masks=None if masks is None else masks.to(dev),
                   lmk2d=None if lmk2d is None else lmk2d.to(dev), init=None if init is None else init.to(dev),
                   cfg=cfg, parse_net=self.parse_net)

    def reconstruct(self, left: np.ndarray, front: np.ndarray, right: np.ndarray,
                    masks: list[np.ndarray] | None = None, *, aligned: bool = False,
                    largest_face: bool = False, fit_steps: int = 0,
                    lmk2d: np.ndarray | None = None) -> dict[str, Any]:
        """Three uint8 RGB photos of a face (any size and aspect: the face is found and aligned,
        :class:`dfmvr.detect.PhotoAligner`), or with ``aligned=True`` three face crops (square,
        aligned as the shards are; resized to the model's size when they are not already) -> a mesh.

        Args:
            left, front, right: uint8 ``[H, W, 3]`` RGB views.
            masks: three uint8 ``[H, W]`` parsing masks (classes 0..9), or None: the parse net
                makes them when the model takes masks.
            aligned: the views are aligned crops: no detection.
            largest_face: photos with several faces: take the largest instead of refusing.
            fit_steps: after the network, fit the coefficients to the views for this many steps
                (:mod:`dfmvr.fit`: every view's landmarks, the photometric and mask terms, the
                regulariser); 0: the network's prediction as is.
            lmk2d: ``[3, 68, 2]`` landmarks of the views for the fit (pixels of the crops with
                ``aligned``, else of the photos; NaN: missing); None: the landmarker's on photos.

        Returns:
            ``vertices [N, 3]`` (model frame, decimetres), ``faces [F, 3]``, ``albedo [N, 3]`` and
            ``shaded [N, 3]`` (albedo lit by the predicted lighting as the front view sees it) in
            [0, 1], ``coeffs [269]``, ``lm3d [68, 3]`` (the iBUG-68 vertices), ``lm2d [V, 68, 2]``
            (their projection in each view, pixels at the model's size).

            With photos also ``alignment`` (per view: how it was aligned) and ``matrices``
            ``[V, 2, 3]`` (photo pixels -> crop pixels). With ``fit_steps`` also ``fit``: each
            term before and after, the seconds, and ``network_coeffs`` (the start).

        Raises:
            dfmvr.inputs.CaptureError: a crop or mask that is not a square 8-bit image; a photo
                with no face or several.
            dfmvr.detect.DetectExtraMissing: photos, and the ``detect`` extra is not installed.
        """
        extra: dict[str, Any] = {}
        from dfmvr.capture import Capture, align_photos, fit_evidence

        if aligned:
            views, mask_arr = prepare_capture((left, front, right), masks, self.model.image_size, "capture")
            cap = Capture(name="capture", source="capture", images=views, masks=mask_arr,
                          lmk2d=None if lmk2d is None else np.asarray(lmk2d, np.float32))
        else:
            cap = align_photos(self.photo_aligner(largest=largest_face), "capture", "capture",
                               [np.asarray(v) for v in (left, front, right)],
                               None if masks is None else [np.asarray(m, np.uint8) for m in masks])
            extra = {"alignment": cap.alignment, "matrices": cap.matrices}
            if lmk2d is not None:  # given in photo pixels: into each view's crop
                from dfmvr.data.align import transform_points

                cap.lmk2d = np.stack([transform_points(m, p) for m, p in zip(cap.matrices, np.asarray(lmk2d))]
                                     ).astype(np.float32)
        mask_t = torch.from_numpy(cap.masks.astype(np.int64))[None] if cap.masks is not None else None
        images = to_model_tensor(cap.images[None])
        out = self.predict(images, mask_t)
        if fit_steps:
            from dfmvr.fit import FitConfig

            fit_masks, lmk_t = fit_evidence([cap], images, self.make_masks)
            res = self.fit(images, fit_masks, lmk_t, init=out.coeffs, cfg=FitConfig(steps=fit_steps))
            extra["fit"] = {"steps": fit_steps, "seconds": res.seconds, "before": res.before[0], "after": res.after[0]}
            extra["network_coeffs"] = out.coeffs[0].cpu().numpy()
            out = res.output
        fm = self.model.face.model
        return {
            "vertices": out.shape[0].cpu().numpy(),
            "faces": fm.tri.cpu().numpy(),
            "albedo": out.albedo[0].clamp(0, 1).cpu().numpy(),
            "shaded": out.colors[0, 1].clamp(0, 1).cpu().numpy(),
            "coeffs": out.coeffs[0].cpu().numpy(),
            "lm3d": out.shape[0, fm.keypoints].cpu().numpy(),
            "lm2d": out.lm2d[0].cpu().numpy(),
            **extra,
        }


def _bundled_parse_net(payload: dict, cfg: Config, source: str, device, overrides) -> torch.nn.Module | None:
    """The parse net a model makes its masks with: the one its bundle embeds (every checkpoint a
    training job with a parse net writes), unless the caller names another with the
    ``model.parse_net`` override; else the file its config names, when it is still there."""
    from dfmvr.nets import read_parsenet_file

    given = (overrides or {}).get("model.parse_net")
    amp = cfg.train.parse_net_amp  # as in training: the same masks on this machine
    if payload.get("parse_net") is not None and not given:
        return frozen_parse_net(payload["parse_net"], f"bundled in {source}", device, amp=amp)
    if not cfg.model.parse_net:
        return None
    try:
        return frozen_parse_net(read_parsenet_file(cfg.model.parse_net), cfg.model.parse_net, device, amp=amp)
    except FileNotFoundError:
        if given:
            raise
        _logger.warning("model %s: its parse net %s is not bundled and not found: inputs must come with masks",
                        source, cfg.model.parse_net)
        return None


def load(uri: str | Path, device: str | torch.device = "cpu",
         overrides: Mapping[str, Any] | None = None, *, tracking_uri: str | None = None) -> Reconstructor:
    """Load a trained model from a checkpoint path or URI (see the module docstring and
    :meth:`Reconstructor.from_checkpoint`): ``dfmvr.load("models:/dfmvr@champion")`` in the folder
    ``make train`` ran in finds the champion in its ``work/mlflow.db``."""
    return Reconstructor.from_checkpoint(uri, device, overrides, tracking_uri=tracking_uri)
