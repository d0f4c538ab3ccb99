"""The procedural face's layout in canonical face coordinates: where every feature lies.

Canonical coordinates ``(s, t)`` are millimetres on the mean face seen from the front: ``s``
to the subject's left (model +x), ``t`` up, ``t = 0`` at the height of the eyes' centres and
``s = 0`` on the midline. The shape generator (:mod:`dfmvr.facemodel.surface`) builds all its
features on these coordinates, and the parsing labels and the 68 landmarks are read off the same
curves, so labels and landmarks agree with the geometry by construction.

Numbers follow adult anthropometric averages (Farkas): pupils 63 mm apart, eye fissures about
29 x 10 mm, nose 55 mm from nasion to subnasale and 36 mm wide at the alae, mouth 50 mm wide,
stomion 22 mm under the subnasale, chin (menton) about 115 mm under the eyes.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import PchipInterpolator

from dfmvr.facemodel.regions import L_BROW, L_EYE, L_LIP, MOUTH, NOSE, R_BROW, R_EYE, SKIN, U_LIP

# Eyes: centre of each fissure at s = +-EYE_X; the fissure spans EYE_W either side of it.
EYE_X = 31.5
EYE_W = 14.5
EYE_T = 0.4
"""Height of the line through the eye corners at the fissure's centre."""
IRIS_R = 5.8
PUPIL_R = 1.9

# Mouth: the inner-mouth lens between the lips, corners at s = +-MOUTH_W.
MOUTH_T = -70.0
MOUTH_W = 25.0
MOUTH_H = 4.5
"""Canonical half-height of the inner-mouth lens (collapsed to a slit on the neutral face)."""

# Nose: nasion to subnasale, on the midline.
NASION_T = 6.0
TIP_T = -38.0
SUBNASALE_T = -48.5

# Brows: from BROW_IN to BROW_OUT away from the midline.
BROW_IN = 13.0
BROW_OUT = 57.0

_brow_centre = PchipInterpolator([13.0, 22.0, 35.0, 48.0, 57.0], [18.5, 21.5, 24.0, 23.0, 19.5])
_brow_half = PchipInterpolator([13.0, 25.0, 45.0, 57.0], [4.8, 4.3, 3.3, 1.8])
_nose_half_width = PchipInterpolator(
    [-50.0, -46.0, -42.0, -35.0, -25.0, -10.0, 4.0, 10.0], [16.0, 18.5, 18.5, 14.0, 10.5, 8.5, 7.5, 6.5]
)


def _sym_pow(x: np.ndarray, p: float) -> np.ndarray:
    return np.clip(x, 0.0, None) ** p


# ----------------------------------------------------------------------------------------------
# Eye fissure (the visible eyeball)


def eye_param(s: np.ndarray, side: int) -> np.ndarray:
    """Position across the fissure: -1 at the inner corner, +1 at the outer corner.

    Args:
        s: canonical frontal coordinate, any shape.
        side: +1 for the subject's left eye (s > 0), -1 for the right.
    """
    return side * (s - side * EYE_X) / EYE_W


