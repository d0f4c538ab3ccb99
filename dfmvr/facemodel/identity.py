"""Identity variation of the procedural face: named shape parameters and their population.

Each parameter is a z-score: 0 is the average adult, +-1 one standard deviation. Row parameters
change the head's per-row profiles (size, widths, proportions, profile slopes); field
parameters add a displacement field over canonical face coordinates (nose, eyes, lips, chin,
cheeks, ...), given here at one standard deviation in millimetres. Two latent factors
correlate them as in real populations: ``sex`` (larger head, wider jaw, heavier brow ridge,
sloping forehead, thinner lips) and ``build`` (fuller cheeks, wider lower face). Small random
smooth "detail" fields stand for the variation no named parameter covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dfmvr.facemodel import anatomy as an
from dfmvr.facemodel import surface as sf
from dfmvr.facemodel.surface import bump, plateau, smoothstep


@dataclass(frozen=True, slots=True)
class ShapeParam:
    """One identity parameter.

    Args:
        name: what it changes.
        sex, build: loadings on the two latent factors (the rest of its unit variance is its own).
    """

    name: str
    sex: float = 0.0
    build: float = 0.0


ROW_PARAMS = (
    ShapeParam("scale", sex=0.45),
    ShapeParam("width", build=0.3),
    ShapeParam("jaw_width", sex=0.4, build=0.35),
    ShapeParam("cheek_width"),
    ShapeParam("forehead_width"),
    ShapeParam("depth"),
    ShapeParam("forehead_height"),
    ShapeParam("nose_length", sex=0.2),
    ShapeParam("lower_face_height", sex=0.3),
    ShapeParam("chin_height", sex=0.3),
    ShapeParam("forehead_slope", sex=0.35),
    ShapeParam("chin_recession"),
    ShapeParam("midface_projection"),
)

FIELD_PARAMS = (
    ShapeParam("eye_spacing"),
    ShapeParam("eye_depth", sex=0.2),
    ShapeParam("eye_opening", sex=-0.15),
    ShapeParam("eye_tilt"),
    ShapeParam("eye_size"),
    ShapeParam("brow_ridge", sex=0.55),
    ShapeParam("brow_height", sex=-0.2),
    ShapeParam("nose_projection", sex=0.3),
    ShapeParam("nose_bridge"),
    ShapeParam("nose_width", sex=0.25),
    ShapeParam("nose_tip_height"),
    ShapeParam("nose_hump", sex=0.2),
    ShapeParam("nose_tip_size"),
    ShapeParam("upper_lip", sex=-0.25),
    ShapeParam("lower_lip", sex=-0.2),
    ShapeParam("mouth_width"),
    ShapeParam("mouth_protrusion"),
    ShapeParam("chin_width", sex=0.3),
    ShapeParam("chin_prominence", sex=0.2, build=-0.2),
    ShapeParam("cheekbones"),
    ShapeParam("cheek_fullness", sex=-0.2, build=0.55),
    ShapeParam("nasolabial", build=0.3),
    ShapeParam("temples"),
    ShapeParam("jaw_angle", sex=0.3),
    ShapeParam("forehead_bossing", sex=-0.2),
    ShapeParam("nose_deviation"),
    ShapeParam("eye_asymmetry"),
    ShapeParam("mouth_tilt"),
)

N_DETAIL = 40
DETAIL_MM = 0.45
"""Peak displacement of one detail field at one standard deviation."""


def sample_identity(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, P]`` z-scores of the row parameters, then the field parameters, then the details."""
    params = ROW_PARAMS + FIELD_PARAMS
    own = rng.normal(size=(n, len(params)))
    sex = rng.choice([-1.0, 1.0], size=n) * 0.8 + rng.normal(scale=0.6, size=n)
    build = rng.normal(size=n)
    z = np.empty_like(own)
    for i, p in enumerate(params):
        rest = np.sqrt(1.0 - p.sex**2 - p.build**2)
        z[:, i] = rest * own[:, i] + p.sex * sex + p.build * build
    return np.concatenate([z, rng.normal(size=(n, N_DETAIL))], axis=1)


SCALE_SD = 0.04
"""Standard deviation of the overall size factor (the ``scale`` row parameter)."""


