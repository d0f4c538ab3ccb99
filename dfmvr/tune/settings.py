"""The ``tune`` section of the config tree (``cfg.tune``): what a sweep searches and how.

Kept free of dfmvr imports: :mod:`dfmvr.config` imports it to build the tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SCHEDULERS = ("asha", "fifo")


@dataclass(kw_only=True, slots=True)
class TuneConfig:
    """Ray Tune sweeps (``jobs/tune.py``, :mod:`dfmvr.tune`)."""

    name: str = "dfmvr-sweep"
    """Sweep name: its folder ``<work_dir>/sweeps/<name>``, its Tune experiment and its MLflow parent
    run. ``--resume`` finds an interrupted sweep by it; no timestamps, so the name is stable."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space: dotted config key -> distribution. On the command line
    ``tune.space.loss.photo=loguniform(4,64) tune.space.model.backbone=choice(cnn,unet,fusion)``.
    Distributions: ``grid(a,b,...)`` (every value, crossed with the other grids), ``choice(a,b,...)``,
    ``uniform(lo,hi)``, ``loguniform(lo,hi)``, ``randint(lo,hi)`` (hi exclusive), or a plain value."""
    num_samples: int = 1
    """Draws of the space: the whole grid is repeated this many times, random distributions drawn
    anew each time."""
    seeds: int = 1
    """Seeds per variant and grid point (``seed``, ``seed + 1``, ...); random draws are not repeated
    across seeds, each draw is its own trial."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """``asha``: stop trials whose validation RMSE trails the others' at each rung; ``fifo``: run
    every trial to the end (the ablation and angle presets' default, so every seed counts)."""
    grace_period: int = 0
    """ASHA: optimiser steps a trial runs before it may be stopped (0: ``train.val_every``, the first
    validation; earlier there is no validation RMSE to compare)."""
    reduction_factor: float = 2.0
    """ASHA: rungs at ``grace_period * reduction_factor**k`` steps; at each, a trial continues only
    when it is in the best ``1 / reduction_factor`` of the trials recorded there."""
    max_concurrent_trials: int = 0
    """Trials running at once (0: as many as the cluster's resources allow)."""
    workers_per_trial: int = 1
    """Ray Train workers per trial (DDP inside the trial)."""
    cpus_per_worker: float = 1.0
    """CPUs each training worker reserves (its torch threads)."""
    gpus_per_worker: float = 0.0
    """GPUs each training worker reserves; a fraction (0.5) puts two trials on one GPU; 0 trains
    on CPU."""
    driver_cpus: float = 1.0
    """CPUs each trial's driver reserves when the cluster declares no ``trial_slot`` resource (a
    local Ray started by the sweep declares it, so drivers take no CPU from training workers)."""
    max_failures: int = 0
    """Times Tune restarts a crashed trial (0: it is marked failed and the sweep goes on)."""
    storage_path: str = ""
    """Tune and Ray Train storage (local dir or ``s3://``); empty means ``<work_dir>/tune_results``."""
    angles: tuple[str, ...] = ("30", "45", "60", "random")
    """``angles`` preset: side-view yaws (degrees; left at minus, right at plus the angle) of the
    test sets, and ``random``: each capture's left and right yaw drawn from the listed angles
    (paper Tab. III)."""
    angles_subjects: int = 24
    """``angles`` preset: test subjects per angle (identities not in the training data)."""
    angles_captures: int = 2
    """``angles`` preset: captures (expressions) per test subject."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.strip() != self.name:
            raise ValueError(f"tune.name: expected a non-empty name without '/' or surrounding spaces, got {self.name!r}")
        if not isinstance(self.space, dict) or not all(isinstance(k, str) and k for k in self.space):
            raise ValueError(f"tune.space: expected a mapping of dotted config keys to distributions, got {self.space!r}")
        for name in ("num_samples", "seeds", "workers_per_trial", "angles_subjects", "angles_captures"):
            if getattr(self, name) < 1:
                raise ValueError(f"tune.{name}: expected >= 1, got {getattr(self, name)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"tune.scheduler: expected one of {list(SCHEDULERS)}, got {self.scheduler!r}")
        if self.grace_period < 0:
            raise ValueError(f"tune.grace_period: expected >= 0 (0 = train.val_every), got {self.grace_period}")
        if not self.reduction_factor > 1:
            raise ValueError(f"tune.reduction_factor: expected > 1, got {self.reduction_factor}")
        if self.max_concurrent_trials < 0:
            raise ValueError(f"tune.max_concurrent_trials: expected >= 0 (0 = no limit), got {self.max_concurrent_trials}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"tune.cpus_per_worker: expected > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"tune.gpus_per_worker: expected >= 0, got {self.gpus_per_worker}")
        if self.gpus_per_worker > 1 and not float(self.gpus_per_worker).is_integer():
            raise ValueError(f"tune.gpus_per_worker: expected a fraction <= 1 or a whole number, got {self.gpus_per_worker}")
        if self.driver_cpus < 0:
            raise ValueError(f"tune.driver_cpus: expected >= 0, got {self.driver_cpus}")
        if self.max_failures < 0:
            raise ValueError(f"tune.max_failures: expected >= 0, got {self.max_failures}")
        if not self.angles:
            raise ValueError("tune.angles: expected at least one angle, got ()")
        for a in self.angles:
            if a != "random":
                try:
                    ok = 0.0 <= float(a) <= 90.0
                except ValueError:
                    ok = False
                if not ok:
                    raise ValueError(f"tune.angles: expected side-view yaws in 0..90 degrees or 'random', got {a!r}")
        if self.angles == ("random",):
            raise ValueError("tune.angles: 'random' draws from the listed angles; expected at least one angle "
                             "besides it, got ('random',)")
