"""Named sweeps: ``--preset ablation | loss-weights | angles`` (or none: ``tune.space`` only).

A preset is a function decorated with :func:`register_sweep` (its name, with ``-`` for ``_``, is
the CLI name) that returns a :class:`SweepPlan`: named variants (each a set of config overrides;
a trial per variant and seed), a default search space, the ``tune.*`` settings that suit it and,
for the ablation, the paper's numbers to print beside ours. The user's ``tune.*`` overrides and
``tune.space`` entries apply on top of a preset's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

SWEEPS: dict[str, Callable[[], "SweepPlan"]] = {}


@dataclass(kw_only=True, slots=True)
class Variant:
    """A named trial (seeds repeat it)."""

    name: str
    """Short name (``v1``): the table's trial column and the trial's MLflow tag."""
    description: str
    """What differs (``cnn backbone``)."""
    overrides: dict[str, Any]
    """Dotted config overrides on top of the sweep's base config."""
    reference_rmse_mm: float | None = None
    """The paper's RMSE for this variant, shown beside ours."""


@dataclass(kw_only=True, slots=True)
class SweepPlan:
    """What a preset sweeps."""

    preset: str
    """Preset name (``""``: none, the user's ``tune.space`` only)."""
    variants: list[Variant] = field(default_factory=list)
    """Named variants; empty: the base config (plus the space) only."""
    space: dict[str, str] = field(default_factory=dict)
    """Default ``tune.space`` entries (the user's entries win)."""
    tune: dict[str, Any] = field(default_factory=dict)
    """``tune.*`` settings for this preset (``{"scheduler": "fifo"}``); the user's win."""
    angles: bool = False
    """After training, evaluate every trial on test sets rendered at ``tune.angles``."""
    reference: str = ""
    """Where the variants' reference numbers come from (table footnote)."""


def register_sweep(fn: Callable[[], SweepPlan]) -> Callable[[], SweepPlan]:
    SWEEPS[fn.__name__.replace("_", "-")] = fn
    return fn


def list_sweeps() -> list[str]:
    """Registered sweep preset names, sorted."""
    return sorted(SWEEPS)


def get_sweep(name: str) -> SweepPlan:
    """The plan of preset ``name`` (``""`` or ``none``: an empty plan for a plain ``tune.space``)."""
    if name in ("", "none"):
        return SweepPlan(preset="")
    if name not in SWEEPS:
        raise ValueError(f"--preset: expected one of {list_sweeps()} (or none), got {name!r}")
    return SWEEPS[name]()


FULL = {"model.backbone": "fusion", "model.regressor": "rednet50", "model.mask_input": True,
        "loss.mask_loss": True, "loss.lm3d_loss": True}
"""DF-MVR as the paper trains it (Tab. II v6); each ablation variant changes one thing."""


@register_sweep
def ablation() -> SweepPlan:
    """Paper Tab. II: six named variants, every one trained to the end (FIFO) for each seed.

    v4 drops the mask twice over, as the paper does: neither the input mask channel nor the mask
    loss. The paper's numbers are RMSE on Pixel-Face; ours come from the validation split of the
    sweep's data.
    """
    rows = [
        ("v1", "cnn backbone", {"model.backbone": "cnn"}, 1.5415),
        ("v2", "unet backbone", {"model.backbone": "unet"}, 1.5207),
        ("v3", "resnet50 regressor", {"model.regressor": "resnet50"}, 1.5206),
        ("v4", "no mask (input, loss)", {"model.mask_input": False, "loss.mask_loss": False}, 1.4656),
        ("v5", "no 3D landmarks", {"loss.lm3d_loss": False}, 1.5770),
        ("v6", "full (fusion, rednet50)", {}, 1.4040),
    ]
    return SweepPlan(
        preset="ablation",
        variants=[Variant(name=n, description=d, overrides={**FULL, **o}, reference_rmse_mm=r) for n, d, o, r in rows],
        tune={"scheduler": "fifo"},
        reference="paper Tab. II (RMSE in mm on Pixel-Face)",
    )


@register_sweep
def loss_weights() -> SweepPlan:
    """Photo, mask, landmark (2D and 3D) and regulariser weights, log-uniform over a factor of 3
    either side of the reference defaults (docs/design.md "Losses": 24, 1, 2e-2, 1, 3e-4), with ASHA."""
    return SweepPlan(
        preset="loss-weights",
        space={
            "loss.photo": "loguniform(8,72)",
            "loss.mask": "loguniform(0.333,3)",
            "loss.lm2d": "loguniform(0.00667,0.06)",
            "loss.lm3d": "loguniform(0.333,3)",
            "loss.reg": "loguniform(0.0001,0.0009)",
        },
        tune={"scheduler": "asha", "num_samples": 8},
    )


@register_sweep
def angles() -> SweepPlan:
    """Paper Tab. III: train once per seed (on the sweep's data, side views at 45 degrees for the
    embedded synthetic set), then evaluate on synthetic test sets whose side views are at each of
    ``tune.angles`` (and ``random``: each side drawn from those angles)."""
    return SweepPlan(
        preset="angles",
        variants=[Variant(name="angles", description="train once, test at each side-view angle", overrides={})],
        tune={"scheduler": "fifo"},
        angles=True,
    )
