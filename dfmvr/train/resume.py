"""Which run a training job is: a new one under a unique name, or an explicit resume.

A job without ``train.run_name`` gets a fresh unique name, so running ``jobs/train.py`` again
(``make train`` twice, or with another learning rate) starts a new run instead of silently
restoring the last one. Resuming is explicit: ``train.run_name=NAME`` (Ray Train continues
the run stored under that name) or ``train.resume_from=CHECKPOINT``. A resume must train the
same thing: its config may differ from the checkpoint's only in the step budget and in where
things are stored and logged (:data:`MAY_DIFFER`); anything else fails before Ray starts,
naming each key with both values.
"""

from __future__ import annotations

import secrets
import time

from dfmvr.config import Config, flatten
from dfmvr.train.checkpoint import CHECKPOINT_FILE

MAY_DIFFER = (
    "train.steps", "optim.cosine_after", "train.time_budget_s",  # the step budget (and where its decay starts)
    "train.resume_from", "train.run_name", "train.max_failures", "train.storage_path", "work_dir",
    "model.parse_net",  # a file path: a resume reuses the parse net its checkpoint bundles
    "tracking.",  # where the run is logged
)
"""Config keys (or prefixes ending in ``.``) a resumed run may change."""


class ResumeMismatchError(ValueError):
    """A resume whose config differs from its checkpoint's in what it trains."""


def unique_run_name(prefix: str = "dfmvr-train") -> str:
    """``dfmvr-train-20261203-174502-3fa9``: sortable by start time, unique across machines."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _allowed(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_DIFFER)


def check_resumable(saved_config: dict, cfg: Config, source: str) -> None:
    """Refuse to resume ``source`` (a checkpoint saved with ``saved_config``) under ``cfg`` when
    they differ outside :data:`MAY_DIFFER`.

    Raises:
        ResumeMismatchError: naming every differing key with the checkpoint's and this job's value.
    """
    from dfmvr.config import from_dict
    from dfmvr.tracking import redact

    mine = {k: redact(v) for k, v in flatten(cfg).items()}  # checkpoints store their config redacted
    try:
        theirs = flatten(from_dict(Config, saved_config))
    except (KeyError, TypeError, ValueError) as exn:
        raise ResumeMismatchError(f"cannot resume {source}: its config is not one this dfmvr reads ({exn})") from None
    diff = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs))
            if not _allowed(k) and theirs.get(k) != mine.get(k)}
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ResumeMismatchError(
            f"cannot resume {source}: the config differs in what it trains ({detail}). Resuming may change "
            "only the step budget (train.steps, optim.cosine_after) and where runs are stored and logged; "
            "start a new run instead (leave train.run_name empty for a fresh name)")


def previous_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The newest checkpoint directory Ray Train stored for ``run_name`` under ``storage_path``
    (local or ``s3://``; Ray names them ``checkpoint_<timestamp>``), or None when there is none."""
    from dfmvr.data import storage

    files = storage.list_urls(storage.join(storage_path, run_name), recursive=True)
    dirs = sorted(u.rsplit("/", 1)[0] for u in files if u.endswith("/" + CHECKPOINT_FILE) and "/checkpoint_" in u)
    return dirs[-1] if dirs else None
