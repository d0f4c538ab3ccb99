"""The job's headline: the picked checkpoint scored on validation triplets it was not picked on.

Training validates on one half of the validation split's subjects and Ray keeps the checkpoint
with the lowest RMSE there; :func:`holdout_report` scores that checkpoint on the other half
(:func:`dfmvr.train.loop.validation_halves`), with the masks the model reads (the parse net's,
from the mask cache) and, where the shards carry masks, with their own beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dfmvr.config import Config
from dfmvr.model import build_model, frozen_parse_net, uses_parse_net_masks
from dfmvr.tracking import GIVEN_MASKS_METRIC, PARSED_MASKS_METRIC, VAL_METRIC, gain_pct
from dfmvr.train.checkpoint import load_checkpoint
from dfmvr.train.loop import _val_batches, validate, validation_halves

_logger = logging.getLogger(__name__)


def holdout_report(cfg: Config, checkpoint: str | Path, parse_net: dict | None, *,
                   device: torch.device | str | None = None) -> dict[str, float]:
    """Score ``checkpoint`` (a local checkpoint directory that ``cfg``'s job trained) on the report half of the validation
    split (all of it with ``train.holdout_report=false``), at most ``train.val_samples`` triplets.

    Returns:
        ``report/...``: ``rmse_mm``, ``mean_face_rmse_mm``, ``gain_pct`` and ``samples``, and
        ``rmse_mm_given_masks`` / ``gain_pct_given_masks`` (a parse-net model on the shards' own
        masks) or ``rmse_mm_parse_net_masks`` / ``gain_pct_parse_net_masks`` (a given-mask model on
        the parse net's), where they apply.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload = load_checkpoint(checkpoint, map_location=device)
    run_cfg = cfg  # the job's config, which trained the checkpoint (with its data resolved)
    frozen = (frozen_parse_net(parse_net, "the job's parse net", device, amp=run_cfg.train.parse_net_amp)
              if parse_net is not None else None)
    model = build_model(run_cfg, device=device, payload=payload, source=str(checkpoint), parse_net=frozen).eval()
    mask_cache = None
    if uses_parse_net_masks(run_cfg.model) and parse_net is not None:
        from dfmvr.train.masks import find_mask_cache

        mask_cache = find_mask_cache(run_cfg, parse_net)
    _, report_subjects = validation_halves(run_cfg)
    batches = _val_batches(run_cfg, mask_cache, report_subjects, keep_given_masks=True)()
    metrics, _ = validate(model, batches, run_cfg, frozen, max_samples=run_cfg.train.val_samples,
                          step=int(payload.get("step", 0)))
    mean_face = metrics.get("val/mean_face_rmse_mm")
    out = {"report/samples": metrics.get("val/samples", 0.0)}
    for name, key in (("", VAL_METRIC), ("_given_masks", GIVEN_MASKS_METRIC),
                      ("_parse_net_masks", PARSED_MASKS_METRIC)):
        if key in metrics:
            out[f"report/rmse_mm{name}"] = metrics[key]
            out[f"report/gain_pct{name}"] = gain_pct(metrics[key], mean_face)
    if mean_face is not None:
        out["report/mean_face_rmse_mm"] = mean_face
    _logger.info("holdout report of %s on %d triplets: %s", checkpoint, int(out["report/samples"]),
                 {k: round(v, 4) for k, v in out.items()})
    return out


__all__ = ["holdout_report"]
