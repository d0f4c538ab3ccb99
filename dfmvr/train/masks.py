"""The parse net's masks for training: the mask cache a job makes once and every worker reads.

A model that reads the parse net's masks (``model.input_masks=parse_net``, every preset's
default) trains on the masks its frozen parse net makes of the shards' views: as input beside
each view, for the photometric weight map and as the mask loss's target. They are computed once
per sample by :func:`ensure_mask_cache` (the driver, before the workers start) and read back by
the loaders (:func:`find_mask_cache`), so a training step costs what it costs with the shards'
own masks (:mod:`dfmvr.data.parsed_masks`).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from dfmvr.config import Config
from dfmvr.data.parsed_masks import MaskCache, build_cache, cache_url, open_cache
from dfmvr.data.shards import read_manifest
from dfmvr.model import frozen_parse_net
from dfmvr.nets import parsenet_digest

_logger = logging.getLogger(__name__)


class MaskCacheMissing(FileNotFoundError):
    """No current mask cache for the job's parse net and shards."""


def cache_splits(cfg: Config) -> tuple[str, ...]:
    """The splits a training job reads: training and validation."""
    return tuple(dict.fromkeys((cfg.data.split, cfg.data.val_split)))


def find_mask_cache(cfg: Config, parse_net: dict, splits: Iterable[str] | None = None) -> MaskCache:
    """The current mask cache of ``parse_net`` (a :func:`dfmvr.nets.read_parsenet_file` dict) for
    the job's shards; what every training worker opens.

    Raises:
        MaskCacheMissing: there is none (the driver's :func:`ensure_mask_cache` makes it).
    """
    endpoint = cfg.data.s3_endpoint or None
    manifest = read_manifest(cfg.data.url, endpoint=endpoint)
    digest = parsenet_digest(parse_net)
    cache = open_cache(manifest, digest, splits or cache_splits(cfg), root=cfg.data.parsed_masks_root,
                       endpoint=endpoint)
    if cache is None:
        raise MaskCacheMissing(
            f"no current mask cache of parse net {digest} for {manifest.url} at "
            f"{cache_url(manifest.root, digest, cfg.data.parsed_masks_root)}: the training job makes it before its "
            "workers start (dfmvr.train.masks.ensure_mask_cache)")
    return cache


def ensure_mask_cache(cfg: Config, parse_net: dict, splits: Iterable[str] | None = None, *,
                      source: str = "the job's parse net", device: torch.device | str | None = None,
                      ) -> tuple[MaskCache, dict]:
    """The mask cache of ``parse_net`` for the job's shards, made now when there is no current one.

    Returns:
        ``(cache, info)``: ``info`` says whether it was made (``made``), in how many seconds and for
        how many samples, and which were skipped.
    """
    from dfmvr.train.parsing import predict_masks

    endpoint = cfg.data.s3_endpoint or None
    splits = tuple(splits or cache_splits(cfg))
    manifest = read_manifest(cfg.data.url, endpoint=endpoint)
    digest = parsenet_digest(parse_net)
    cache = open_cache(manifest, digest, splits, root=cfg.data.parsed_masks_root, endpoint=endpoint)
    if cache is not None:
        _logger.info("mask cache %s is current for parse net %s", cache.url, digest)
        return cache, {"made": False, "url": cache.url, "digest": digest}
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = frozen_parse_net(parse_net, source, device, amp=cfg.train.parse_net_amp)
    _logger.info("making the mask cache of parse net %s for splits %s of %s", digest, list(splits), manifest.url)
    report = build_cache(manifest, lambda images: predict_masks(net, images, batch_size=96), digest, splits,
                         root=cfg.data.parsed_masks_root, endpoint=endpoint,
                         # the precision is recorded, not keyed: bf16 and float32 masks differ on ~0.02% of
                         # the pixels, and a cache made on one machine serves workers on others
                         extra={"parse_net": source, "parse_net_miou": (parse_net.get("meta") or {}).get("miou"),
                                "precision": str(net.amp_dtype or torch.float32).replace("torch.", "")})
    return report.cache, {"made": True, "url": report.cache.url, "digest": digest, "seconds": report.seconds,
                          "samples": report.samples, "skipped": report.skipped}


__all__ = ["MaskCacheMissing", "cache_splits", "ensure_mask_cache", "find_mask_cache"]
