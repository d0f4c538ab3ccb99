"""The embedded default's data: where the shards are when ``data.url`` is empty, and the
synthetic dataset made there on first use (:mod:`dfmvr.data.synth`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dfmvr.config import Config, DataConfig

_logger = logging.getLogger(__name__)

DATA_URL_ENV = "DFMVR_DATA_URL"
"""Shard root used when ``data.url`` is empty (cluster.yaml sets it on every node)."""

# The synthetic dataset is data.synth_subjects x data.synth_captures (2000 x 2 by default).
# Identity generalises only with many subjects: with 240 training subjects a model regressing
# the 3D landmarks directly overfits and stalls at 24% below the mean face's error after 32k
# triplets; with 1600 it reaches 38% and is still improving (docs/training.md,
# benchmarks/identity_ceiling.py). 4000 triplets at 64 px take about 40 s on two cores.


def default_data_url(cfg: Config) -> str:
    """``<work_dir>/shards`` for the default dataset size, ``<work_dir>/shards-<S>x<C>`` for another."""
    size, default = (cfg.data.synth_subjects, cfg.data.synth_captures), DataConfig()
    name = "shards" if size == (default.synth_subjects, default.synth_captures) else "shards-{}x{}".format(*size)
    return str(Path(cfg.work_dir).resolve() / name)


def ensure_data(cfg: Config) -> str:
    """The shard root to train on: ``data.url``, else ``$DFMVR_DATA_URL``, else ``<work_dir>/shards``, generated with
    synthetic triplets (at the config's image size and face model) when it has no manifest."""
    from dfmvr.data import storage
    from dfmvr.data.shards import read_manifest

    url = cfg.data.url or os.environ.get(DATA_URL_ENV) or default_data_url(cfg)
    manifest = storage.join(url, "manifest.json")
    if storage.exists(manifest, endpoint=cfg.data.s3_endpoint or None):
        read_manifest(url)  # schema version checked here, before Ray starts
        return url
    if cfg.data.url or os.environ.get(DATA_URL_ENV):
        raise FileNotFoundError(f"data.url {url}: no manifest.json there (pack shards with python -m sharding.synth "
                                "or python -m sharding.pack first)")
    from dfmvr.data.synth import generate

    _logger.info("no shards under %s: generating a synthetic dataset", url)
    # two rendering processes: 4000 triplets at 64 px took 40 s wall here (63 s of CPU), against
    # about 65 s with one
    generate(url, n_subjects=cfg.data.synth_subjects, n_captures=cfg.data.synth_captures, size=cfg.data.image_size,
             seed=cfg.seed, facemodel=cfg.facemodel, workers=2)
    return url
