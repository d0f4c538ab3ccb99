"""The full DF-MVR reconstruction model: images -> backbone -> regressor -> face model -> renders.

Paper Sec. III. ``DFMVR.forward`` returns everything the losses and visualisations need in one
:class:`ReconOutput`. Shapes: ``B`` samples, ``V`` views (left, front, right), ``N`` vertices,
``K`` sparse 3D landmarks, ``S`` image side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from dfmvr.facemodel.decode import decode_faces
from dfmvr.facemodel.layout import Coeffs
from dfmvr.facemodel.model import N_PARSE_CLASSES, FaceModel
from dfmvr.nets import ParseNet, create_backbone, create_regressor, parsenet_from_dict
from dfmvr.render import create_renderer

_logger = logging.getLogger(__name__)


@dataclass
class ReconOutput:
    """What one forward pass produces.

    Attributes:
        coeffs: ``[B, 269]`` raw coefficients.
        parts: the same split by :class:`dfmvr.facemodel.layout.CoeffLayout`.
        shape: ``[B, N, 3]`` model-frame vertices, decimetres.
        albedo: ``[B, N, 3]`` in [0, 1].
        posed: ``[B, V, N, 3]`` world-frame vertices per view.
        colors: ``[B, V, N, 3]`` shaded vertex colours per view.
        image: ``[B, V, 3, S, S]`` rendered colour (0 outside the face), or None without rendering.
        render_mask: ``[B, V, 1, S, S]`` coverage, or None.
        region: ``[B, V, S, S]`` parsing class of the rendered surface, or None.
        lm2d: ``[B, V, 68, 2]`` projected landmarks, pixels.
        lm3d: ``[B, K, 3]`` model-frame sparse 3D landmarks.
    """

    coeffs: torch.Tensor
    parts: Coeffs
    shape: torch.Tensor
    albedo: torch.Tensor
    posed: torch.Tensor
    colors: torch.Tensor
    image: torch.Tensor | None
    render_mask: torch.Tensor | None
    region: torch.Tensor | None
    lm2d: torch.Tensor
    lm3d: torch.Tensor


class FaceModelBuffers(nn.Module):
    """Holds a :class:`FaceModel`'s tensors as non-persistent buffers so ``.to(device)`` and DDP
    move them with the network while checkpoints stay small (the face model is rebuilt from
    config, and its :meth:`FaceModel.signature` is checked at load)."""

    def __init__(self, face_model: FaceModel):
        super().__init__()
        self._name = face_model.name
        self._keys = []
        for f in fields(face_model):
            value = getattr(face_model, f.name)
            if isinstance(value, torch.Tensor):
                self.register_buffer(f.name, value.clone(), persistent=False)
                self._keys.append(f.name)

    @property
    def model(self) -> FaceModel:
        return FaceModel(**{k: getattr(self, k) for k in self._keys}, name=self._name)


def mask_channels(masks: torch.Tensor, encoding: str = "ids") -> torch.Tensor:
    """``[..., S, S]`` class ids -> the mask's input channels, in [-1, 1]: ``[..., 1, S, S]`` for
    ``ids`` (``model.mask_encoding``), ``[..., 10, S, S]`` (one per parsing class) for ``onehot``."""
    if encoding == "onehot":
        return (F.one_hot(masks.long(), N_PARSE_CLASSES).movedim(-1, -3).float() * 2 - 1)
    return (masks.float() / (N_PARSE_CLASSES - 1) * 2 - 1).unsqueeze(-3)


@torch.no_grad()
def parsed_masks(parse_net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The parse net's class map of every view: ``images [B, V, 3, S, S]`` in [-1, 1] -> ``[B, V, S, S]``."""
    b, v = images.shape[:2]
    return parse_net(images.flatten(0, 1).float()).argmax(1).view(b, v, *images.shape[-2:])


def uses_parse_net_masks(model_cfg) -> bool:
    """Whether the pipeline's masks are the frozen parse net's (``model.input_masks=parse_net``): the
    network's input (with ``model.mask_input``), the photometric weights and the mask loss's target."""
    return model_cfg.input_masks == "parse_net"


def reads_parse_net_masks(model_cfg) -> bool:
    """Whether the network reads the frozen parse net's masks instead of the given ones
    (``model.mask_input`` with ``model.input_masks=parse_net``)."""
    return model_cfg.mask_input and model_cfg.input_masks == "parse_net"


def network_masks(model: "DFMVR", batch) -> torch.Tensor | None:
    """What ``model`` reads beside the views of ``batch`` (a :class:`dfmvr.data.batch.Batch`):
    nothing without ``model.mask_input``; the batch's masks, unless the model reads the parse
    net's and the batch carries the samples' own (a split with no mask cache), when it is None and
    the model's parse net makes them."""
    if not model.cfg.mask_input or (reads_parse_net_masks(model.cfg) and batch.mask_source == "given"):
        return None
    return batch.masks


