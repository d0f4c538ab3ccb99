"""BiSeNet face parse net (Yu et al., ECCV 2018), 10 classes, and its checkpoint format.

DF-MVR uses it frozen: to make the parsing masks concatenated to the input views when a
dataset has none, and in the mask loss (cross-entropy of its prediction on the rendered
image against the input mask). It is trained by its own job.

Layout at ``width`` w (64 is BiSeNet's ResNet-18 proper):

- context path: a ResNet-18-like net (7x7 stride-2 stem, max-pool, four stages of two basic
  blocks, widths w, 2w, 4w, 8w at 1/4..1/32), attention refinement modules (ARM) on the 1/16
  and 1/32 features (to 2w channels), the global context (average pool of the 1/32 feature,
  1x1 ConvBNReLU) added to the 1/32 branch, each branch up-sampled (nearest) and refined by a
  3x3 ConvBNReLU: ``cp8`` (1/8) and ``cp16`` (1/16);
- spatial path: three stride-2 ConvBNReLU (7x7, 3x3, 3x3) and a 1x1 to 2w channels at 1/8;
- feature fusion module (FFM): concat spatial + ``cp8``, 1x1 ConvBNReLU to 4w, channel
  attention (squeeze 1/4), ``feat * att + feat``;
- heads: main (3x3 ConvBNReLU + 1x1 to ``n_classes``) on the FFM output; auxiliary heads on
  ``cp8`` ("aux16") and ``cp16`` ("aux32"); all up-sampled bilinearly to the input size.

Input: RGB ``[B, 3, H, W]`` normalised to [-1, 1] (``(x - 0.5) / 0.5``, as the reference
code does). Output: logits ``[B, n_classes, H, W]``; classes as in DESIGN.md (0 background,
1 skin, 2/3 left/right brow, 4/5 left/right eye, 6 nose, 7 mouth, 8/9 upper/lower lip).
In training mode the global-context branch pools to 1 x 1, so BatchNorm needs batch >= 2.

Checkpoints (:func:`save_parsenet`, :func:`load_parsenet`) are plain dicts that
``torch.load(weights_only=True)`` reads: ``{"format": "dfmvr.parsenet/1", "meta": {...},
"state_dict": {name: tensor}}``, with ``meta`` holding at least ``n_classes``, ``width``,
``in_channels`` and ``image_size``.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dfmvr.facemodel.model import N_PARSE_CLASSES
from dfmvr.nets.blocks import ConvBNReLU, init_weights

_logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dfmvr.parsenet/1"


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 ConvBN with a residual; ``[B, C_in, H, W] -> [B, C_out, H/s, W/s]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, out_channels, 3, stride=stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18Features(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 features (2w, 4w, 8w channels)."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNReLU(in_channels, width, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1))
        chans = [width, width, 2 * width, 4 * width, 8 * width]
        self.stages = nn.ModuleList(
            nn.Sequential(BasicBlock(chans[i], chans[i + 1], 1 if i == 0 else 2), BasicBlock(chans[i + 1], chans[i + 1]))
            for i in range(4)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stages[0](self.stem(x))
        feat8 = self.stages[1](x)
        feat16 = self.stages[2](feat8)
        feat32 = self.stages[3](feat16)
        return feat8, feat16, feat32


class AttentionRefinement(nn.Module):
    """ARM: 3x3 ConvBNReLU, then channel attention from the globally pooled feature."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 3)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(out_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * self.attention(feat)


