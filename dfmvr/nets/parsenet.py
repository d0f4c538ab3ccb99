"""Face parse nets (10 classes) in a registry, and their checkpoint format.

DF-MVR uses a parse net frozen: it makes the parsing masks the network reads beside each view
(the paper's pipeline: "by leveraging pre-trained BiSeNet, we could attain the corresponding face
mask"), the masks that weigh the photometric loss, and the mask loss (cross-entropy of its
prediction on the rendered image against the input's mask). It is trained by its own job
(:mod:`dfmvr.train.parsing`).

Architectures are registered by name (``parsenet.arch``; :func:`create_parsenet`,
:func:`list_parsenets`), every one a :class:`ParseNet`: ``x [B, C_in, H, W]`` in [-1, 1] ->
logits ``[B, n_classes, H, W]``.

- ``bisenet`` (:class:`BiSeNet`, Yu et al., ECCV 2018): the paper's net, made for 512 px
  inputs. Its spatial path and its finest context feature are at 1/8 of the input: at the tiny
  preset's 64 px that is an 8 x 8 grid, too coarse for brows, eyes and lips (docs/parsenet.md).
- ``unet`` (:class:`ParseUNet`): a U-Net whose decoder comes back to full resolution, for small
  inputs; at 64 px width 16 it has 0.48 M parameters and sees every part (docs/parsenet.md).

BiSeNet's layout at ``width`` w (64 is BiSeNet's ResNet-18 proper):

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
code does). Output: logits ``[B, n_classes, H, W]``; classes as in docs/design.md (0 background,
1 skin, 2/3 left/right brow, 4/5 left/right eye, 6 nose, 7 mouth, 8/9 upper/lower lip).
In training mode BiSeNet's global-context branch pools to 1 x 1, so BatchNorm needs batch >= 2.

Checkpoints (:func:`save_parsenet`, :func:`load_parsenet`) are plain dicts that
``torch.load(weights_only=True)`` reads: ``{"format": "dfmvr.parsenet/1", "meta": {...},
"state_dict": {name: tensor}}``, with ``meta`` holding at least ``n_classes``, ``width``,
``in_channels`` and ``image_size``, and ``arch`` (``bisenet`` when absent: files written before
the registry). :func:`parsenet_digest` names a checkpoint's weights (the mask cache's key).

One job: the parse-net architectures, their registry and their checkpoint format; training them is
:mod:`dfmvr.train.parsing`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dfmvr.facemodel.model import N_PARSE_CLASSES
from dfmvr.nets.blocks import ConvBNReLU, DoubleConv, init_weights

_logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dfmvr.parsenet/1"
DEFAULT_ARCH = "bisenet"
"""The architecture of a checkpoint whose meta names none (written before the registry)."""

_PARSENETS: dict[str, Callable[..., "ParseNet"]] = {}
_P = TypeVar("_P", bound=Callable[..., "ParseNet"])


def register_parsenet(fn: _P) -> _P:
    """Register ``fn(*, n_classes, width, in_channels) -> ParseNet`` under its name (``parsenet.arch``)."""
    name = fn.__name__
    if name in _PARSENETS and _PARSENETS[name] is not fn:
        raise ValueError(f"parse net {name!r} is already registered (by {_PARSENETS[name].__module__})")
    _PARSENETS[name] = fn
    return fn


def list_parsenets() -> list[str]:
    """Registered parse-net architectures, sorted."""
    return sorted(_PARSENETS)


def create_parsenet(arch: str, *, n_classes: int = N_PARSE_CLASSES, width: int = 64,
                    in_channels: int = 3) -> "ParseNet":
    """Build a registered parse net.

    Raises:
        ValueError: an unknown ``arch`` (naming the registered ones) or bad sizes.
    """
    if arch not in _PARSENETS:
        raise ValueError(f"parsenet.arch: unknown parse net {arch!r}; registered: {list_parsenets()}")
    # channels-last weights (and inputs, ParseNet.forward): its convolutions of 16-128 channels ran
    # 1.2-1.35x faster so on these CPUs (docs/parsenet.md), and every path (training, the mask cache,
    # the mask loss, inference) computes alike
    return _PARSENETS[arch](n_classes=n_classes, width=width, in_channels=in_channels).to(
        memory_format=torch.channels_last)


class ParseNet(nn.Module):
    """What every parse net shares: its sizes, the input check, the frozen mode and ``meta``.

    Subclasses implement :meth:`logits` (``x [B, C_in, H, W] -> [B, n_classes, H, W]``) and may
    override :meth:`forward` to add deeply supervised heads in training.
    """

    arch = ""
    amp_dtype: torch.dtype | None = None
    """Autocast dtype of every pass of the net (its masks, the mask loss's pass), set where it is
    loaded for use (``train.parse_net_amp``: bf16 where the device computes it natively), or None:
    float32. Logits come out in float32 either way. bf16 and float32 masks of the tiny preset's
    parse net differ in 0.02% of the pixels, at 2.3x the speed (docs/parsenet.md)."""

    def __init__(self, n_classes: int, width: int, in_channels: int) -> None:
        super().__init__()
        if n_classes < 2 or width < 1 or in_channels < 1:
            raise ValueError(f"{type(self).__name__}: expected n_classes >= 2, width >= 1, in_channels >= 1; "
                             f"got {n_classes}, {width}, {in_channels}")
        self.n_classes = n_classes
        self.width = width
        self.in_channels = in_channels
        self.frozen = False
        self.meta: dict[str, Any] = {}
        """Checkpoint metadata (``image_size`` ...) when loaded by :func:`load_parsenet`."""

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} input must have shape (B, {self.in_channels}, H, W); "
                             f"got {tuple(x.shape)}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *, return_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Args: ``x [B, C, H, W]`` in [-1, 1]. Returns logits ``[B, n_classes, H, W]`` (with
        ``return_aux`` in training mode: a tuple whose first entry is those logits)."""
        self.check_input(x)
        with self.precision(x):
            main = self.logits(x.contiguous(memory_format=torch.channels_last)).float()
        return (main,) if return_aux and self.training else main

    def precision(self, x: torch.Tensor):
        """The autocast context of a pass on ``x`` (:attr:`amp_dtype`; off when None)."""
        return torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None)

    def freeze(self) -> "ParseNet":
        """Eval mode for good (a parent's ``.train()`` no longer switches it) and no parameter
        gradients; gradients still flow to the input (the mask loss needs them). Returns self."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "ParseNet":
        return super().train(mode and not self.frozen)


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


class BiSeNet(ParseNet):
    """Bilateral segmentation network for face parsing (the paper's parse net).

    Args:
        n_classes: output classes (10: the parsing classes of docs/design.md).
        width: base width of the context path (64 = ResNet-18 proper; 8 or 16 train on CPU).
        in_channels: input channels (3, RGB in [-1, 1]).

    Shapes: ``x [B, in_channels, H, W] -> logits [B, n_classes, H, W]``; with
    ``return_aux=True`` in training mode, ``(main, aux16, aux32)``, all ``[B, n_classes, H, W]``.
    """

    arch = "bisenet"

    def __init__(self, n_classes: int = N_PARSE_CLASSES, width: int = 64, in_channels: int = 3) -> None:
        super().__init__(n_classes, width, in_channels)
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
        self.check_input(x)
        x = x.contiguous(memory_format=torch.channels_last)
        size = x.shape[-2:]
        with self.precision(x):
            cp8, cp16 = self.context(x)
            main = self._upsample(self.head(self.fusion(self.spatial(x), cp8)), size).float()
            if not (return_aux and self.training):
                return main
            return main, self._upsample(self.aux16(cp8), size).float(), self._upsample(self.aux32(cp16), size).float()

    @staticmethod
    def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class ParseUNet(ParseNet):
    """A U-Net parse net whose decoder returns to the input's resolution.

    ``levels`` encoder levels of :class:`~dfmvr.nets.blocks.DoubleConv` (widths w, 2w, 4w, ...,
    a 2x2 max-pool between levels), then per level up: a 2x2 transposed convolution, the skip
    feature of that level concatenated, a DoubleConv; a 1x1 convolution to the class logits.
    Every part of a 64 px face (a brow is 2-3 px tall there) keeps a full-resolution path to
    the output, which BiSeNet's 1/8-stride paths do not give it.

    Args:
        n_classes, width, in_channels: as :class:`BiSeNet`.
        levels: encoder levels; ``H`` and ``W`` must be multiples of ``2 ** (levels - 1)``.

    Shapes: ``x [B, in_channels, H, W] -> logits [B, n_classes, H, W]``.
    """

    arch = "unet"

    def __init__(self, n_classes: int = N_PARSE_CLASSES, width: int = 16, in_channels: int = 3,
                 levels: int = 4) -> None:
        super().__init__(n_classes, width, in_channels)
        if levels < 2:
            raise ValueError(f"ParseUNet: expected levels >= 2, got {levels}")
        self.levels = levels
        widths = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList(DoubleConv(c_in, c_out) for c_in, c_out in zip([in_channels, *widths], widths))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in reversed(range(levels - 1)))
        self.merge = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(levels - 1)))
        self.head = nn.Conv2d(width, n_classes, 1)
        init_weights(self)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2 ** (self.levels - 1)
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"ParseUNet with {self.levels} levels: H and W must be multiples of {multiple}; "
                             f"got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


@register_parsenet
def bisenet(*, n_classes: int = N_PARSE_CLASSES, width: int = 64, in_channels: int = 3) -> BiSeNet:
    """The paper's BiSeNet (ResNet-18 context path at width 64)."""
    return BiSeNet(n_classes=n_classes, width=width, in_channels=in_channels)


@register_parsenet
def unet(*, n_classes: int = N_PARSE_CLASSES, width: int = 16, in_channels: int = 3) -> ParseUNet:
    """A 4-level U-Net with a full-resolution decoder (small inputs; the tiny preset's)."""
    return ParseUNet(n_classes=n_classes, width=width, in_channels=in_channels, levels=4)


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


def save_parsenet(path: str | os.PathLike, model: ParseNet, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` to ``path`` (atomically: temp file, then rename).

    Args:
        path: local file path (parent folders are created).
        model: the parse net.
        meta: plain metadata; must hold ``image_size`` (the side it was trained at).
            ``arch``, ``n_classes``, ``width`` and ``in_channels`` are taken from the model.

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
    for key in ("arch", "n_classes", "width", "in_channels"):
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
    _logger.info("saved parse net (%s, %d classes, width %d) to %s", model.arch, model.n_classes, model.width, path)
    return path


BUILTIN = "builtin"
"""``model.parse_net=builtin``: the parse net that ships with dfmvr (:func:`builtin_parsenet_path`)."""


def builtin_parsenet_path() -> Path:
    """The parse net that ships inside the package (``dfmvr/assets/parsenet_tiny.pt``): the tiny
    preset's U-Net trained on the embedded synthetic shards at 64 px, the way
    docs/parsenet.md ("The builtin parse net") says; the tiny preset's ``model.parse_net``. Made
    from procedural faces only, so anyone may redistribute it."""
    return Path(__file__).resolve().parents[1] / "assets" / "parsenet_tiny.pt"


def read_parsenet_file(path: str | os.PathLike) -> dict:
    """The raw dict of :func:`save_parsenet`'s file (``format``, ``meta``, ``state_dict``), loaded
    as data only; what a model bundle embeds (:func:`dfmvr.train.checkpoint.save_checkpoint`).
    ``path`` may be :data:`BUILTIN` (the parse net that ships with dfmvr).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable torch checkpoint.
    """
    path = builtin_parsenet_path() if str(path) == BUILTIN else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parse net checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"parse net checkpoint {path}: not a readable torch checkpoint ({e})") from e


def load_parsenet(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, n_classes: int | None = N_PARSE_CLASSES
) -> ParseNet:
    """Load a frozen parse net (eval mode, ``requires_grad`` False) from :func:`save_parsenet`'s file.

    Args:
        path: checkpoint file.
        device: where to put the model.
        n_classes: the class count the caller needs (``None`` accepts any).

    Returns:
        The frozen :class:`ParseNet` of the checkpoint's ``arch``; ``model.meta`` holds its metadata.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a parse-net checkpoint, wrong class count, missing/unexpected
            weights or wrong shapes; the message names the file.
    """
    return parsenet_from_dict(read_parsenet_file(path), str(path), device, n_classes=n_classes)


def parsenet_from_dict(ckpt: object, source: str, device: str | torch.device = "cpu", *,
                       n_classes: int | None = N_PARSE_CLASSES) -> ParseNet:
    """The frozen :class:`ParseNet` in :func:`read_parsenet_file`'s dict; ``source`` names where it
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
            '(docs/design.md, "Face-parsing classes")'
        )
    arch = meta.get("arch", DEFAULT_ARCH)
    if arch not in _PARSENETS:
        raise ValueError(f"parse net checkpoint {source}: architecture {arch!r} is not registered here; "
                         f"registered: {list_parsenets()}")
    model = create_parsenet(arch, n_classes=meta["n_classes"], width=meta["width"], in_channels=meta["in_channels"])
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
                f"expected {tuple(value.shape)} for {arch} n_classes={meta['n_classes']}, width={meta['width']}"
            )
    model.load_state_dict(state)
    model.meta = dict(meta)
    return model.to(device).freeze()


def parsenet_digest(ckpt: Mapping[str, Any]) -> str:
    """A short hex digest of a parse net's weights and architecture (:func:`read_parsenet_file`'s
    dict): two checkpoints with the same digest make the same masks. The mask cache is keyed
    by it (:mod:`dfmvr.data.parsed_masks`)."""
    meta = ckpt.get("meta") or {}
    h = hashlib.sha256()
    for key in ("arch", "n_classes", "width", "in_channels", "image_size"):
        h.update(f"{key}={meta.get(key, DEFAULT_ARCH if key == 'arch' else None)};".encode())
    state = ckpt.get("state_dict") or {}
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return h.hexdigest()[:16]
