"""One synthetic sample: a subject's identity and albedo, a capture's expression, lighting, poses
and backgrounds drawn (:func:`sample_params`), its three views rendered (:func:`render_views`)
and packed as a shard :class:`~dfmvr.data.shards.Sample` (:func:`make_sample`). The dataset job
that plans, parallelises, resumes and writes them is :mod:`dfmvr.data.synth`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dfmvr.data.backgrounds import random_background
from dfmvr.data.shards import VIEWS, Sample

if TYPE_CHECKING:
    from dfmvr.data.synth import SynthConfig


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    """Distributions the generator draws from (all coefficient scales multiply N(0, 1))."""

    id_scale: float = 1.0
    """Identity coefficients."""
    exp_scale: float = 1.0
    """Expression coefficients (captures after the first)."""
    tex_scale: float = 0.8
    """Albedo coefficients. At 1.0 the procedural model's first (skin tone) component puts 1% of
    faces at albedo luminance below 0.07 (near black) and some at negative green; 0.8 keeps
    the 1st..99th percentile within about 0.15..0.85."""
    neutral_first: bool = True
    """Capture 0 of every subject has a neutral expression (zero expression coefficients)."""
    light_dc: tuple[float, float] = (-0.15, 0.35)
    """Uniform range added to every channel's SH DC term (on top of the renderer's +0.8)."""
    light_tint: float = 0.06
    """Std-dev of the per-channel deviation of the DC term (coloured light)."""
    light_dir: float = 0.18
    """Std-dev of the first-order (directional) SH terms, shared by the channels."""
    light_second: float = 0.06
    """Std-dev of the second-order SH terms, shared by the channels."""
    angle_jitter_deg: tuple[float, float, float] = (4.0, 4.0, 2.0)
    """Std-dev of pitch, yaw and roll jitter per view, degrees (clipped at 2.5 sigma)."""
    trans_jitter: tuple[float, float, float] = (0.04, 0.04, 0.15)
    """Std-dev of x, y, z translation per view, decimetres (clipped at 2.5 sigma)."""

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def subject_name(index: int) -> str:
    return f"synth{index:05d}"


def capture_name(index: int) -> str:
    return f"e{index:02d}"


def sample_lighting(rng: np.random.Generator, s: SamplingConfig) -> np.ndarray:
    """``[27]`` SH coefficients (9 per channel, R first): DC-dominant, white-ish, modest direction."""
    gamma = np.zeros((3, 9))
    dc = rng.uniform(*s.light_dc)
    gamma[:, 0] = dc + rng.normal(0.0, s.light_tint, size=3)
    gamma[:, 1:4] = rng.normal(0.0, s.light_dir, size=3)[None, :]
    gamma[:, 4:9] = rng.normal(0.0, s.light_second, size=5)[None, :]
    return gamma.reshape(27)


def _clipped_normal(rng: np.random.Generator, std: tuple[float, ...], n: int) -> np.ndarray:
    std = np.asarray(std, dtype=np.float64)
    return np.clip(rng.standard_normal((n, len(std))), -2.5, 2.5) * std


@dataclass(kw_only=True, slots=True)
class SampleParams:
    """Everything random about one sample (numpy float64)."""

    id: np.ndarray
    exp: np.ndarray
    tex: np.ndarray
    gamma: np.ndarray
    angles: np.ndarray
    """``[3, 3]`` radians per view."""
    trans: np.ndarray
    """``[3, 3]`` decimetres per view."""
    backgrounds: list[np.ndarray]
    """Per view ``[S, S, 3]`` float32 in [0, 1]."""
    yaw_deg: tuple[float, ...] = ()
    """Nominal yaw of each view (before jitter), degrees."""


def sample_params(model, cfg: SynthConfig, subject: int, capture: int) -> SampleParams:
    """Draw one sample's parameters from generators seeded by (seed, subject[, capture])."""
    s = cfg.sampling
    rng_subject = np.random.default_rng([cfg.seed, subject])
    rng = np.random.default_rng([cfg.seed, subject, capture + 1])
    n_id, n_exp, n_tex = model.id_base.shape[1], model.exp_base.shape[1], model.tex_base.shape[1]
    id_c = rng_subject.standard_normal(n_id) * s.id_scale
    tex_c = rng_subject.standard_normal(n_tex) * s.tex_scale
    if capture == 0 and s.neutral_first:
        exp_c = np.zeros(n_exp)
    else:
        exp_c = rng.standard_normal(n_exp) * s.exp_scale
    gamma = sample_lighting(rng, s)
    jitter = np.deg2rad(_clipped_normal(rng, s.angle_jitter_deg, 3))
    trans = _clipped_normal(rng, s.trans_jitter, 3)
    backgrounds = [random_background(rng, cfg.size) for _ in VIEWS]
    yaw = cfg.yaw_deg
    if cfg.side_yaw_choices:
        left, right = rng.choice(np.asarray(cfg.side_yaw_choices), size=2)
        yaw = (-float(left), cfg.yaw_deg[1], float(right))
    angles = jitter + np.array([[0.0, math.radians(y), 0.0] for y in yaw])
    return SampleParams(id=id_c, exp=exp_c, tex=tex_c, gamma=gamma, angles=angles, trans=trans,
                        backgrounds=backgrounds, yaw_deg=tuple(yaw))