def row_fields(grid: sf.FaceGrid) -> np.ndarray:
    """``[len(ROW_PARAMS), N, 3]`` displacement (mm) of each row parameter at +1 sd.

    ``scale`` has a zero field: it multiplies the whole shape instead (see :func:`shape_coefficients`).
    """
    t = grid.row_t
    m = sf.mean_profiles(t)
    lower = smoothstep((-40.0 - t) / 50.0)
    profiles = {
        "scale": {},
        "width": {"a": 0.035 * m["a"]},
        "jaw_width": {"a": 0.06 * m["a"] * lower},
        "cheek_width": {"a": 0.035 * m["a"] * np.exp(-(((t + 15.0) / 25.0) ** 2))},
        "forehead_width": {"a": 0.045 * m["a"] * smoothstep((t - 10.0) / 50.0)},
        "depth": {"c": 0.05 * m["c"]},
        "forehead_height": {"y": 4.0 * smoothstep((t - 25.0) / 50.0)},
        "nose_length": {"y": -3.0 * smoothstep((5.0 - t) / 45.0)},
        "lower_face_height": {"y": -3.0 * smoothstep((-35.0 - t) / 45.0)},
        "chin_height": {"y": -3.0 * smoothstep((-60.0 - t) / 45.0)},
        "forehead_slope": {"z": -4.0 * smoothstep((t - 20.0) / 60.0) ** 2},
        "chin_recession": {"z": -4.0 * smoothstep((-75.0 - t) / 30.0)},
        "midface_projection": {"z": 2.5 * np.exp(-(((t + 40.0) / 30.0) ** 2))},
    }
    assert list(profiles) == [p.name for p in ROW_PARAMS]
    return np.stack([sf.profile_field(grid, **kw) for kw in profiles.values()]).astype(np.float32)


def _lip_rise(s: np.ndarray, t: np.ndarray, upper: bool) -> np.ndarray:
    """0 where the lips meet, rising to 1 at the vermilion border and staying 1 beyond it before
    fading over 10 mm of skin: moving a border by this field changes the lip's height."""
    c = an.mouth_curves(s)
    if upper:
        v = (t - c["lens_up"]) / np.maximum(c["border_up"] - c["lens_up"], 1e-6)
        beyond = t - c["border_up"]
    else:
        v = (c["lens_low"] - t) / np.maximum(c["lens_low"] - c["border_low"], 1e-6)
        beyond = c["border_low"] - t
    wx = np.sqrt(np.clip(1.0 - (s / an.MOUTH_W) ** 2, 0.0, None))
    rise = np.where(beyond > 0, 1.0 - smoothstep(beyond / 10.0), np.clip(v, 0.0, 1.0))
    return wx * rise


