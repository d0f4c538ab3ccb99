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
    """64 px on 2 CPU cores; every choice below is measured in docs/notes/training-readings.md
    ("Training efficiency" and the readings), and summed up in docs/training.md."""
    return apply_overrides(Config(), {
        "facemodel.n_vertices": 2500,
        "render.image_size": 64,
        "data.image_size": 64,
        "data.batch_size": 8,
        "model.width": 8,
        "model.levels": 4,
        "model.regressor_width": 16,
        # one bottleneck per RedNet stage instead of 3, 4, 6, 3: the same identity per triplet
        # (18.0% against 18.3% after 16k) at 31% more triplets per second, which pays for the
        # parse net and the mask loss inside make train's 13 minutes (docs/notes/training-readings.md,
        # reading 6)
        "model.regressor_blocks": (1, 1, 1, 1),
        # each parsing class in its own input channel instead of one channel of class ids: every
        # part's silhouette (the side views' profiles above all) is there for the first convolution
        # to read, where a class-id channel makes the narrow encoders tell classes apart by grey
        # level; 8% more time per network step, and the job ended 28.5 / 30.6 / 30.3% below the
        # mean face (seeds 0-2) against 22.5 / 26.7 / 17.8% with one channel (reading 29)
        "model.mask_encoding": "onehot",
        "data.num_workers": 1,
        # a shard holds its subjects in order, both captures of one next to each other: mix about
        # five shards into every batch, and refill the buffer (each epoch restarts it) rarely
        "data.shuffle_buffer": 1000,
        "data.epoch_samples": 8192,
        # The 2D terms at the reference weights (photo 24, lm2d 0.02) put 4-15x the 3D-landmark
        # term's gradient on the shared backbone and as much as it on the identity rows of the
        # head: identity learned at a third of the lm3d-only rate. At an eighth of them it learns
        # at three quarters of that rate and the pose still converges (a sixteenth gains no
        # identity and slows the pose).
        "loss.photo": 3.0,
        "loss.lm2d": 2.5e-3,
        # the photometric and mask terms on every other step at twice their weight: the steps
        # between skip the render and the parse net (13% less time per step), and identity gained
        # 3 points at half length in the curve; in the job 21.9 / 26.1 / 18.1% (seeds 0-2) in 1800
        # steps against the old 1600-step preset's 19.4 / 22.6 / 20.6% in more time (reading 26)
        "loss.picture_every": 2,
        "optim.lr": 1e-3,
        # sized for `make train`'s 13 minutes on whatever 2 cores it gets: the training steps end
        # 12 min 15 s after the job starts (data and parse net included), so the job ends within
        # 13 minutes; 2 CPU workers x batch 8 train as many steps as fit, at most 2400, with the
        # cosine decay over the last 40% of them (1800 steps in 10-12 minutes of job on the
        # machines measured, 35-57 triplets/s; docs/notes/training-readings.md, reading 28)
        "train.time_budget_s": 735.0,
        "optim.cosine_after": 1440,
        "train.steps": 2400,
        "train.val_every": 450,
        "train.ckpt_every": 450,
        "train.log_every": 25,
        "train.val_samples": 200,
        # the parse net whose masks the network reads (every preset's default, model.input_masks):
        # the one that ships with dfmvr, pre-trained on the embedded synthetic shards as the paper's
        # is pre-trained (docs/parsenet.md, "The builtin parse net"), so the job's minutes go to the
        # reconstruction network; model.parse_net= (empty) trains one first with the recipe below
        "model.parse_net": "builtin",
        # its recipe: a U-Net that keeps a full-resolution path, where BiSeNet's 1/8-stride paths
        # see an 8 x 8 grid at 64 px (mIoU 0.30, mouth 0.00); class-weighted cross-entropy plus a
        # Dice term so the small parts count; bf16 autocast where the CPU has it (the curves)
        "parsenet.arch": "unet",
        "parsenet.width": 16,
        "parsenet.class_weights": (0.3, 0.5, 3.0, 3.0, 3.0, 3.0, 1.5, 5.0, 3.0, 3.0),
        "parsenet.dice_weight": 1.0,
        "parsenet.steps": 600,
        "parsenet.lr": 6e-3,
        "parsenet.val_every": 600,
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
