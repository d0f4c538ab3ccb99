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
# triplets; with 1600 it reaches 38% and is still improving (docs/notes/training-readings.md,
# "Earlier analysis"; benchmarks/identity_ceiling.py). 4000 triplets at 64 px take about 40 s
# on two cores.


def default_data_url(cfg: Config) -> str:
    """``<work_dir>/shards`` for the default dataset size, ``<work_dir>/shards-<S>x<C>`` for another."""
    size, default = (cfg.data.synth_subjects, cfg.data.synth_captures), DataConfig()
    name = "shards" if size == (default.synth_subjects, default.synth_captures) else "shards-{}x{}".format(*size)
    return str(Path(cfg.work_dir).resolve() / name)


def synth_settings(cfg: Config, url: str):
    """The :class:`dfmvr.data.synth.SynthConfig` that makes the embedded default's shards for ``cfg`` at ``url``."""
    from dfmvr.data.synth import SynthConfig

    # two rendering processes: 4000 triplets at 64 px took 40 s wall here (63 s of CPU), against
    # about 65 s with one
    return SynthConfig(out=url, n_subjects=cfg.data.synth_subjects, n_captures=cfg.data.synth_captures,
                       size=cfg.data.image_size, seed=cfg.seed, facemodel=cfg.facemodel, workers=2)


def stale_reason(manifest, settings) -> str | None:
    """Why synthetic shards whose manifest is ``manifest`` are not the ones ``settings`` make (None: they are).

    Compares the settings' fingerprint (sizes, seed, face-model settings, sampling) and the digest
    of the face model the settings build (its code may have changed) with what the manifest
    records. Shards that are not synthetic are never stale.
    """
    from dfmvr.data.synth import model_digest

    synth = manifest.extra.get("synth") if manifest.extra.get("source") == "synthetic" else None
    if synth is None:
        return None
    if synth.get("fingerprint") != settings.fingerprint():
        made = {k: synth.get(k) for k in ("n_subjects", "n_captures", "seed")}
        made["image_size"] = manifest.image_size
        made["facemodel"] = {k: synth.get("facemodel", {}).get(k) for k in ("source", "n_vertices_requested", "seed")}
        fm = settings.face_model_config()
        wanted = {"n_subjects": settings.n_subjects, "n_captures": settings.n_captures, "seed": settings.seed,
                  "image_size": settings.size,
                  "facemodel": {"source": fm.source, "n_vertices_requested": fm.n_vertices, "seed": fm.seed}}
        differ = {k: (made[k], wanted[k]) for k in made if made[k] != wanted[k]}
        return ("made with other settings: " + ", ".join(f"{k} {a} there, {b} asked for" for k, (a, b) in differ.items())
                if differ else "made with other settings (sampling or synthesis version)")
    from dfmvr.facemodel import build_face_model

    digest = model_digest(build_face_model(settings.face_model_config()))
    if synth.get("facemodel", {}).get("digest") != digest:
        return (f"made by another face model (digest {synth.get('facemodel', {}).get('digest')} there, "
                f"{digest} now: its code changed)")
    return None


def ensure_data(cfg: Config) -> str:
    """The shard root to train on: ``data.url``, else ``$DFMVR_DATA_URL``, else ``<work_dir>/shards``.

    A local path comes back absolute (the training workers run in other directories). The last
    is the embedded default: synthetic triplets at the config's size, seed and face
    model, made when it has no manifest and remade when its manifest says it was made otherwise
    (another ``seed``, face model or image size at the default dataset size; the face model's
    code changed), so a run never trains silently on shards another configuration made. Shards
    at ``data.url`` or ``$DFMVR_DATA_URL`` are the user's and are only checked for a manifest.
    """
    from dfmvr.data import storage
    from dfmvr.data.shards import read_manifest

    user_url = cfg.data.url or os.environ.get(DATA_URL_ENV)
    if user_url and not storage.is_s3(user_url):
        # Ray's workers run in another directory: a relative path must not reach them as such
        user_url = str(Path(user_url).expanduser().resolve())
    url = user_url or default_data_url(cfg)
    manifest = storage.join(url, "manifest.json")
    if storage.exists(manifest, endpoint=cfg.data.s3_endpoint or None):
        found = read_manifest(url)  # schema version checked here, before Ray starts
        if user_url:
            return url
        reason = stale_reason(found, synth_settings(cfg, url))
        if reason is None:
            return url
        _logger.warning("%s: %s; making it again for this configuration", url, reason)
    elif user_url:
        raise FileNotFoundError(f"data.url {url}: no manifest.json there (pack shards with python -m sharding.synth "
                                "or python -m sharding.pack first)")
    else:
        _logger.info("no shards under %s: generating a synthetic dataset", url)
    from dfmvr.data.synth import run

    run(synth_settings(cfg, url))
    return url