def input_channels(model_cfg) -> int:
    """Channels per view the backbone takes: RGB, plus the mask's (``model.mask_input``, ``model.mask_encoding``)."""
    if not model_cfg.mask_input:
        return 3
    return 3 + (N_PARSE_CLASSES if model_cfg.mask_encoding == "onehot" else 1)


def frozen_parse_net(bundle: dict, source: str, device: torch.device | str, *, amp: bool) -> ParseNet:
    """The frozen parse net of a checkpoint dict (:func:`dfmvr.nets.read_parsenet_file`) on
    ``device``, computing in bf16 where the device does natively when ``amp``
    (``train.parse_net_amp``): every use of it (its masks, the mask loss) then computes alike on
    one machine. ``source`` names it in errors."""
    net = parsenet_from_dict(bundle, source, device)
    net.amp_dtype = autocast_dtype(torch.device(device), amp=amp, cpu_amp=amp)
    return net


def check_face_signature(payload: dict, face_signature: dict, source: str) -> None:
    """Refuse a checkpoint made for another face model or coefficient layout, naming both."""
    saved = payload.get("face_signature", {})
    keys = ("n_vertices", "n_faces", "n_id", "n_exp", "n_tex")
    diff = {k: (saved.get(k), face_signature.get(k)) for k in keys if saved.get(k) != face_signature.get(k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
        raise ValueError(
            f"checkpoint {source}: made for face model {saved.get('name')!r}, not {face_signature.get('name')!r} "
            f"({detail}); set facemodel.* as in the checkpoint's config"
        )


def build_model(cfg, *, device: torch.device | str = "cpu", face_model: FaceModel | None = None,
                payload: dict | None = None, source: str = "", parse_net: nn.Module | None = None) -> "DFMVR":
    """The one way a :class:`DFMVR` is made from a :class:`dfmvr.config.Config`: its face model
    (``face_model``, else built from ``cfg.facemodel``), the network, and with a checkpoint's
    ``payload`` the face-model signature check and its weights; on ``device``, channels-last when
    ``train.channels_last``; with ``parse_net`` (frozen) set as the parse net whose masks it reads
    when it reads them.

    Raises:
        ValueError: a checkpoint of another face model or layout, weights that do not fit, or a
            network that reads the parse net's masks given no parse net (``source`` names it).
    """
    from dfmvr.facemodel import build_face_model

    face_model = face_model if face_model is not None else build_face_model(cfg.facemodel)
    if payload is not None:
        check_face_signature(payload, face_model.signature(), source)
    model = DFMVR(cfg.model, cfg.render, face_model)
    if payload is not None:
        try:
            model.load_state_dict(payload["model"])
        except RuntimeError as e:
            detail = " ".join(str(e).split())
            raise ValueError(f"checkpoint {source}: weights do not fit the model its config describes "
                             f"({detail:.400})") from e
    model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.preserve_format)
    if reads_parse_net_masks(cfg.model):
        if parse_net is None and payload is not None:
            raise ValueError(f"checkpoint {source}: the network reads the parse net's masks "
                             "(model.input_masks=parse_net) and none is bundled or found (model.parse_net)")
        model.set_input_parse_net(parse_net)
    return model


def autocast_dtype(device: torch.device, *, amp: bool, cpu_amp: bool = False) -> torch.dtype | None:
    """The network part's autocast dtype for ``train.amp`` / ``train.cpu_amp`` on ``device``.

    bf16 on CUDA when ``amp`` and the GPU has it (no loss scaling needed; older GPUs train in
    float32); bf16 on CPU when ``cpu_amp`` and the CPU has native bf16 (oneDNN), else float32.
    """
    if device.type == "cuda" and amp:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_amp and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


class DFMVR(nn.Module):
    """Deep-fusion multi-view reconstruction network with its differentiable decoder.

    Args:
        model_cfg: :class:`dfmvr.config.ModelConfig` (backbone, regressor, widths, mask input).
        render_cfg: :class:`dfmvr.config.RenderConfig` (image size, camera, backend).
        face_model: the morphable model the coefficients drive.
    """

    def __init__(self, model_cfg, render_cfg, face_model: FaceModel):
        super().__init__()
        self.cfg = model_cfg
        self.image_size = render_cfg.image_size
        self.n_views = len(model_cfg.view_yaw_deg)
        self.layout = face_model.layout(self.n_views)
        self.face = FaceModelBuffers(face_model)
        self.backbone = create_backbone(model_cfg.backbone, in_channels=input_channels(model_cfg),
                                        width=model_cfg.width, levels=model_cfg.levels, n_views=self.n_views)
        self.regressor = create_regressor(model_cfg.regressor, in_channels=self.backbone.out_channels,
                                          width=model_cfg.regressor_width, layout=self.layout,
                                          view_yaw_deg=tuple(model_cfg.view_yaw_deg),
                                          stages=tuple(model_cfg.regressor_blocks),
                                          involution_norm=model_cfg.involution_norm)
        self.renderer = create_renderer(render_cfg)
        # kept out of the module tree: not in the state dict (a checkpoint bundles the parse net
        # on its own) and not among the parameters DDP and the optimiser see
        object.__setattr__(self, "input_parse_net", None)

    def set_input_parse_net(self, parse_net: nn.Module | None) -> None:
        """The frozen parse net whose masks the network reads when ``model.input_masks`` is
        ``parse_net`` (training and :class:`dfmvr.serving.Reconstructor` set it)."""
        object.__setattr__(self, "input_parse_net", parse_net)

    def encode(self, images: torch.Tensor, masks: torch.Tensor | None = None, *,
               backbone_grad_2d: float = 1.0) -> torch.Tensor:
        """``images [B, V, 3, S, S]`` in [-1, 1] (+ ``masks [B, V, S, S]``) -> coefficients ``[B, 269]``.

        ``masks``: the class maps the network reads beside the views (``model.mask_input``). For a
        model that reads the parse net's masks (``model.input_masks=parse_net``) they are the parse
        net's masks of these images (the mask cache's, in training) or None to make them here with
        the model's parse net; for any other, the views' own masks.

        ``backbone_grad_2d`` scales the gradient the coefficients other than the shape send into
        the network below the head (``loss.backbone_grad_2d``)."""
        b, v, c, h, w = images.shape
        if (v, c, h, w) != (self.n_views, 3, self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape (B, {self.n_views}, 3, {self.image_size}, {self.image_size}); "
                f"got {tuple(images.shape)}"
            )
        x = images
        if reads_parse_net_masks(self.cfg) and masks is None:
            if self.input_parse_net is None:
                raise ValueError("model.input_masks is parse_net but no parse net is loaded (model.parse_net): "
                                 "the network reads the frozen parse net's masks")
            masks = parsed_masks(self.input_parse_net, images)
        if self.cfg.mask_input:
            if masks is None:
                raise ValueError("model.mask_input is on but no masks were given (run the parse net first)")
            x = torch.cat([images, mask_channels(masks, self.cfg.mask_encoding).to(images.dtype)], dim=2)
        return self.regressor(self.backbone(x), other_grad=backbone_grad_2d)

    def decode(self, coeffs: torch.Tensor, *, render: bool = True, shape_grad_2d: float = 1.0) -> ReconOutput:
        """Coefficients ``[B, 269]`` -> meshes, per-view poses, shading, renders and landmarks.

        ``shape_grad_2d`` scales the gradient the picture-space terms send into the shape
        (``loss.shape_grad_2d``; :func:`dfmvr.facemodel.decode.decode_faces`).
        """
        fm = self.face.model
        parts = self.layout.split(coeffs)
        b, v, s = coeffs.shape[0], self.n_views, self.image_size
        d = decode_faces(fm, parts, self.renderer, render=render, shape_grad_2d=shape_grad_2d)
        n = d.shape.shape[1]
        return ReconOutput(
            coeffs=coeffs, parts=parts, shape=d.shape, albedo=d.albedo,
            posed=d.posed.view(b, v, n, 3), colors=d.colors.view(b, v, n, 3),
            image=d.image.view(b, v, 3, s, s) if render else None,
            render_mask=d.mask.view(b, v, 1, s, s) if render else None,
            region=d.region.view(b, v, s, s) if render else None,
            lm2d=d.lm2d.view(b, v, 68, 2), lm3d=d.shape[:, fm.lm3d_index],
        )

    amp_dtype: torch.dtype | None = None
    """Autocast dtype for the network part (bf16/fp16; on CPU bf16, which pays only on CPUs with
    native bf16 instructions: ``docs/benchmarks.md``, "Train step"); the face model and the
    renderer always run in float32 (depth tests and barycentrics need the precision)."""

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None, *, render: bool = True,
                shape_grad_2d: float = 1.0, backbone_grad_2d: float = 1.0) -> ReconOutput:
        use_amp = self.amp_dtype is not None
        with torch.autocast(device_type=images.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=use_amp):
            coeffs = self.encode(images, masks, backbone_grad_2d=backbone_grad_2d)
        return self.decode(coeffs.float(), render=render, shape_grad_2d=shape_grad_2d)