class ContextPath(nn.Module):
    """ResNet-18 trunk + ARMs at 1/16 and 1/32 + global context; returns ``(feat8, cp8, cp16)``."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.trunk = ResNet18Features(in_channels, width)
        self.arm16 = AttentionRefinement(4 * width, 2 * width)
        self.arm32 = AttentionRefinement(8 * width, 2 * width)
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(8 * width, 2 * width, 1))
        self.head32 = ConvBNReLU(2 * width, 2 * width, 3)
        self.head16 = ConvBNReLU(2 * width, 2 * width, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.trunk(x)
        sum32 = self.arm32(feat32) + self.global_context(feat32)  # [B, 2w, 1, 1] broadcasts
        cp16 = self.head32(F.interpolate(sum32, size=feat16.shape[-2:], mode="nearest"))
        sum16 = self.arm16(feat16) + cp16
        cp8 = self.head16(F.interpolate(sum16, size=feat8.shape[-2:], mode="nearest"))
        return cp8, cp16


class SpatialPath(nn.Module):
    """Three stride-2 ConvBNReLU (to 1/8) and a 1x1 to ``2 * width`` channels."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, width, 7, stride=2),
            ConvBNReLU(width, width, 3, stride=2),
            ConvBNReLU(width, width, 3, stride=2),
            ConvBNReLU(width, 2 * width, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class FeatureFusion(nn.Module):
    """FFM: concat, 1x1 ConvBNReLU, squeeze-excite style channel attention, residual."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, 1)
        squeeze = max(1, out_channels // 4)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(out_channels, squeeze, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(squeeze, out_channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.conv(torch.cat([spatial, context], dim=1))
        return feat * self.attention(feat) + feat


class SegmentationHead(nn.Sequential):
    """3x3 ConvBNReLU then a 1x1 convolution to class logits."""

    def __init__(self, in_channels: int, mid_channels: int, n_classes: int) -> None:
        super().__init__(ConvBNReLU(in_channels, mid_channels, 3), nn.Conv2d(mid_channels, n_classes, 1, bias=False))


class BiSeNet(nn.Module):
    """Bilateral segmentation network for face parsing.

    Args:
        n_classes: output classes (10: DESIGN.md's parsing classes).
        width: base width of the context path (64 = ResNet-18 proper; 8 or 16 train on CPU).
        in_channels: input channels (3, RGB in [-1, 1]).

    Shapes: ``x [B, in_channels, H, W] -> logits [B, n_classes, H, W]``; with
    ``return_aux=True`` in training mode, ``(main, aux16, aux32)``, all ``[B, n_classes, H, W]``.
    """

    def __init__(self, n_classes: int = N_PARSE_CLASSES, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if n_classes < 2 or width < 1 or in_channels < 1:
            raise ValueError(
                f"BiSeNet: expected n_classes >= 2, width >= 1, in_channels >= 1; got {n_classes}, {width}, {in_channels}"
            )
        self.n_classes = n_classes
        self.width = width
        self.in_channels = in_channels
        self.frozen = False
        self.meta: dict[str, Any] = {}
        """Checkpoint metadata (``image_size`` ...) when loaded by :func:`load_parsenet`."""
        self.context = ContextPath(in_channels, width)
        self.spatial = SpatialPath(in_channels, width)
        self.fusion = FeatureFusion(4 * width, 4 * width)
        self.head = SegmentationHead(4 * width, 4 * width, n_classes)
        self.aux16 = SegmentationHead(2 * width, width, n_classes)
        self.aux32 = SegmentationHead(2 * width, width, n_classes)
        init_weights(self)

    def forward(
        self, x: torch.Tensor, *, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: ``x [B, C, H, W]`` in [-1, 1]. Returns logits ``[B, n_classes, H, W]``, or
        ``(main, aux16, aux32)`` when ``return_aux`` and in training mode (the auxiliary heads
        are not computed in eval mode)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BiSeNet input must have shape (B, {self.in_channels}, H, W); got {tuple(x.shape)}")
        size = x.shape[-2:]
        cp8, cp16 = self.context(x)
        main = self._upsample(self.head(self.fusion(self.spatial(x), cp8)), size)
        if not (return_aux and self.training):
            return main
        return main, self._upsample(self.aux16(cp8), size), self._upsample(self.aux32(cp16), size)

    @staticmethod
    def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def freeze(self) -> BiSeNet:
        """Eval mode for good (a parent's ``.train()`` no longer switches it) and no parameter
        gradients; gradients still flow to the input (the mask loss needs them). Returns self."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> BiSeNet:
        return super().train(mode and not self.frozen)


def _plain(key: str, value: Any, path: Path) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(key, v, path) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(f"{key}.{k}", v, path) for k, v in value.items()}
    raise TypeError(
        f"parse net checkpoint {path}: meta[{key!r}] must be plain data (None, bool, int, float, str, "
        f"list, dict), got {type(value).__name__}"
    )


def save_parsenet(path: str | os.PathLike, model: BiSeNet, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` to ``path`` (atomically: temp file, then rename).

    Args:
        path: local file path (parent folders are created).
        model: the parse net.
        meta: plain metadata; must hold ``image_size`` (the side it was trained at).
            ``n_classes``, ``width`` and ``in_channels`` are taken from the model.

    Returns:
        The path written.

    Raises:
        ValueError: when ``meta`` lacks ``image_size`` or contradicts the model.
        TypeError: when a ``meta`` value is not plain data.
    """
    path = Path(path)
    meta = {str(k): _plain(str(k), v, path) for k, v in meta.items()}
    if "image_size" not in meta:
        raise ValueError(f"parse net checkpoint {path}: meta must hold 'image_size'; got keys {sorted(meta)}")
    for key in ("n_classes", "width", "in_channels"):
        if key in meta and meta[key] != getattr(model, key):
            raise ValueError(
                f"parse net checkpoint {path}: meta[{key!r}] = {meta[key]!r} contradicts the model's {getattr(model, key)}"
            )
        meta[key] = getattr(model, key)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "meta": meta,
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    _logger.info("saved parse net (%d classes, width %d) to %s", model.n_classes, model.width, path)
    return path


def read_parsenet_file(path: str | os.PathLike) -> dict:
    """The raw dict of :func:`save_parsenet`'s file (``format``, ``meta``, ``state_dict``), loaded
    as data only; what a model bundle embeds (:func:`dfmvr.train.checkpoint.save_checkpoint`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parse net checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"parse net checkpoint {path}: not a readable torch checkpoint ({e})") from e


def load_parsenet(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, n_classes: int | None = N_PARSE_CLASSES
) -> BiSeNet:
    """Load a frozen parse net (eval mode, ``requires_grad`` False) from :func:`save_parsenet`'s file.

    Args:
        path: checkpoint file.
        device: where to put the model.
        n_classes: the class count the caller needs (``None`` accepts any).

    Returns:
        The frozen :class:`BiSeNet`; ``model.meta`` holds the checkpoint's metadata.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a parse-net checkpoint, wrong class count, missing/unexpected
            weights or wrong shapes; the message names the file.
    """
    return parsenet_from_dict(read_parsenet_file(path), str(path), device, n_classes=n_classes)


def parsenet_from_dict(ckpt: object, source: str, device: str | torch.device = "cpu", *,
                       n_classes: int | None = N_PARSE_CLASSES) -> BiSeNet:
    """The frozen :class:`BiSeNet` in :func:`read_parsenet_file`'s dict; ``source`` names where it
    came from in every error (a file, or the model bundle that embeds it).

    Raises:
        ValueError: not a parse-net checkpoint, wrong class count, missing/unexpected weights or
            wrong shapes.
    """
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"parse net checkpoint {source}: expected format {CHECKPOINT_FORMAT!r}, got {got!r}")
    meta, state = ckpt.get("meta"), ckpt.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise ValueError(f"parse net checkpoint {source}: expected dicts 'meta' and 'state_dict'")
    missing_meta = [k for k in ("n_classes", "width", "in_channels", "image_size") if k not in meta]
    if missing_meta:
        raise ValueError(f"parse net checkpoint {source}: meta lacks {missing_meta}")
    if n_classes is not None and meta["n_classes"] != n_classes:
        raise ValueError(
            f"parse net checkpoint {source}: has {meta['n_classes']} classes, expected {n_classes} "
            "(DESIGN.md parsing classes)"
        )
    model = BiSeNet(n_classes=meta["n_classes"], width=meta["width"], in_channels=meta["in_channels"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"parse net checkpoint {source}: missing weights {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected weights {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise ValueError(
                f"parse net checkpoint {source}: weight {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(value.shape)} for n_classes={meta['n_classes']}, width={meta['width']}"
            )
    model.load_state_dict(state)
    model.meta = dict(meta)
    return model.to(device).freeze()
