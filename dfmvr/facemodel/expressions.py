"""Expressions of the procedural face: named displacement fields and their population.

Each expression is a displacement field over canonical face coordinates at full strength, in
millimetres (facial action units, loosely). ``L``/``R`` suffixes are the subject's own sides.
The population mixes a few expressions per sample with random strengths plus small random
smooth "micro" fields; the expression basis is the PCA of that population around the neutral
face (so zero coefficients are the neutral face).
"""

from __future__ import annotations

import numpy as np

from dfmvr.facemodel import anatomy as an
from dfmvr.facemodel import surface as sf
from dfmvr.facemodel.surface import bump, plateau, smoothstep

SIGNED = ("jaw_shift", "mouth_shift")
"""Expressions whose strength is drawn from [-1, 1] (a direction), the others from [0, 1]."""

N_MICRO = 34
MICRO_MM = 0.6


def _jaw_weight(s: np.ndarray, t: np.ndarray, lateral_keep: float) -> np.ndarray:
    """How much each point follows the lower jaw: 0 above the lips' meeting line, 1 below it.

    Inside the inner-mouth lens the weight rises smoothly across it, so opening the jaw
    stretches the lens into the mouth cavity; beyond the mouth corners the transition widens
    over the cheek, and it weakens towards the ears (the jaw turns about a hinge near them).
    """
    c = an.mouth_curves(s)
    lens_half = c["lens_up"] - c["mid"]
    beyond = np.clip(np.abs(s) - 20.0, 0.0, None)
    band = np.sqrt(lens_half**2 + (0.8 * beyond) ** 2) + 0.5 + 1.5 * smoothstep(beyond / 5.0)
    ramp = smoothstep((c["mid"] + band - t) / (2.0 * band))
    lateral = 1.0 - (1.0 - lateral_keep) * smoothstep((np.abs(s) - 22.0) / 45.0)
    return ramp * lateral


def expression_fields(grid: sf.FaceGrid) -> dict[str, np.ndarray]:
    """Named ``[N, 3]`` displacement fields (mm) at full strength, in a fixed order."""
    s, t = grid.s, grid.t
    zero = np.zeros_like(s)
    jaw = _jaw_weight(s, t, 0.4)
    jaw_rigid = _jaw_weight(s, t, 0.8)
    lips = plateau(s, t, 0.0, -70.0, 36.0, 22.0, 0.5)
    c = an.mouth_curves(s)
    vermilion = (np.abs(s) < an.MOUTH_W) & (t < c["border_up"]) & (t > c["border_low"])
    lip_weight = lips * (0.5 + 0.5 * vermilion)

    def xyz(x=zero, y=zero, z=zero) -> np.ndarray:
        return np.stack([x, y, z], axis=-1)

    f: dict[str, np.ndarray] = {"jaw_open": xyz(y=-20.0 * jaw, z=-6.0 * jaw)}
    for side, tag in ((1, "L"), (-1, "R")):
        corner = bump(s, t, side * 25.0, -69.0, 20.0, 16.0)
        cheek = bump(s, t, side * 38.0, -35.0, 24.0, 22.0)
        lower_lid = bump(s, t, side * an.EYE_X, -6.0, 14.0, 6.0)
        f[f"smile_{tag}"] = xyz(side * 4.5 * corner, 6.0 * corner + 3.0 * cheek + 1.5 * lower_lid,
                                -3.0 * corner + 2.5 * cheek)
        f[f"mouth_frown_{tag}"] = xyz(y=-4.0 * corner, z=-1.0 * corner + 0.5 * bump(s, t, 0.0, -100.0, 18.0, 12.0))
        sneer = bump(s, t, side * 10.0, -58.0, 16.0, 14.0)
        f[f"upper_lip_raise_{tag}"] = xyz(y=3.5 * sneer, z=0.8 * sneer)
        f[f"brow_raise_outer_{tag}"] = xyz(y=4.0 * bump(s, t, side * 42.0, 24.0, 18.0, 16.0))
        f[f"eye_close_{tag}"] = xyz(y=sf.eye_collapse(s, t, side, 1.0, 0.3),
                                    z=1.0 * bump(s, t, side * an.EYE_X, 2.0, 15.0, 9.0))
        f[f"eye_wide_{tag}"] = xyz(y=sf.eye_collapse(s, t, side, -0.35, 0.4))
        f[f"squint_{tag}"] = xyz(y=sf.eye_collapse(s, t, side, 0.35, 1.0)
                                 + 1.5 * bump(s, t, side * 35.0, -18.0, 20.0, 10.0))
    f["pucker"] = xyz(x=-0.4 * s * lips, z=7.0 * lip_weight)
    f["lip_stretch"] = xyz(x=0.22 * s * lips, z=-1.5 * lips)
    f["lip_press"] = xyz(y=-1.5 * _upper_red(s, t) + 1.5 * _lower_red(s, t), z=-1.5 * lip_weight)
    f["lower_lip_down"] = xyz(y=-3.5 * jaw * bump(s, t, 0.0, -78.0, 26.0, 16.0),
                              z=0.8 * jaw * bump(s, t, 0.0, -78.0, 26.0, 16.0))
    f["lips_part"] = xyz(y=sf.mouth_collapse(s, t, -0.5))
    f["brow_raise_inner"] = xyz(y=sum(4.5 * bump(s, t, k * 18.0, 24.0, 18.0, 16.0) for k in (-1, 1)))
    f["brow_lower"] = xyz(
        x=sum(-k * 2.5 * bump(s, t, k * 20.0, 20.0, 15.0, 12.0) for k in (-1, 1)),
        y=sum(-3.5 * bump(s, t, k * 25.0, 20.0, 22.0, 13.0) for k in (-1, 1)),
        z=0.8 * bump(s, t, 0.0, 16.0, 12.0, 8.0),
    )
    puff = sum(bump(s, t, k * 40.0, -60.0, 26.0, 26.0) for k in (-1, 1))
    f["cheek_puff"] = xyz(x=2.0 * np.sign(s) * puff, z=5.0 * puff)
    f["cheek_suck"] = xyz(z=-3.5 * puff)
    f["jaw_shift"] = xyz(x=5.0 * jaw_rigid)
    f["jaw_forward"] = xyz(z=3.5 * jaw_rigid)
    f["nose_wrinkle"] = xyz(
        y=sum(2.0 * bump(s, t, k * 14.0, -42.0, 14.0, 12.0) for k in (-1, 1)) + bump(s, t, 0.0, -58.0, 18.0, 10.0),
        z=-0.5 * bump(s, t, 0.0, -5.0, 10.0, 8.0),
    )
    f["mouth_shift"] = xyz(x=4.0 * lips)
    f["lip_funnel"] = xyz(y=sf.mouth_collapse(s, t, -0.35), z=4.0 * lip_weight)
    return {k: v.astype(np.float32) for k, v in f.items()}


