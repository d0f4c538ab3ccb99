"""Train-step speed: forward + backward seconds per triplet of the full DF-MVR model on CPU.

    .venv/bin/python benchmarks/train_step.py [--json] [--presets tiny,paper] [--backbones fusion,unet,cnn]
        [--batches 1,4] [--paper-batches 1] [--repeat N] [--tiny-repeat N] [--channels-last] [--bf16]
        [--compare-modes [--modes fp32,channels_last]] [--compare-involution] [--no-ref] [--threads N]

One timed step of the full model is what the training loop does between two optimiser steps:
``DFMVR.forward`` (backbone, regressor, face model on the preset's vertex count, rendering of
the three views), every active loss term (``reconstruction_losses``: photometric, 2D and 3D
landmarks, regularisers; the mask loss is off, as in training without a parse net) and
``backward()``. The Adam update is timed separately (``*_adam_s``). Inputs are random tensors
with the shapes of a real :class:`dfmvr.data.batch.Batch` (images, masks, weight maps,
landmarks); the untrained model renders the mean face at the views' nominal yaws, which covers
a realistic part of each image (the rasteriser's cost depends on how much of the image the
face covers, so the model is left at its initialisation rather than given random weights that
would blow the face up). Where batch 1 cannot train (the ``cnn`` backbone leaves the
regressor's last map at 1 x 1, and training-mode BatchNorm needs more than one value per
channel) that case runs batch 2 instead, and says so.

At the ``paper`` preset the run also times the reference-shaped three-encoder U-Net alone
(:class:`RefTriUNet`: the reference implementation's layer shapes, with its conv biases, in
plain float32 NCHW) on a ``mean(out**2)`` loss, batch 1, interleaved step by step with the
full models so that both see the same machine load; the ratio of the medians is the
headline figure. ``--compare-modes`` adds the fusion model in all four of float32 /
channels_last / bf16 autocast / both (interleaved as well); ``--channels-last`` and ``--bf16``
choose the mode of the headline keys. ``--compare-involution`` adds the fusion model with the
``F.unfold`` involution everywhere (the formulation the tap loop replaced).

Reported per case: median wall seconds per step and per triplet, the process CPU seconds per
step (all threads; on a loaded machine wall time stretches, CPU time much less), a forward
breakdown (backbone, regressor, decode = face model + render + landmarks, losses), backward,
parameter counts, and the resident-memory high-water mark during the case's steps (VmHWM,
reset before each step through ``/proc/self/clear_refs``) and its rise over the resident
memory just before the step. ``--json`` prints one JSON object as the last line (docs/design.md
"Machine-readable results") with ``paper_full_s_per_triplet``,
``paper_ref_trinet_s_per_triplet``, ``paper_full_over_ref_trinet`` and
``tiny_triplets_per_s`` among its results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_record  # noqa: E402

from dfmvr.config import Config  # noqa: E402
from dfmvr.data.batch import Batch  # noqa: E402
from dfmvr.facemodel import build_face_model  # noqa: E402
from dfmvr.model import DFMVR, build_model, input_channels  # noqa: E402
from dfmvr.facemodel.layout import CoeffLayout  # noqa: E402
from dfmvr.nets import create_backbone, create_regressor  # noqa: E402
from dfmvr.nets.involution import Involution2d  # noqa: E402
from dfmvr.presets import get_preset  # noqa: E402
from dfmvr.train.objective import reconstruction_losses  # noqa: E402

MODES = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True),
         "channels_last_bf16": (True, True)}
"""Mode name -> (channels_last, bf16 autocast of the network part)."""


# ---- the reference-shaped three-encoder U-Net


class _RefConvBlock(nn.Sequential):
    """The reference's conv_block: (3x3 conv with bias, BN, ReLU) twice."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _RefAttention(nn.Module):
    """Attention U-Net's additive gate with biased 1x1 convs (the reference's Attention_block)."""

    def __init__(self, f_g: int, f_l: int, f_int: int) -> None:
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(f_g, f_int, 1), nn.BatchNorm2d(f_int))
        self.w_x = nn.Sequential(nn.Conv2d(f_l, f_int, 1), nn.BatchNorm2d(f_int))
        self.psi = nn.Sequential(nn.Conv2d(f_int, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(torch.relu(self.w_g(g) + self.w_x(x)))


class RefTriUNet(nn.Module):
    """The reference-shaped three-encoder attention U-Net, as the paper describes it (Sec. III-C).

    Three unshared encoders (conv blocks 64..1024 channels with 2x2 max-pooling), one decoder:
    at each level a 2x2 stride-2 transposed conv (with bias) of the previous decoder feature
    (the concatenated deepest features at first), one attention gate per view on that view's
    skip (inner width half the skip's), concatenation of the up-sampled feature and the three
    gated skips, a conv block. Output: the last conv block, ``[B, 64, H, W]``. Written
    independently of :mod:`dfmvr.nets` (biases everywhere, as the reference), so it is the
    baseline our ``fusion`` backbone is measured against.
    """

    def __init__(self, in_channels: int = 4, width: int = 64, levels: int = 5, n_views: int = 3) -> None:
        super().__init__()
        chans = [width * 2**i for i in range(levels)]
        self.encoders = nn.ModuleList(
            nn.ModuleList(_RefConvBlock(a, b) for a, b in zip([in_channels] + chans[:-1], chans))
            for _ in range(n_views)
        )
        self.pool = nn.MaxPool2d(2, 2)
        self.ups, self.atts, self.decs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c_prev = n_views * chans[-1]
        for c in reversed(chans[:-1]):
            self.ups.append(nn.ConvTranspose2d(c_prev, c, 2, stride=2))
            self.atts.append(nn.ModuleList(_RefAttention(c, c, c // 2) for _ in range(n_views)))
            self.decs.append(_RefConvBlock((n_views + 1) * c, c))
            c_prev = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, V, C, H, W]`` -> ``[B, width, H, W]``."""
        skips = []
        for v, enc in enumerate(self.encoders):
            h, feats = x[:, v], []
            for i, block in enumerate(enc):
                h = block(h if i == 0 else self.pool(h))
                feats.append(h)
            skips.append(feats)
        d = torch.cat([f[-1] for f in skips], dim=1)
        for j, (up, atts, dec) in enumerate(zip(self.ups, self.atts, self.decs)):
            level = len(skips[0]) - 2 - j
            u = up(d)
            d = dec(torch.cat([u, *(att(u, f[level]) for att, f in zip(atts, skips))], dim=1))
        return d


# ---- memory


def _status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


# ---- cases


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_batch(cfg: Config, face_model, batch: int, seed: int = 0) -> Batch:
    """A :class:`Batch` of random tensors with a real batch's shapes and value ranges."""
    g = torch.Generator().manual_seed(seed)
    s, v = cfg.render.image_size, len(cfg.model.view_yaw_deg)
    k = int(face_model.lm3d_index.shape[0])
    return Batch(
        keys=[f"bench{i}-0" for i in range(batch)], subjects=[f"bench{i}" for i in range(batch)],
        images=torch.rand(batch, v, 3, s, s, generator=g) * 2 - 1,
        masks=torch.randint(0, 10, (batch, v, s, s), generator=g),
        has_masks=torch.ones(batch, dtype=torch.bool),
        weights=torch.rand(batch, v, 1, s, s, generator=g) * 0.9 + 0.1,
        lmk2d=torch.rand(batch, v, 68, 2, generator=g) * s,
        yaw_deg=torch.tensor([list(cfg.model.view_yaw_deg)] * batch),
        lmk3d=torch.randn(batch, k, 3, generator=g) * 0.3,
        lmk3d_valid=torch.ones(batch, k, dtype=torch.bool),
        has_lmk3d=torch.ones(batch, dtype=torch.bool),
        coeffs=torch.zeros(batch, 0), has_coeffs=torch.zeros(batch, dtype=torch.bool),
    )


@dataclass
class Case:
    """One timed configuration: ``run()`` does one step and returns its phase timings (s)."""

    name: str
    triplets: int
    params: dict[str, int]
    run: Callable[[], dict[str, float]]
    adam: Callable[[], float] | None = None
    features: Callable[[], torch.Tensor | None] = lambda: None
    first_features: torch.Tensor | None = None
    samples: list[dict[str, float]] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    rises: list[float] = field(default_factory=list)

    def timed(self) -> None:
        reset_peak_rss()
        before = rss_mb()
        cpu0 = time.process_time()
        t = self.run()
        t["cpu"] = time.process_time() - cpu0
        if self.adam is not None:
            t["adam"] = self.adam()
        self.samples.append(t)
        if self.first_features is None:
            self.first_features = self.features()
        self.peaks.append(peak_rss_mb())
        self.rises.append(self.peaks[-1] - before)

    def median(self, key: str) -> float:
        return statistics.median(s[key] for s in self.samples if key in s)

    def min(self, key: str) -> float:
        return min(s[key] for s in self.samples if key in s)


class _Stamps:
    """Forward hooks recording when the backbone and the regressor finish, and the regressor's
    pooled features (the untrained head ignores them, so the loss cannot show what a mode
    changes in the network)."""

    def __init__(self, model: DFMVR) -> None:
        self.t: dict[str, float] = {}
        self.features: torch.Tensor | None = None
        model.backbone.register_forward_hook(lambda *_: self.t.__setitem__("backbone", time.perf_counter()))
        model.regressor.register_forward_hook(lambda *_: self.t.__setitem__("regressor", time.perf_counter()))
        model.regressor.pool.register_forward_hook(lambda m, i, out: setattr(self, "features", out.detach().float()))


def full_model_case(name: str, cfg: Config, face_model, batch: int, mode: str, with_adam: bool,
                    involution: str = "auto") -> Case:
    channels_last, bf16 = MODES[mode]
    torch.manual_seed(0)
    model = build_model(cfg, face_model=face_model).train()
    for module in model.modules():
        if isinstance(module, Involution2d):
            module.method = involution
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.amp_dtype = torch.bfloat16 if bf16 else None
    stamps = _Stamps(model)
    data = random_batch(cfg, face_model, batch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6) if with_adam else None

    def run() -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(data.images, data.masks)
        t1 = time.perf_counter()
        total, _ = reconstruction_losses(model, out, data, cfg.loss, step=10**6)
        t2 = time.perf_counter()
        total.backward()
        t3 = time.perf_counter()
        if not torch.isfinite(total):
            raise RuntimeError(f"{name}: non-finite loss {float(total)}")
        return {"step": t3 - t0, "forward": t1 - t0, "backbone": stamps.t["backbone"] - t0, "loss": float(total.detach()),
                "regressor": stamps.t["regressor"] - stamps.t["backbone"], "decode": t1 - stamps.t["regressor"],
                "losses": t2 - t1, "backward": t3 - t2}

    def adam() -> float:
        t = time.perf_counter()
        opt.step()
        return time.perf_counter() - t

    params = {"backbone": n_params(model.backbone), "regressor": n_params(model.regressor),
              "total": n_params(model)}
    return Case(name, batch, params, run, adam if with_adam else None, features=lambda: stamps.features)


def batch_one_trains(cfg: Config) -> bool:
    """Whether a training step at batch 1 works: not when the regressor's last map is 1 x 1
    (e.g. after the ``cnn`` backbone, which hands it ``H / 16`` pixels), where training-mode
    BatchNorm sees one value per channel. Checked on the meta device (shapes only)."""
    in_channels = input_channels(cfg.model)
    views, size = len(cfg.model.view_yaw_deg), cfg.render.image_size
    with torch.device("meta"):
        backbone = create_backbone(cfg.model.backbone, in_channels=in_channels, width=cfg.model.width,
                                   levels=cfg.model.levels, n_views=views).train()
        regressor = create_regressor(cfg.model.regressor, in_channels=backbone.out_channels,
                                     width=cfg.model.regressor_width, layout=CoeffLayout(n_views=views),
                                     view_yaw_deg=tuple(cfg.model.view_yaw_deg)).train()
        try:
            regressor(backbone(torch.zeros(1, views, in_channels, size, size)))
        except ValueError as err:
            if is_single_value_batchnorm_error(err):
                return False
            raise
    return True


def ref_trinet_case(cfg: Config, batch: int) -> Case:
    torch.manual_seed(0)
    in_channels, views, s = 4 if cfg.model.mask_input else 3, len(cfg.model.view_yaw_deg), cfg.render.image_size
    net = RefTriUNet(in_channels, cfg.model.width, cfg.model.levels, views).train()
    x = torch.rand(batch, views, in_channels, s, s, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def run() -> dict[str, float]:
        net.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = net(x).square().mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return {"step": t2 - t0, "forward": t1 - t0, "backward": t2 - t1, "loss": float(loss.detach())}

    return Case(f"ref_trinet/b{batch}", batch, {"total": n_params(net)}, run)


def is_single_value_batchnorm_error(err: Exception) -> bool:
    return isinstance(err, ValueError) and "Expected more than 1 value per channel" in str(err)


def run_interleaved(cases: list[Case], repeat: int, warmup: int, log) -> None:
    """Warm every case up, then ``repeat`` rounds of one step of each case in turn."""
    for case in cases:
        for _ in range(warmup):
            case.run()
        log(f"  warmed up {case.name}")
    for r in range(repeat):
        for case in cases:
            case.timed()
        log(f"  round {r + 1}/{repeat}: " + ", ".join(f"{c.name} {c.samples[-1]['step']:.3f}s" for c in cases))


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--presets", default="tiny,paper", help="comma-separated: tiny, paper")
    parser.add_argument("--backbones", default="fusion,unet,cnn", help="comma-separated registered backbones")
    parser.add_argument("--batches", default="1,4", help="batch sizes at the tiny preset")
    parser.add_argument("--paper-batches", default="1", help="batch sizes at the paper preset (4 is slow)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds at the paper preset")
    parser.add_argument("--tiny-repeat", type=int, default=20, help="timed rounds at the tiny preset")
    parser.add_argument("--channels-last", action="store_true", help="headline mode: channels_last model")
    parser.add_argument("--bf16", action="store_true", help="headline mode: bf16 autocast of the network part")
    parser.add_argument("--modes", default="", help="with --compare-modes: only these modes, comma-separated "
                        f"({', '.join(MODES)}); with all four paper-size models in one process the float32 step "
                        "took 7.2 s against 4.4 s beside one other model (2026-12-07)")
    parser.add_argument("--compare-modes", action="store_true",
                        help="also time the fusion model in every mode (fp32, channels_last, bf16, both)")
    parser.add_argument("--compare-involution", action="store_true",
                        help="also time the fusion model with the unfold involution everywhere")
    parser.add_argument("--no-ref", action="store_true", help="skip the reference-shaped three-encoder U-Net")
    parser.add_argument("--no-adam", action="store_true", help="do not time the Adam step")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    primary = {(False, False): "fp32", (True, False): "channels_last", (False, True): "bf16",
               (True, True): "channels_last_bf16"}[(args.channels_last, args.bf16)]
    for p in presets:
        get_preset(p)  # fails early with the known names

    def log(msg: str) -> None:
        print(msg, flush=True)

    load_start = loadavg()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {load_start}; headline mode {primary}")
    results: dict[str, float] = {}
    units: dict[str, str] = {}
    table: list[tuple[str, str, Case]] = []

    def put(key: str, value: float, unit: str) -> None:
        results[key], units[key] = value, unit

    for preset in presets:
        cfg = get_preset(preset)
        t = time.perf_counter()
        face_model = build_face_model(cfg.facemodel)
        log(f"{preset}: face model with {face_model.mean_shape.shape[0]} vertices, {face_model.tri.shape[0]} "
            f"faces built in {time.perf_counter() - t:.1f}s; {cfg.render.image_size} px")
        batches = _ints(args.paper_batches if preset == "paper" else args.batches)
        cases: list[tuple[str, str, int, str, Case]] = []
        if preset == "paper" and not args.no_ref:
            cases.append(("ref_trinet", "fp32", 1, "ref", ref_trinet_case(cfg, 1)))
        for backbone in backbones:
            bcfg = copy.deepcopy(cfg)
            bcfg.model.backbone = backbone
            for batch in batches:
                modes = [primary]
                if args.compare_modes and backbone == "fusion":
                    wanted = args.modes.split(",") if args.modes else list(MODES)
                    modes += [m for m in wanted if m != primary]
                if batch == 1 and not batch_one_trains(bcfg):
                    if 2 in batches:
                        log(f"  {preset}/{backbone}: batch 1 skipped (the regressor's last map is 1 x 1 and "
                            f"training-mode BatchNorm needs more than one value per channel)")
                        continue
                    log(f"  {preset}/{backbone}: batch 2 instead of 1 (the regressor's last map is 1 x 1 and "
                        f"training-mode BatchNorm needs more than one value per channel)")
                    batch = 2
                for mode in modes:
                    name = f"{preset}/{backbone}/b{batch}/{mode}"
                    cases.append((backbone, mode, batch, "full",
                                  full_model_case(name, bcfg, face_model, batch, mode, not args.no_adam)))
                if args.compare_involution and backbone == "fusion":
                    cases.append((backbone, primary, batch, "unfold",
                                  full_model_case(f"{preset}/{backbone}/b{batch}/{primary}/unfold", bcfg, face_model,
                                                  batch, primary, not args.no_adam, involution="unfold")))
        repeat = args.repeat if preset == "paper" else args.tiny_repeat
        run_interleaved([c[-1] for c in cases], repeat, warmup=1 if preset == "paper" else 3, log=log)

        for backbone, mode, batch, kind, case in cases:
            table.append((preset, mode, case))
            step = case.median("step")
            tag = f"{preset}_ref_trinet" if kind == "ref" else f"{preset}_{backbone}_b{batch}_{mode}"
            tag += "_unfold" if kind == "unfold" else ""
            put(f"{tag}_s_per_step", step, "s")
            put(f"{tag}_min_s_per_step", case.min("step"), "s")
            put(f"{tag}_s_per_triplet", step / batch, "s")
            put(f"{tag}_triplets_per_s", batch / step, "triplets/s")
            put(f"{tag}_cpu_s_per_step", case.median("cpu"), "s")
            put(f"{tag}_peak_rss_mb", max(case.peaks), "MiB")
            put(f"{tag}_step_rss_rise_mb", max(case.rises), "MiB")
            for part in ("backbone", "regressor", "decode", "losses", "backward", "adam"):
                if any(part in s for s in case.samples):
                    put(f"{tag}_{part}_s", case.median(part), "s")
            for part, count in case.params.items():
                put(f"{tag}_params_{part}" if kind != "ref" else f"{tag}_params", count, "count")
        by_key = {(b, m, n, k): c for b, m, n, k, c in cases}
        full = by_key.get(("fusion", primary, 1, "full"))
        if preset == "paper" and full is not None:
            put("paper_full_s_per_triplet", full.median("step"), "s")
            ref = by_key.get(("ref_trinet", "fp32", 1, "ref"))
            if ref is not None:
                put("paper_ref_trinet_s_per_triplet", ref.median("step"), "s")
                # per-round ratios: both steps of a round ran back to back under the same load
                ratios = [f["step"] / r["step"] for f, r in zip(full.samples, ref.samples)]
                put("paper_full_over_ref_trinet", statistics.median(ratios), "ratio")
                put("paper_full_over_ref_trinet_min", full.min("step") / ref.min("step"), "ratio")
                if args.compare_modes:
                    for mode in MODES:
                        other = by_key.get(("fusion", mode, 1, "full"))
                        if other is not None:
                            put(f"paper_full_{mode}_over_ref_trinet", statistics.median(
                                f["step"] / r["step"] for f, r in zip(other.samples, ref.samples)), "ratio")
        for (backbone, mode, batch, kind), case in by_key.items():
            fp32 = by_key.get((backbone, "fp32", batch, kind))
            if kind == "unfold":
                same = by_key.get((backbone, mode, batch, "full"))
                put(f"{preset}_{backbone}_b{batch}_unfold_over_auto", statistics.median(
                    u["step"] / a["step"] for u, a in zip(case.samples, same.samples)), "ratio")
                put(f"{preset}_{backbone}_b{batch}_unfold_features_rel_diff",
                    float((case.first_features - same.first_features).norm() / same.first_features.norm()), "fraction")
            if kind == "full" and mode != "fp32" and fp32 is not None:
                # same weights (same seed) and data: how far the mode moves the pooled features
                a, b = case.first_features, fp32.first_features
                put(f"{preset}_{backbone}_b{batch}_{mode}_features_rel_diff",
                    float((a - b).norm() / b.norm()), "fraction")
        tiny = by_key.get(("fusion", primary, 4, "full"))
        if preset == "tiny" and tiny is not None:
            put("tiny_triplets_per_s", 4 / tiny.median("step"), "triplets/s")
            if tiny.adam is not None:
                put("tiny_train_triplets_per_s", 4 / (tiny.median("step") + tiny.median("adam")), "triplets/s")

    load_end = loadavg()
    log(f"\nload average at the start {load_start}, at the end {load_end}; medians of the timed rounds")
    header = (f"{'case':<38} {'s/step':>8} {'min':>8} {'s/trip':>8} {'trip/s':>8} {'cpu s':>8} {'bbone':>7} {'regr':>7} "
              f"{'decode':>7} {'loss':>7} {'bwd':>7} {'adam':>7} {'peak MiB':>9} {'rise':>7} {'params':>12}")
    log(header)
    for preset, mode, case in table:
        m = case.median
        parts = " ".join(f"{m(p):>7.3f}" if any(p in s for s in case.samples) else f"{'-':>7}"
                         for p in ("backbone", "regressor", "decode", "losses", "backward", "adam"))
        log(f"{case.name:<38} {m('step'):>8.3f} {case.min('step'):>8.3f} {m('step') / case.triplets:>8.3f} "
            f"{case.triplets / m('step'):>8.2f} {m('cpu'):>8.2f} {parts} {max(case.peaks):>9.0f} "
            f"{max(case.rises):>7.0f} {case.params['total']:>12,}")
    if "paper_full_over_ref_trinet" in results:
        log(f"paper full model ({primary}) / reference-shaped three-encoder U-Net (fp32): "
            f"{results['paper_full_over_ref_trinet']:.2f}x (median of per-round ratios), "
            f"{results['paper_full_over_ref_trinet_min']:.2f}x (ratio of the fastest steps)")
    if "tiny_triplets_per_s" in results:
        log(f"tiny full model, batch 4 ({primary}): {results['tiny_triplets_per_s']:.1f} triplets/s forward+backward")
    if args.json:
        record = {
            "benchmark": "train_step",
            "results": results,
            "units": units,
            "machine": machine_record(load_average_start=load_start, load_average_end=load_end,
                                      mkldnn=torch.backends.mkldnn.is_available()),
            "config": {"presets": presets, "backbones": backbones, "batches": _ints(args.batches),
                       "paper_batches": _ints(args.paper_batches), "repeat": args.repeat,
                       "tiny_repeat": args.tiny_repeat, "mode": primary, "compare_modes": args.compare_modes},
        }
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
