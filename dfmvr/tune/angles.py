"""Paper Tab. III: the same trained model tested with side views at other yaws.

:func:`make_angle_sets` renders one synthetic test set per angle in ``tune.angles`` (left view at
minus, right at plus the angle, front at 0) and one ``random`` set whose side views each take an
angle drawn from the listed ones. All sets share one seed, so they hold the same identities,
expressions, lighting and backgrounds: only the side views' yaw differs between them. The seed
is not the training data's, so none of these identities was seen in training. The sets' subjects
are in the ``test`` split (the packer keeps one subject in ``train``; it is not used).

:func:`evaluate_angles` is the validation pass of training (:func:`dfmvr.train.loop.validate`:
aligned vertex RMSE in mm against the ground-truth mesh) run on each set's ``test`` split with a
trial's best checkpoint, so the numbers are directly comparable with ``val/rmse_mm``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from dfmvr.config import Config, apply_overrides

_logger = logging.getLogger(__name__)

SEED_OFFSET = 7_000_003
"""Added to ``cfg.seed`` for the test sets' seed: identities the training data (seed ``cfg.seed``) lacks."""

TEST_SPLIT = "test"
SPLITS = (0.01, 0.0, 0.99)
"""train/val/test fractions: all subjects but the one the packer keeps in ``train`` are test subjects."""


def angle_label(angle: str) -> str:
    """``"30"`` -> ``"yaw30"``, ``"random"`` -> ``"random"``."""
    return "random" if angle == "random" else f"yaw{float(angle):g}"


def metric_name(label: str) -> str:
    """The metric a trial reports for one angle set: ``angles/yaw30/rmse_mm``."""
    return f"angles/{label}/rmse_mm"


def make_angle_sets(cfg: Config, root: str) -> dict[str, str]:
    """Render (or find, when already made with the same settings) one test set per angle of
    ``cfg.tune.angles`` under ``root`` (a local directory or ``s3://`` prefix).

    Returns:
        ``{label: shard root}`` in the order of ``cfg.tune.angles``.
    """
    from dfmvr.data import storage
    from dfmvr.data.synth import generate

    fixed = [float(a) for a in cfg.tune.angles if a != "random"]
    out: dict[str, str] = {}
    for angle in cfg.tune.angles:
        label = angle_label(angle)
        url = storage.join(root, label)
        kwargs: dict[str, Any] = {}
        if angle == "random":
            kwargs["side_yaw_choices"] = tuple(fixed)
            yaw = (-45.0, 0.0, 45.0)  # replaced per capture by the drawn angles
        else:
            yaw = (-float(angle), 0.0, float(angle))
        summary = generate(url, n_subjects=cfg.tune.angles_subjects + 1, n_captures=cfg.tune.angles_captures,
                           size=cfg.data.image_size, yaw_deg=yaw, seed=cfg.seed + SEED_OFFSET, splits=SPLITS,
                           workers=1, facemodel=cfg.facemodel, endpoint=cfg.data.s3_endpoint or None, **kwargs)
        _logger.info("angle set %s: %d test triplets at %s (%d made, %d kept)", label,
                     summary.per_split.get(TEST_SPLIT, 0), url, len(summary.generated), len(summary.kept))
        out[label] = url
    return out


def evaluate_angles(checkpoint_dir: str, cfg: Config, sets: dict[str, str]) -> dict[str, float]:
    """Validation RMSE of the checkpoint on every angle set's test split.

    Args:
        checkpoint_dir: a local checkpoint directory (a trial's best).
        cfg: the trial's config (data loading settings; the model comes from the checkpoint).
        sets: :func:`make_angle_sets`'s ``{label: shard root}``.

    Returns:
        ``{"angles/<label>/rmse_mm": mm, "angles/<label>/mean_face_rmse_mm": mm, ...}``.
    """
    from dfmvr.data.loader import make_loader
    from dfmvr.serving import Reconstructor
    from dfmvr.tracking import VAL_METRIC
    from dfmvr.train.loop import validate

    rec = Reconstructor.from_checkpoint(checkpoint_dir)
    out: dict[str, float] = {}
    for label, url in sets.items():
        data = apply_overrides(cfg, {"data.url": url, "data.val_split": TEST_SPLIT}).data

        def batches():
            return iter(make_loader(data, TEST_SPLIT, rank=0, world_size=1, resampled=False, seed=0,
                                    with_gt=True, shuffle=False))

        metrics, _ = validate(rec.model, batches(), rec.cfg, max_samples=None)
        out[metric_name(label)] = float(metrics.get(VAL_METRIC, math.inf))
        out[f"angles/{label}/mean_face_rmse_mm"] = float(metrics.get("val/mean_face_rmse_mm", math.inf))
        _logger.info("angle set %s: %.4f mm (mean face %.4f mm) on %d triplets", label, out[metric_name(label)],
                     out[f"angles/{label}/mean_face_rmse_mm"], int(metrics.get("val/samples", 0)))
    return out