def _upper_red(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    c = an.mouth_curves(s)
    inside = (np.abs(s) < an.MOUTH_W) & (t >= c["lens_up"]) & (t < c["border_up"])
    return np.where(inside, (t - c["lens_up"]) / np.maximum(c["border_up"] - c["lens_up"], 1e-6), 0.0)


def _lower_red(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    c = an.mouth_curves(s)
    inside = (np.abs(s) < an.MOUTH_W) & (t <= c["lens_low"]) & (t > c["border_low"])
    return np.where(inside, (c["lens_low"] - t) / np.maximum(c["lens_low"] - c["border_low"], 1e-6), 0.0)


def sample_expressions(rng: np.random.Generator, names: list[str], n: int) -> np.ndarray:
    """``[n, len(names) + N_MICRO]`` strengths: a few expressions per sample, then micro weights.

    Each expression is on with probability 0.2 (opening the jaw 0.25), at a strength drawn
    from [0.2, 1] ([-1, 1] for :data:`SIGNED`); left/right pairs move together 60 % of the time.
    """
    w = np.zeros((n, len(names)))
    index = {name: i for i, name in enumerate(names)}
    for i, name in enumerate(names):
        p = 0.25 if name == "jaw_open" else 0.2
        on = rng.random(n) < p
        strength = rng.uniform(-1.0, 1.0, n) if name in SIGNED else rng.uniform(0.2, 1.0, n)
        w[:, i] = on * strength
    for name, i in index.items():
        if name.endswith("_L"):
            j = index[name[:-2] + "_R"]
            together = rng.random(n) < 0.6
            w[together, j] = w[together, i]
    micro = rng.normal(size=(n, N_MICRO))
    return np.concatenate([w, micro], axis=1)


def micro_fields(grid: sf.FaceGrid, rng: np.random.Generator) -> np.ndarray:
    """``[N_MICRO, N, 3]`` small smooth random displacements (mm) standing for subtle motions."""
    return MICRO_MM * sf.random_smooth_fields(grid.s, grid.t, rng, N_MICRO, (0.5, 0.7, 1.0))
