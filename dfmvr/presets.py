"""Presets: plain functions returning a :class:`dfmvr.config.Config`.

- ``tiny``: 64 px, narrow widths, a small procedural face model; trains on 2 CPU cores in
  minutes; used by tests, CI and the embedded default run.
- ``paper``: 224 px, widths 64..1024, RedNet50, the BFM-sized procedural model (or BFM when
  ``facemodel.source=bfm``); for GPU clusters.
"""

from __future__ import annotations

from typing import Callable

from dfmvr.config import Config, apply_overrides

PRESETS: dict[str, Callable[[], Config]] = {}


def register_preset(fn: Callable[[], Config]) -> Callable[[], Config]:
    PRESETS[fn.__name__] = fn
    return fn


@register_preset
def tiny() -> Config:
    return apply_overrides(Config(), {
        "facemodel.n_vertices": 2500,
        "render.image_size": 64,
        "data.image_size": 64,
        "data.batch_size": 8,
        "model.width": 8,
        "model.levels": 4,
        "model.regressor_width": 16,
        # sized for `make train`: 2 CPU workers x batch 8 for 1000 steps is about 10 minutes here
        "data.num_workers": 1,
        "data.shuffle_buffer": 128,
        "optim.lr": 3e-3,
        "optim.cosine_after": 500,
        "train.steps": 1000,
        "train.val_every": 250,
        "train.ckpt_every": 250,
        "train.log_every": 25,
        "train.val_samples": 64,
        "parsenet.width": 16,
        "parsenet.steps": 600,
        "parsenet.lr": 3e-3,
        "parsenet.val_every": 200,
    })


@register_preset
def paper() -> Config:
    return apply_overrides(Config(), {
        "facemodel.n_vertices": 35709,
        "render.image_size": 224,
        "data.image_size": 224,
        "data.batch_size": 8,
        "model.width": 64,
        "model.levels": 5,
        "model.regressor_width": 64,
    })


def get_preset(name: str) -> Config:
    """The preset called ``name``; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]()