def eye_lids(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper and lower lid margins (canonical t) at fissure positions ``a`` in [-1, 1]."""
    corner = EYE_T + 0.9 * a  # outer corner higher than the inner one (canthal tilt)
    w = 1.0 - np.clip(a, -1.0, 1.0) ** 2
    upper = corner + 5.2 * _sym_pow(w, 0.75) * (1.0 - 0.15 * a)
    lower = corner - 4.6 * _sym_pow(w, 0.85) * (1.0 + 0.1 * a)
    return upper, lower


def eye_lens(s: np.ndarray, t: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fissure of one eye as seen from each point.

    Returns:
        ``(a, upper, lower, inside)``: fissure position, lid margins above/below the point, and
        whether the point lies in the open fissure.
    """
    a = eye_param(s, side)
    upper, lower = eye_lids(a)
    inside = (np.abs(a) < 1.0) & (t < upper) & (t > lower)
    return a, upper, lower, inside


# ----------------------------------------------------------------------------------------------
# Mouth and lips


def mouth_curves(s: np.ndarray) -> dict[str, np.ndarray]:
    """The mouth's curves (canonical t) at frontal positions ``s``.

    Returns:
        dict with ``mid`` (the lips' meeting line), ``lens_up``/``lens_low`` (edges of the
        inner-mouth lens), ``border_up`` (upper vermilion border with the cupid's bow) and
        ``border_low`` (lower vermilion border); all meet at the mouth corners.
    """
    r = np.clip(s / MOUTH_W, -1.0, 1.0)
    w = 1.0 - r**2
    mid = MOUTH_T + 1.2 * r**2
    half = MOUTH_H * _sym_pow(w, 0.6)
    bow = -1.6 * np.exp(-((s / 3.2) ** 2)) + 0.6 * np.exp(-(((np.abs(s) - 7.0) / 3.0) ** 2))
    upper_red = (7.5 + bow) * _sym_pow(w, 0.55)
    lower_red = 10.0 * _sym_pow(1.0 - np.clip(s / 24.5, -1.0, 1.0) ** 2, 0.65)
    return {
        "mid": mid,
        "lens_up": mid + half,
        "lens_low": mid - half,
        "border_up": mid + half + upper_red,
        "border_low": mid - half - lower_red,
    }


def mouth_lens_coord(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(v, inside)``: height across the inner-mouth lens (-1 lower edge .. +1 upper edge)."""
    c = mouth_curves(s)
    half = np.maximum(c["lens_up"] - c["mid"], 1e-6)
    v = (t - c["mid"]) / half
    inside = (np.abs(s) < MOUTH_W) & (np.abs(v) < 1.0)
    return v, inside


# ----------------------------------------------------------------------------------------------
# Brows and nose


def brow_band(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre line and half-thickness of the brow above ``|s|`` (zero thickness outside)."""
    q = np.abs(s)
    qc = np.clip(q, BROW_IN, BROW_OUT)
    half = np.where((q >= BROW_IN) & (q <= BROW_OUT), _brow_half(qc), 0.0)
    # round the brow's ends rather than cutting them square
    half = half * np.sqrt(np.clip(np.minimum(q - BROW_IN + 1.5, BROW_OUT - q + 1.0) / 3.0, 0.0, 1.0))
    return _brow_centre(qc), half


def nose_outline(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Whether ``(s, t)`` lies inside the nose as face parsing draws it (bridge, tip, alae)."""
    bottom = SUBNASALE_T - 0.5 + 3.5 * np.clip(np.abs(s) / 18.0, 0.0, 1.0) ** 2
    inside_t = (t < NASION_T - 2.0) & (t > bottom)
    return inside_t & (np.abs(s) < _nose_half_width(np.clip(t, -50.0, 10.0)))


# ----------------------------------------------------------------------------------------------
# Labels and landmarks


def parse_labels(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Parsing class (1..9, docs/design.md "Face-parsing classes") of each canonical point ``[N]``."""
    labels = np.full(s.shape, SKIN, dtype=np.int64)
    centre, half = brow_band(s)
    brow = (half > 0) & (np.abs(t - centre) < half)
    labels[brow & (s > 0)] = L_BROW
    labels[brow & (s < 0)] = R_BROW
    labels[nose_outline(s, t)] = NOSE
    c = mouth_curves(s)
    in_mouth_x = np.abs(s) < MOUTH_W
    labels[in_mouth_x & (t >= c["lens_up"]) & (t < c["border_up"])] = U_LIP
    labels[in_mouth_x & (t <= c["lens_low"]) & (t > c["border_low"])] = L_LIP
    labels[in_mouth_x & (t > c["lens_low"]) & (t < c["lens_up"])] = MOUTH
    labels[eye_lens(s, t, +1)[3]] = L_EYE
    labels[eye_lens(s, t, -1)[3]] = R_EYE
    return labels


def _eye_points(side: int) -> np.ndarray:
    """iBUG's six points of one eye: outer/inner corners and two points on each lid.

    Returned in iBUG order for that eye: the right eye (side -1) runs 36 outer corner, 37-38
    upper lid, 39 inner corner, 40-41 lower lid; the left eye (side +1) runs 42 inner corner,
    43-44 upper lid, 45 outer corner, 46-47 lower lid (always clockwise in the image).
    """
    def at(a: float, lid: int) -> list[float]:
        upper, lower = eye_lids(np.array(a))
        t = float(upper if lid > 0 else lower) if abs(a) < 1 else float(EYE_T + 0.9 * a)
        return [side * (EYE_X + a * EYE_W), t]

    if side < 0:  # image-left eye: outer corner first
        seq = [(1.0, 0), (0.35, 1), (-0.35, 1), (-1.0, 0), (-0.35, -1), (0.35, -1)]
    else:
        seq = [(-1.0, 0), (-0.35, 1), (0.35, 1), (1.0, 0), (0.35, -1), (-0.35, -1)]
    return np.array([at(a, lid) for a, lid in seq])


def canonical_landmarks() -> np.ndarray:
    """Canonical ``(s, t)`` of iBUG landmarks 17-67, ``[68, 2]`` (rows 0-16, the jaw, are NaN).

    The jaw contour follows the face's silhouette, which only the built mesh knows; the model
    builder places it (see :func:`dfmvr.facemodel.surface.jaw_landmarks`).
    """
    lm = np.full((68, 2), np.nan)
    brow_q = [57.0, 47.0, 36.0, 25.0, 15.0]
    for i, q in enumerate(brow_q):
        c, h = brow_band(np.array(q))
        lm[17 + i] = [-q, float(c + 0.6 * h)]
        lm[26 - i] = [q, float(c + 0.6 * h)]
    lm[27:31] = [[0.0, 4.0], [0.0, -9.0], [0.0, -23.0], [0.0, TIP_T]]
    lm[31:36] = [[-10.0, -46.5], [-5.0, -48.0], [0.0, SUBNASALE_T], [5.0, -48.0], [10.0, -46.5]]
    lm[36:42] = _eye_points(-1)
    lm[42:48] = _eye_points(+1)

    def on(curve: str, s: float) -> list[float]:
        return [s, float(mouth_curves(np.array(s))[curve])]

    corner = float(mouth_curves(np.array(MOUTH_W))["mid"])
    lm[48] = [-MOUTH_W, corner]
    lm[49:54] = [on("border_up", x) for x in (-16.0, -7.0, 0.0, 7.0, 16.0)]
    lm[54] = [MOUTH_W, corner]
    lm[55:60] = [on("border_low", x) for x in (17.0, 9.0, 0.0, -9.0, -17.0)]
    inner_corner = float(mouth_curves(np.array(MOUTH_W - 2.5))["mid"])
    lm[60] = [-(MOUTH_W - 2.5), inner_corner]
    lm[61:64] = [on("lens_up", x) for x in (-9.0, 0.0, 9.0)]
    lm[64] = [MOUTH_W - 2.5, inner_corner]
    lm[65:68] = [on("lens_low", x) for x in (9.0, 0.0, -9.0)]
    return lm


SPARSE_EXTRA = np.array(
    [
        # forehead
        [-40.0, 45.0], [-20.0, 45.0], [0.0, 45.0], [20.0, 45.0], [40.0, 45.0],
        [-25.0, 65.0], [0.0, 65.0], [25.0, 65.0], [-45.0, 38.0], [45.0, 38.0],
        # glabella, temples, beside the nasal bridge
        [0.0, 14.0], [-58.0, 25.0], [58.0, 25.0], [-12.0, 6.0], [12.0, 6.0],
        # under the eyes, beside the nose
        [-31.0, -13.0], [31.0, -13.0], [-13.0, -25.0], [13.0, -25.0],
        # cheeks
        [-45.0, -25.0], [45.0, -25.0], [-55.0, -5.0], [55.0, -5.0], [-35.0, -40.0],
        [35.0, -40.0], [-50.0, -50.0], [50.0, -50.0], [-40.0, -65.0], [40.0, -65.0],
        # upper lip skin, chin
        [-12.0, -57.0], [12.0, -57.0], [0.0, -95.0], [0.0, -104.0],
    ]
)
"""Canonical points that join the 68 landmarks in the sparse 3D-landmark set (101 in all)."""
