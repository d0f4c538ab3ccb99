"""Albedo (diffuse skin colour) of the procedural face and its population.

An albedo is the skin tone (a path from very light to very dark skin, with a warm/pink
undertone) painted over with the features: lip colour, cheek redness, brows (hair colour and
density), the eyes (sclera, iris colour, pupil, lash lines), the nostrils and the inner mouth
(teeth, tongue, cavity), optional beard shadow, and faint smooth skin variation. Colours are
RGB in [0, 1]. Blemish-free by design.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dfmvr.facemodel import anatomy as an
from dfmvr.facemodel import surface as sf
from dfmvr.facemodel.surface import bump, smoothstep

# Skin tone from very light (0) to very dark (1).
_TONE_KNOTS = np.linspace(0.0, 1.0, 6)
_TONE_RGB = np.array([
    [0.93, 0.78, 0.69], [0.86, 0.68, 0.57], [0.76, 0.56, 0.43],
    [0.62, 0.43, 0.31], [0.45, 0.30, 0.20], [0.30, 0.19, 0.13],
])
_HAIR_RGB = np.array([[0.06, 0.05, 0.05], [0.14, 0.10, 0.07], [0.30, 0.20, 0.13], [0.60, 0.46, 0.31]])
_IRIS_RGB = np.array([
    [0.15, 0.09, 0.05], [0.33, 0.19, 0.09], [0.45, 0.35, 0.15],
    [0.33, 0.42, 0.27], [0.33, 0.47, 0.62], [0.45, 0.48, 0.50],
])
N_VARIATION = 60


@dataclass(frozen=True, slots=True)
class AlbedoMasks:
    """Per-vertex weights (``[N]`` each, 0..1) of the features an albedo paints."""

    lips: np.ndarray
    brows: np.ndarray
    sclera: np.ndarray
    iris: np.ndarray
    pupil: np.ndarray
    lashes: np.ndarray
    caruncle: np.ndarray
    nostrils: np.ndarray
    cavity: np.ndarray
    teeth: np.ndarray
    tongue: np.ndarray
    blush: np.ndarray
    beard: np.ndarray
    eye_shadow: np.ndarray


def albedo_masks(grid: sf.FaceGrid) -> AlbedoMasks:
    s, t = grid.s, grid.t
    c = an.mouth_curves(s)
    in_x = np.abs(s) < an.MOUTH_W
    # soft vermilion borders (about 0.6 mm) so the lip edge does not follow the mesh's stair steps
    vu = (c["border_up"] - t) / 0.6
    vl = (t - c["border_low"]) / 0.6
    lips = in_x * smoothstep(np.minimum(vu, vl) + 0.5) * smoothstep((an.MOUTH_W - np.abs(s)) / 1.0 + 0.3)
    v, inner = an.mouth_lens_coord(s, t)
    inner = inner.astype(float)
    centre, half = an.brow_band(s)
    brows = np.where(half > 0, smoothstep((half - np.abs(t - centre)) / 1.8 + 0.3), 0.0)
    sclera = np.zeros_like(s)
    iris = np.zeros_like(s)
    pupil = np.zeros_like(s)
    lashes = np.zeros_like(s)
    caruncle = np.zeros_like(s)
    shadow = np.zeros_like(s)
    for side in (-1, 1):
        a, upper, lower, inside = an.eye_lens(s, t, side)
        r = np.hypot(s - side * an.EYE_X, t + 0.2)
        sclera += inside
        iris += inside * smoothstep((an.IRIS_R - r) / 0.8 + 0.5)
        pupil += inside * smoothstep((an.PUPIL_R - r) / 0.5 + 0.5)
        caruncle += inside * smoothstep((-a - 0.82) / 0.1)
        near = np.abs(a) < 1.05
        lashes += near * (np.exp(-(((t - upper - 0.5) / 0.9) ** 2)) * (t > upper - 0.3)
                          + 0.4 * np.exp(-(((lower - t - 0.3) / 0.6) ** 2)) * (t < lower + 0.3))
        shadow += bump(s, t, side * an.EYE_X, 3.0, 20.0, 13.0) * (1.0 - inside)
    nostrils = sum(bump(s, t, k * 6.0, -47.2, 3.2, 1.6) for k in (-1, 1)) * (t < -46.5)
    teeth = inner * smoothstep((v - 0.5) / 0.08) * smoothstep((0.92 - v) / 0.05)
    tongue = inner * smoothstep((-0.45 - v) / 0.15) * smoothstep((v + 0.95) / 0.05)
    blush = sum(bump(s, t, k * 40.0, -30.0, 22.0, 18.0) for k in (-1, 1))
    # wide, C2-smooth edges: a narrow ramp shows as a line (Mach band) on the skin
    lower_face = smoothstep((-50.0 - t) / 22.0) ** 2 * (1.0 - smoothstep((np.abs(s) - 50.0) / 18.0))
    upper_lip_skin = bump(s, t, 0.0, -57.0, 24.0, 9.0)
    beard = np.clip(lower_face + upper_lip_skin, 0.0, 1.0) * (1.0 - lips) * (1.0 - inner)
    return AlbedoMasks(
        lips=lips, brows=brows, sclera=np.clip(sclera, 0, 1), iris=np.clip(iris, 0, 1),
        pupil=np.clip(pupil, 0, 1), lashes=np.clip(lashes, 0, 1) * (1 - np.clip(sclera, 0, 1)),
        caruncle=np.clip(caruncle, 0, 1), nostrils=np.clip(nostrils, 0, 1), cavity=inner,
        teeth=teeth, tongue=tongue, blush=blush, beard=beard, eye_shadow=np.clip(shadow, 0, 1),
    )


LAYERS = (
    "skin", "blush", "eye_shadow", "beard", "lips", "brows", "lashes", "sclera", "caruncle",
    "iris", "pupil", "nostrils", "cavity", "tongue", "teeth",
)
"""Colour layers, bottom to top; each has one colour per face and a fixed coverage per vertex."""

_COVER = {"blush": 0.35, "eye_shadow": 0.25, "beard": 0.4, "brows": 0.95, "lashes": 0.75,
          "caruncle": 0.7, "nostrils": 0.5, "tongue": 0.8, "teeth": 0.9}


def layer_weights(masks: AlbedoMasks) -> np.ndarray:
    """``[len(LAYERS), N]`` how much each layer's colour shows at each vertex (sums to 1).

    Layers are composited bottom to top ("over"), each covering ``mask * cover``; a face's
    per-layer amounts (blush, beard, brow density) live in its layer colours instead, which
    keeps albedos linear in those colours.
    """
    cover = [np.ones_like(masks.lips)] + [
        np.clip(_COVER.get(name, 1.0) * getattr(masks, name), 0.0, 1.0)
        for name in LAYERS[1:]
    ]
    weights = []
    for i, c in enumerate(cover):
        above = np.prod([1.0 - cover[j] for j in range(i + 1, len(cover))], axis=0)
        weights.append(c * above)
    return np.stack(weights)


def sample_layer_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, len(LAYERS), 3]`` layer colours of a population spanning light to dark skin."""
    tone = rng.uniform(0.0, 1.0, n)
    skin = np.stack([np.interp(tone, _TONE_KNOTS, _TONE_RGB[:, c]) for c in range(3)], axis=-1)
    skin = skin + rng.normal(size=(n, 1)) * [0.02, -0.004, -0.025]  # warm (+) or pink (-) undertone
    skin = skin + rng.normal(size=(n, 1)) * [0.015, -0.01, -0.005]  # overall redness
    skin = np.clip(skin, 0.05, 0.98)

    def mix(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
        return a + (b - a) * w[:, None]

    col = {"skin": skin}
    col["blush"] = mix(skin, skin * [1.05, 0.82, 0.8], rng.uniform(0.0, 1.0, n))
    col["eye_shadow"] = mix(skin, skin * [0.8, 0.72, 0.72], rng.uniform(0.25, 1.0, n))
    col["beard"] = mix(skin, skin * [0.55, 0.55, 0.6], (rng.random(n) < 0.3) * rng.uniform(0.2, 1.0, n))
    col["lips"] = np.clip(skin * [0.86, 0.6, 0.62] + rng.normal(size=(n, 1)) * [0.04, -0.015, -0.005], 0.03, 1.0)
    dark = np.clip(tone + rng.normal(scale=0.25, size=n), 0.0, 1.0)  # darker skin, darker hair
    pick = np.clip((1.0 - dark) * 3.0 + rng.normal(scale=0.7, size=n), 0, 3).round().astype(int)
    hair = _HAIR_RGB[pick] * rng.uniform(0.85, 1.15, (n, 1))
    col["brows"] = mix(skin, hair, rng.uniform(0.6, 1.0, n))
    col["lashes"] = hair * 0.6
    col["sclera"] = (np.array([0.90, 0.86, 0.82]) + rng.normal(scale=0.02, size=(n, 1))
                     + rng.uniform(0.0, 0.03, (n, 1)) * [1.0, -1.0, -1.0])
    col["caruncle"] = np.array([0.80, 0.55, 0.52]) * rng.uniform(0.9, 1.1, (n, 1))
    light_eyes = np.clip(1.0 - 1.6 * tone, 0.0, 1.0)
    pick = np.where(rng.random(n) < 0.7 * light_eyes, rng.integers(2, 6, n), rng.integers(0, 2, n))
    col["iris"] = _IRIS_RGB[pick] * rng.uniform(0.85, 1.15, (n, 1))
    col["pupil"] = np.full((n, 3), 0.03)
    col["nostrils"] = skin * 0.35
    col["cavity"] = np.array([0.28, 0.07, 0.07]) * rng.uniform(0.7, 1.3, (n, 1))
    col["tongue"] = np.array([0.55, 0.24, 0.24]) * rng.uniform(0.8, 1.2, (n, 1))
    col["teeth"] = np.array([0.86, 0.82, 0.72]) + rng.normal(scale=0.03, size=(n, 1))
    return np.clip(np.stack([col[name] for name in LAYERS], axis=1), 0.0, 1.0)


def albedo_design(grid: sf.FaceGrid, rng: np.random.Generator) -> np.ndarray:
    """``[3 * len(LAYERS) + N_VARIATION, N, 3]``: per layer and channel, where its colour shows;
    then the smooth skin-variation fields (on skin only). An albedo is
    ``albedo_coefficients(...) @ design`` (flattened)."""
    w = layer_weights(albedo_masks(grid))
    eye = np.eye(3, dtype=np.float32)
    layers = (w[:, None, :, None] * eye[None, :, None, :]).reshape(-1, grid.n_vertices, 3)
    skin_like = w[[LAYERS.index(k) for k in ("skin", "blush", "eye_shadow", "beard")]].sum(axis=0)
    variation = variation_fields(grid, rng) * skin_like[None, :, None]
    return np.concatenate([layers, variation]).astype(np.float32)


def albedo_coefficients(rng: np.random.Generator, n: int) -> np.ndarray:
    """``[n, 3 * len(LAYERS) + N_VARIATION]`` weights of :func:`albedo_design` for a population."""
    colours = sample_layer_colours(rng, n).reshape(n, -1)
    return np.concatenate([colours, rng.normal(scale=0.02, size=(n, N_VARIATION))], axis=1)


def variation_fields(grid: sf.FaceGrid, rng: np.random.Generator) -> np.ndarray:
    """``[N_VARIATION, N, 3]`` smooth random colour fields (peak 1): uneven tone, sheen, ruddiness."""
    fields = sf.random_smooth_fields(grid.s, grid.t, rng, N_VARIATION, (1.0, 1.0, 1.0))
    # mostly luminance with a little hue: colour channels move together more than apart
    mix = np.array([[0.7, 0.3, 0.1], [0.6, 0.5, 0.2], [0.5, 0.4, 0.5]])
    return (fields @ mix.T / 1.2).astype(np.float32)