@dataclass(kw_only=True, slots=True)
class RenderedViews:
    """A rendered triplet (numpy): what a sample is assembled from."""

    images: np.ndarray
    """``[3, S, S, 3]`` uint8 composited over the backgrounds."""
    masks: np.ndarray
    """``[3, S, S]`` uint8 parse classes."""
    coverage: np.ndarray
    """``[3, S, S]`` bool."""
    lmk2d: np.ndarray
    """``[3, 68, 2]`` float32 pixels."""
    shape: np.ndarray
    """``[N, 3]`` float32 model-frame vertices (before pose), decimetres."""


@torch.no_grad()
def render_views(model, renderer, p: SampleParams) -> RenderedViews:
    """Render the three views of one parameter set with ``renderer`` (its camera sets the size)."""
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    from dfmvr.facemodel.decode import decode_faces
    from dfmvr.facemodel.layout import Coeffs

    parts = Coeffs(f32(p.id)[None], f32(p.exp)[None], f32(p.tex)[None], f32(p.gamma)[None],
                   f32(p.angles)[None], f32(p.trans)[None])
    out = decode_faces(model, parts, renderer, clamp_albedo=True)
    cover = out.mask[:, 0]  # [V, H, W]
    bg = f32(np.stack(p.backgrounds)).permute(0, 3, 1, 2)  # [V, 3, H, W]
    img = out.image.clamp(0.0, 1.0) * cover[:, None] + bg * (1.0 - cover[:, None])
    images = (img.permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return RenderedViews(
        images=images,
        masks=out.region.to(torch.uint8).numpy(),
        coverage=(cover > 0.5).numpy(),
        lmk2d=out.lm2d.numpy().astype(np.float32),
        shape=out.shape[0].numpy().astype(np.float32),
    )


def make_sample(model, renderer, cfg: SynthConfig, subject: int, capture: int) -> Sample:
    """One synthetic sample: parameters, render, and everything the schema carries."""
    from dfmvr.facemodel.layout import Coeffs

    p = sample_params(model, cfg, subject, capture)
    r = render_views(model, renderer, p)
    layout = model.layout(len(VIEWS))
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)[None]  # noqa: E731
    coeffs = layout.join(Coeffs(t(p.id), t(p.exp), t(p.tex), t(p.gamma), t(p.angles), t(p.trans)))[0]
    return Sample(
        subject=subject_name(subject),
        capture=capture_name(capture),
        images={v: r.images[i] for i, v in enumerate(VIEWS)},
        masks={v: r.masks[i] for i, v in enumerate(VIEWS)},
        lmk2d=r.lmk2d,
        lmk3d=r.shape[model.lm3d_index.numpy()],
        gt={"vertices": r.shape, "faces": model.tri.numpy().astype(np.int32), "units": "dm"},
        coeffs=coeffs.numpy().astype(np.float32),
        meta={
            "yaw_deg": list(p.yaw_deg),
            "source": "synthetic",
            "seed": cfg.seed,
            "subject_index": subject,
            "capture_index": capture,
            "expression": "neutral" if not np.any(p.exp) else "random",
            "face_model": model.name,
            "lm3d_frame": "face model (before pose)",
        },
        image_format=cfg.image_format,
    )


__all__ = ["RenderedViews", "SampleParams", "SamplingConfig", "capture_name", "make_sample", "render_views",
           "sample_lighting", "sample_params", "subject_name"]