def identity_fields(grid: sf.FaceGrid, rng: np.random.Generator) -> np.ndarray:
    """``[len(FIELD_PARAMS) + N_DETAIL, N, 3]`` displacement (mm) of each field parameter at +1 sd."""
    s, t = grid.s, grid.t
    zero = np.zeros_like(s)

    def both(fn) -> np.ndarray:
        return fn(-1) + fn(1)

    def eye_window(side: int) -> np.ndarray:
        return plateau(s, t, side * 33.0, 3.0, 30.0, 27.0, 0.45)

    def eye_local(side: int) -> np.ndarray:
        return plateau(s, t, side * an.EYE_X, an.EYE_T, 24.0, 16.0, 0.45)

    mouth = plateau(s, t, 0.0, -71.0, 38.0, 22.0, 0.5)
    nose_low = plateau(s, t, 0.0, -41.0, 28.0, 16.0, 0.5)
    f: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
        "eye_spacing": (both(lambda k: 2.0 * k * eye_window(k)), zero, zero),
        "eye_depth": (zero, zero, both(lambda k: -1.8 * bump(s, t, k * an.EYE_X, 1.0, 20.0, 16.0))),
        "eye_opening": (zero, both(lambda k: sf.eye_collapse(s, t, k, -0.12, 0.4)), zero),
        "eye_tilt": (zero, both(lambda k: 1.2 * np.clip(an.eye_param(s, k), -1, 1) * eye_local(k)), zero),
        "eye_size": (both(lambda k: 0.06 * (s - k * an.EYE_X) * eye_local(k)),
                     both(lambda k: 0.06 * (t - an.EYE_T) * eye_local(k)), zero),
        "brow_ridge": (zero, zero, both(lambda k: 1.5 * bump(s, t, k * 30.0, 18.0, 30.0, 12.0))
                       + 1.0 * bump(s, t, 0.0, 14.0, 14.0, 10.0)),
        "brow_height": (zero, both(lambda k: 2.2 * plateau(s, t, k * 33.0, 21.0, 30.0, 13.0, 0.4)), zero),
        "nose_projection": (zero, zero, 3.5 / 22.0 * sf.nose_shape(s, t) * smoothstep((10.0 - t) / 45.0)),
        "nose_bridge": (zero, zero, 1.8 * sf.nose_cross(s, t) * np.exp(-(((t + 5.0) / 14.0) ** 2))),
        "nose_width": (0.09 * s * nose_low, zero, zero),
        "nose_tip_height": (zero, 2.5 * plateau(s, t, 0.0, -42.0, 17.0, 11.0, 0.35), zero),
        "nose_hump": (zero, zero, 1.2 * sf.nose_cross(s, t) * np.exp(-(((t + 18.0) / 8.0) ** 2))),
        "nose_tip_size": (0.05 * s * plateau(s, t, 0.0, -40.0, 14.0, 10.0, 0.4), zero,
                          1.2 * bump(s, t, 0.0, -39.0, 10.0, 8.0)),
        "upper_lip": (zero, 1.0 * _lip_rise(s, t, True), 1.2 / 3.6 * sf.lips_dz(s, t, 3.6, 0.0, 0.0)),
        "lower_lip": (zero, -1.2 * _lip_rise(s, t, False), 1.5 / 4.2 * sf.lips_dz(s, t, 0.0, 4.2, 0.0)),
        "mouth_width": (0.07 * s * mouth, zero, zero),
        "mouth_protrusion": (zero, zero, 2.5 * bump(s, t, 0.0, -66.0, 30.0, 32.0)),
        "chin_width": (0.12 * s * plateau(s, t, 0.0, -104.0, 32.0, 18.0, 0.4), zero, zero),
        "chin_prominence": (zero, zero, 2.5 * bump(s, t, 0.0, -103.0, 17.0, 10.0)),
        "cheekbones": (zero, zero, both(lambda k: 1.6 * bump(s, t, k * 44.0, -16.0, 24.0, 18.0))),
        "cheek_fullness": (both(lambda k: 1.5 * k * bump(s, t, k * 42.0, -48.0, 24.0, 22.0)), zero,
                           both(lambda k: 2.5 * bump(s, t, k * 42.0, -48.0, 24.0, 22.0))),
        "nasolabial": (zero, zero, both(lambda k: 0.8 * sf.nasolabial_fold(s, t, k))),
        "temples": (zero, zero, both(lambda k: -1.5 * bump(s, t, k * 60.0, 30.0, 12.0, 22.0))),
        "jaw_angle": (both(lambda k: 3.0 * k * bump(s, t, k * 52.0, -88.0, 22.0, 22.0)), zero, zero),
        "forehead_bossing": (zero, zero, both(lambda k: 1.5 * bump(s, t, k * 22.0, 50.0, 22.0, 20.0))),
        "nose_deviation": (1.0 * plateau(s, t, 0.0, -30.0, 22.0, 30.0, 0.5), zero, zero),
        "eye_asymmetry": (zero, 0.9 * eye_window(1), zero),
        "mouth_tilt": (zero, 0.8 * np.clip(s / an.MOUTH_W, -1.5, 1.5) * mouth, zero),
    }
    assert list(f) == [p.name for p in FIELD_PARAMS]
    named = np.stack([np.stack(v, axis=-1) for v in f.values()]).astype(np.float32)
    details = DETAIL_MM * sf.random_smooth_fields(s, t, rng, N_DETAIL)
    return np.concatenate([named, details])


def identity_design(grid: sf.FaceGrid, rng: np.random.Generator) -> np.ndarray:
    """``[1 + P, N, 3]`` the mean face then one displacement field per identity z-score (mm).

    A face is ``shape_coefficients(z) @ design`` (flattened): linear apart from the overall scale,
    which multiplies the coefficients (see :func:`shape_coefficients`).
    """
    mean = sf.mean_face(grid).astype(np.float32)[None]
    return np.concatenate([mean, row_fields(grid), identity_fields(grid, rng)])


def shape_coefficients(z: np.ndarray) -> np.ndarray:
    """``[S, 1 + P]`` weights of :func:`identity_design`'s rows for z-scores ``z [S, P]``."""
    scale = 1.0 + SCALE_SD * z[:, [p.name for p in ROW_PARAMS].index("scale")]
    return scale[:, None] * np.concatenate([np.ones((z.shape[0], 1)), z], axis=1)
