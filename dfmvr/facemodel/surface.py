"""The procedural face surface: the mesh grid, the neutral shape and the identity variations.

Every vertex sits on a regular grid over two parameters: the angle ``phi`` around the vertical
axis of a per-row ellipse (columns) and the canonical height ``t`` (rows). A vertex's canonical
face coordinates are ``(s, t)`` with ``s = A0(t) sin(phi)`` (see :mod:`dfmvr.facemodel.anatomy`).
A shape is

    x = A(t) sin(phi)                     + dx(s, t)
    y = Y(t) + lift(t) g(phi)             + dy(s, t)
    z = Z(t) - C(t) (1 - cos(phi))        + dz(s, t)

(millimetres, model frame): per-row profiles (half-width ``A``, depth ``C``, midline height ``Y``
and depth ``Z``) give the head's overall form, ``lift``/``drop`` curve the lowest rows up along
the jaw and the top rows down at the temples, and displacement fields over ``(s, t)`` add the
features. An identity is a set of parameters that change the profiles and scale the fields; an
expression adds more fields. Features ride on fixed vertices, so labels and landmarks hold for
every identity and expression.

Rows are denser around the eyes, nose and mouth (more vertices where the detail is), and the
inner-mouth lens between the lips has canonical height but is collapsed to a slit on the
neutral face: opening the mouth stretches it into a recessed surface behind the lips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator

from dfmvr.facemodel import anatomy as an

T_TOP = 82.0
T_BOT = -122.0
PHI_MAX = np.deg2rad(80.0)


# ----------------------------------------------------------------------------------------------
# Small smooth building blocks (all vectorised over numpy arrays)


def smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, C1-smooth in between."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def bump(s: np.ndarray, t: np.ndarray, cs: float, ct: float, rs: float, rt: float) -> np.ndarray:
    """Compact C2 bump: 1 at ``(cs, ct)``, 0 outside the ellipse of radii ``(rs, rt)``."""
    r2 = ((s - cs) / rs) ** 2 + ((t - ct) / rt) ** 2
    return np.clip(1.0 - r2, 0.0, None) ** 3


def plateau(s: np.ndarray, t: np.ndarray, cs: float, ct: float, rs: float, rt: float,
            inner: float = 0.5) -> np.ndarray:
    """1 inside ``inner`` of the ellipse, falling smoothly to 0 at its edge (moves a region rigidly)."""
    r = np.sqrt(((s - cs) / rs) ** 2 + ((t - ct) / rt) ** 2)
    return 1.0 - smoothstep((r - inner) / (1.0 - inner))


def _profile(knots_t: list[float], values: list[float]) -> PchipInterpolator:
    order = np.argsort(knots_t)
    return PchipInterpolator(np.asarray(knots_t)[order], np.asarray(values)[order], extrapolate=True)


# Per-row profiles of the mean head (t -> mm).
_A0 = _profile([82, 60, 40, 20, 0, -20, -45, -70, -95, -122], [57, 62, 65, 67.5, 70, 71.5, 69, 64, 57, 51])
_C0 = _profile([82, 40, 0, -60, -122], [90, 88, 85, 82, 80])
_Z0 = _profile(
    [82, 60, 40, 20, 0, -30, -60, -90, -105, -112, -118, -122],
    [-20, -9, -3, 0, -3, -2, -4, -10, -10, -16, -26, -34],
)
_Y0 = _profile([82, 0, -100, -106, -112, -118, -122], [82, 0, -100, -106, -111, -114, -115.5])


def lift_profile(t: np.ndarray) -> np.ndarray:
    """How far the row's ends rise (jaw line) or fall (temples) at the face's sides, mm."""
    return 30.0 * smoothstep((-55.0 - t) / 57.0) - 16.0 * smoothstep((t - 45.0) / 37.0)


def side_weight(phi: np.ndarray) -> np.ndarray:
    """0 on the midline, 1 at the mesh's side edge; scales :func:`lift_profile`."""
    return (1.0 - np.cos(phi)) / (1.0 - np.cos(PHI_MAX))


# ----------------------------------------------------------------------------------------------
# Mesh grid


def _inverse_cdf(x: np.ndarray, density: np.ndarray, n: int) -> np.ndarray:
    """``n`` points over ``x``'s range, spaced inversely to ``density``."""
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])
    return np.interp(np.linspace(0.0, cdf[-1], n), cdf, x)


def _gauss(x: np.ndarray, c: float, w: float) -> np.ndarray:
    return np.exp(-(((x - c) / w) ** 2))


@dataclass(frozen=True, slots=True)
class FaceGrid:
    """The mesh: a ``rows x cols`` vertex grid and its canonical coordinates (``N = rows * cols``).

    Args:
        n_rows, n_cols: grid size (``n_cols`` is odd: the middle column is the midline).
        row_t: ``[rows]`` canonical height of each row, ascending (bottom row first).
        col_phi: ``[cols]`` angle of each column, ascending (subject's right first).
        row: ``[N]`` row of each vertex.
        phi: ``[N]`` angle of each vertex.
        s, t: ``[N]`` canonical face coordinates (mm).
        tri: ``[F, 3]`` triangles, counter-clockwise seen from the front (+z).
    """

    n_rows: int
    n_cols: int
    row_t: np.ndarray
    col_phi: np.ndarray
    row: np.ndarray
    phi: np.ndarray
    s: np.ndarray
    t: np.ndarray
    tri: np.ndarray

    @property
    def n_vertices(self) -> int:
        return self.n_rows * self.n_cols


def grid_shape(n_vertices: int) -> tuple[int, int]:
    """``(rows, cols)`` of the grid for about ``n_vertices`` vertices (cols odd, rows about equal)."""
    if n_vertices < 200:
        raise ValueError(f"procedural face model: n_vertices must be >= 200, got {n_vertices}")
    n_cols = int(round(np.sqrt(n_vertices)))
    n_cols += 1 - n_cols % 2
    return max(int(round(n_vertices / n_cols)), 8), n_cols


def grid_shape_of_mesh(n_vertices: int, n_faces: int) -> tuple[int, int]:
    """``(rows, cols)`` of a procedural mesh from its sizes (``N = r c``, ``F = 2 (r-1)(c-1)``).

    Raises:
        ValueError: the sizes are not those of a grid mesh with an odd column count.
    """
    total = n_vertices + 1 - n_faces // 2  # r + c
    disc = total * total - 4 * n_vertices
    root = int(round(np.sqrt(max(disc, 0))))
    rows, cols = (total - root) // 2, (total + root) // 2
    for r, c in ((rows, cols), (cols, rows)):
        if r * c == n_vertices and 2 * (r - 1) * (c - 1) == n_faces and c % 2 == 1:
            return r, c
    raise ValueError(f"{n_vertices} vertices and {n_faces} faces are not a procedural face grid")


def make_grid(n_vertices: int, shape: tuple[int, int] | None = None) -> FaceGrid:
    """The vertex grid closest to ``n_vertices`` vertices, or exactly ``shape = (rows, cols)``."""
    n_rows, n_cols = grid_shape(n_vertices) if shape is None else shape

    tt = np.linspace(T_BOT, T_TOP, 4001)
    row_density = (
        1.0 + 1.3 * _gauss(tt, 1.0, 9.0) + 1.2 * _gauss(tt, -70.0, 12.0)
        + 0.8 * _gauss(tt, -44.0, 7.0) + 0.4 * _gauss(tt, 21.0, 7.0)
    )
    row_t = _inverse_cdf(tt, row_density, n_rows)
    pp = np.linspace(-PHI_MAX, PHI_MAX, 4001)
    col_phi = _inverse_cdf(pp, 1.0 + 0.5 * _gauss(pp, 0.0, 0.7), n_cols)
    col_phi = 0.5 * (col_phi - col_phi[::-1])  # exactly symmetric, middle column at 0

    row = np.repeat(np.arange(n_rows), n_cols)
    phi = np.tile(col_phi, n_rows)
    t = row_t[row]
    s = _A0(t) * np.sin(phi)
    return FaceGrid(n_rows=n_rows, n_cols=n_cols, row_t=row_t, col_phi=col_phi, row=row, phi=phi,
                    s=s, t=t, tri=_grid_triangles(n_rows, n_cols))


def _grid_triangles(n_rows: int, n_cols: int) -> np.ndarray:
    """Two triangles per grid cell, diagonals mirrored about the midline (a symmetric mesh)."""
    idx = np.arange(n_rows * n_cols).reshape(n_rows, n_cols)
    v00, v01 = idx[:-1, :-1], idx[:-1, 1:]  # lower row (smaller t), left and right
    v10, v11 = idx[1:, :-1], idx[1:, 1:]
    left = np.arange(n_cols - 1) < (n_cols - 1) // 2
    left = np.broadcast_to(left, v00.shape)
    # columns grow towards +x and rows towards +y, so (v00, v01, v11) is counter-clockwise from +z
    a = np.where(left[..., None], np.stack([v00, v01, v11], -1), np.stack([v00, v01, v10], -1))
    b = np.where(left[..., None], np.stack([v00, v11, v10], -1), np.stack([v01, v11, v10], -1))
    return np.concatenate([a.reshape(-1, 3), b.reshape(-1, 3)]).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Lens collapse: closes an eye fissure or the lips by pulling both edges towards a line


def lens_collapse(t: np.ndarray, upper: np.ndarray, lower: np.ndarray, amount: float, alpha: float,
                  rigid_up: np.ndarray, rigid_low: np.ndarray, fade_up: float, fade_low: float) -> np.ndarray:
    """Vertical displacement that closes a lens by ``amount`` (1 shuts it) towards the line at
    ``alpha`` of its height (0 lower edge, 1 upper edge).

    Points inside the lens are squeezed linearly; the rim above (below) moves with the upper
    (lower) edge up to ``rigid_up`` (``rigid_low``) and the displacement then fades over
    ``fade_up`` (``fade_low``) mm. Where ``upper == lower`` (beyond the corners) nothing moves.

    Returns:
        ``dy`` in mm, same shape as ``t``.
    """
    target = lower + alpha * (upper - lower)
    inside = -(t - target) * amount
    down = -(upper - target) * amount * (1.0 - smoothstep((t - rigid_up) / fade_up))
    up = (target - lower) * amount * (1.0 - smoothstep((rigid_low - t) / fade_low))
    return np.where(t >= upper, down, np.where(t <= lower, up, inside))


def eye_collapse(s: np.ndarray, t: np.ndarray, side: int, amount: float, alpha: float = 0.3) -> np.ndarray:
    """``dy`` that closes one eye's fissure by ``amount`` (the upper lid does most of the work)."""
    a, upper, lower, _ = an.eye_lens(s, t, side)
    upper = np.where(np.abs(a) < 1, upper, lower)
    return lens_collapse(t, upper, lower, amount, alpha, upper + 1.0, lower - 0.5, 11.0, 4.0)


def mouth_collapse(s: np.ndarray, t: np.ndarray, amount: float) -> np.ndarray:
    """``dy`` that brings the lips together by ``amount`` (the lips move rigidly, skin stretches)."""
    c = an.mouth_curves(s)
    return lens_collapse(t, c["lens_up"], c["lens_low"], amount, 0.5, c["border_up"] + 1.0,
                         c["border_low"] - 1.0, 16.0, 16.0)


# ----------------------------------------------------------------------------------------------
# The neutral face's features (displacements over the base head, mm)


def _segment_distance(s, t, p0, p1) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the segment ``p0 -> p1`` and the position along it (0..1) of the nearest point."""
    d = np.array(p1) - np.array(p0)
    u = np.clip(((s - p0[0]) * d[0] + (t - p0[1]) * d[1]) / (d @ d), 0.0, 1.0)
    return np.hypot(s - p0[0] - u * d[0], t - p0[1] - u * d[1]), u


_nose_height = _profile([16, 6, -5, -20, -32, -38, -42, -45.5, -48.5, -52],
                        [0, 3.5, 7.5, 13, 19.5, 22, 19.5, 10, 0.5, 0])
_nose_width = _profile([16, 6, -10, -25, -33, -38, -43, -48, -52], [6, 7, 8, 9.5, 11, 11.5, 11, 9, 8])
_nose_power = _profile([16, -10, -30, -40, -52], [2.2, 2.0, 1.5, 1.2, 1.2])


def nose_shape(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Unit nose ridge: the profile height (mm) times a rounded cross-section."""
    return _nose_height(np.clip(t, -52.0, 16.0)) * nose_cross(s, t)


def _lip_profile(v: np.ndarray) -> np.ndarray:
    """Fullness across a lip: 0.4 where the lips meet (v=0), 1 at 45 %, 0 at the border (v=1)."""
    rise = 0.4 + 0.6 * np.sin(0.5 * np.pi * np.clip(v / 0.45, 0.0, 1.0))
    fall = np.cos(0.5 * np.pi * np.clip((v - 0.45) / 0.55, 0.0, 1.0))
    return np.where(v < 0.45, rise, fall)


def lips_dz(s: np.ndarray, t: np.ndarray, upper_amp: float, lower_amp: float, inner_depth: float) -> np.ndarray:
    """The lips' protrusion and the inner mouth's recess behind them."""
    c = an.mouth_curves(s)
    in_x = np.abs(s) < an.MOUTH_W
    wx = np.sqrt(np.clip(1.0 - (s / an.MOUTH_W) ** 2, 0.0, None))
    vu = (t - c["lens_up"]) / np.maximum(c["border_up"] - c["lens_up"], 1e-6)
    vl = (c["lens_low"] - t) / np.maximum(c["lens_low"] - c["border_low"], 1e-6)
    up = np.where(in_x & (vu >= 0) & (vu <= 1), upper_amp * wx * _lip_profile(vu), 0.0)
    low = np.where(in_x & (vl >= 0) & (vl <= 1), lower_amp * wx * _lip_profile(vl), 0.0)
    v, inside = an.mouth_lens_coord(s, t)
    edge = 0.4 * wx * np.where(v > 0, upper_amp, lower_amp)
    inner = np.where(inside, edge - inner_depth * wx * (1.0 - v * v), 0.0)
    return up + low + inner


def _eye_dz(s: np.ndarray, t: np.ndarray, side: int) -> np.ndarray:
    cx = side * an.EYE_X
    a = an.eye_param(s, side)
    ac = np.clip(a, -1.0, 1.0)
    up_c, low_c = an.eye_lids(ac)
    # approximate signed distance to the fissure's edge (mm, positive outside)
    sd = np.maximum(np.maximum(t - up_c, low_c - t), (np.abs(a) - 1.0) * an.EYE_W)
    dz = -8.0 * bump(s, t, cx, 2.0, 25.0, 20.0)  # orbit
    ball = 1.0 - ((s - cx - side * 0.5) / 15.0) ** 2 - ((t - 0.5) / 12.5) ** 2
    dz += 6.5 * np.sqrt(np.clip(ball, 0.0, None))  # eyeball, under the lids too
    dz += 1.2 * bump(s, t, cx, 0.0, 6.5, 6.5)  # cornea
    # lids: a margin as thick as the lid, thinning towards the corners and away from the fissure
    w = np.sqrt(np.clip(1.0 - ac * ac, 0.0, None))
    thick = np.where(t > up_c, 1.7 * w + 0.3, 0.9 * w + 0.3)
    rise = np.where(t > up_c, 1.2, 2.0)
    dz += thick * smoothstep(sd / rise) * np.exp(-np.clip(sd - rise, 0.0, None) / 6.0)
    dz += -0.8 * w * np.exp(-(((t - up_c - 7.5) / 2.2) ** 2)) * (t > up_c)  # upper lid crease
    dz += -0.6 * bump(s, t, cx - side * 6.0, -11.0, 14.0, 5.0)  # tear trough
    return dz


def nasolabial_fold(s: np.ndarray, t: np.ndarray, side: int) -> np.ndarray:
    """``dz``: a groove from the ala to beside the mouth corner, the cheek bulging on its lateral side."""
    d, along = _segment_distance(s, t, (side * 18.0, -42.0), (side * 30.0, -76.0))
    lateral = ((s - side * 18.0) * side * 34.0 + (t + 42.0) * 12.0) / np.hypot(34.0, 12.0)
    fold = -0.9 * np.exp(-((d / 3.5) ** 2)) + 1.2 * np.exp(-(((d - 6.0) / 5.0) ** 2)) * smoothstep(lateral / 4.0 + 0.5)
    return fold * np.sin(np.pi * (0.1 + 0.8 * along)) ** 2


def nose_cross(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The nose's rounded cross-section (1 on the ridge, 0 at its sides) without its height."""
    tc = np.clip(t, -52.0, 16.0)
    r = s / _nose_width(tc)
    return np.where((t > -52.0) & (t < 16.0), np.clip(1.0 - r * r, 0.0, None) ** _nose_power(tc), 0.0)


def neutral_features(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``[N, 3]`` displacement (mm) that turns the base head into the mean face."""
    dz = nose_shape(s, t)
    for side in (-1, 1):
        cs = side * 14.5
        dz += 5.5 * bump(s, t, cs, -43.5, 8.0, 6.5)  # ala
        rho = np.sqrt(((s - cs) / 9.0) ** 2 + ((t + 43.5) / 7.5) ** 2)
        outer = smoothstep((side * s - 10.0) / 4.0) + smoothstep((t + 46.0) / 4.0)
        dz += -1.0 * np.exp(-(((rho - 1.0) / 0.3) ** 2)) * np.clip(outer, 0.0, 1.0)  # alar crease
        dz += -3.0 * bump(s, t, side * 6.0, -46.5, 3.5, 2.0)  # nostril
        dz += _eye_dz(s, t, side)
        dz += 4.0 * bump(s, t, side * 30.0, 18.0, 30.0, 12.0)  # brow ridge
        dz += 0.5 * bump(s, t, side * 33.0, 21.0, 24.0, 6.0)  # brow hair
        dz += 5.5 * bump(s, t, side * 44.0, -16.0, 17.0, 12.0)  # cheekbone
        dz += 3.0 * bump(s, t, side * 42.0, -48.0, 22.0, 20.0)  # cheek
        dz += -4.0 * bump(s, t, side * 60.0, 30.0, 12.0, 22.0)  # temple
        dz += 2.0 * bump(s, t, side * 22.0, 50.0, 22.0, 20.0)  # frontal bossing
        dz += nasolabial_fold(s, t, side)
        dz += 0.3 * bump(s, t, side * 5.0, -56.0, 3.5, 8.0)  # philtrum column
    dz += 2.5 * bump(s, t, 0.0, 14.0, 14.0, 10.0)  # glabella
    dz += 9.0 * bump(s, t, 0.0, -66.0, 30.0, 32.0)  # muzzle: the dental arch under the lips
    dz += -0.6 * bump(s, t, 0.0, -57.0, 5.0, 8.0)  # philtrum
    dz += lips_dz(s, t, 3.6, 4.2, 10.0)
    dz += -3.0 * bump(s, t, 0.0, -88.5, 17.0, 5.5)  # mentolabial sulcus
    dz += 5.5 * bump(s, t, 0.0, -103.0, 17.0, 10.0)  # chin
    dy = mouth_collapse(s, t, 0.93)
    return np.stack([np.zeros_like(dz), dy, dz], axis=-1)


# ----------------------------------------------------------------------------------------------
# Assembling shapes


def profile_field(grid: FaceGrid, a=None, c=None, y=None, z=None) -> np.ndarray:
    """``[N, 3]`` vertex positions (mm) from per-row profiles, each ``[rows]`` or None (zero).

    ``a`` is the ellipse half-width, ``c`` its depth, ``y``/``z`` the row's midline height and
    depth. Linear in the profiles, so it also turns profile *changes* into displacement fields.
    """
    n = grid.n_vertices
    zero = np.zeros(n)
    x = a[grid.row] * np.sin(grid.phi) if a is not None else zero
    yy = y[grid.row] if y is not None else zero
    zz = z[grid.row] if z is not None else zero
    if c is not None:
        zz = zz - c[grid.row] * (1.0 - np.cos(grid.phi))
    return np.stack([x, yy, zz], axis=-1)


def mean_profiles(row_t: np.ndarray) -> dict[str, np.ndarray]:
    """The mean head's row profiles at heights ``row_t``: ``{"a", "c", "y", "z"}`` (mm)."""
    return {"a": _A0(row_t), "c": _C0(row_t), "y": _Y0(row_t), "z": _Z0(row_t)}


def mean_face(grid: FaceGrid) -> np.ndarray:
    """``[N, 3]`` the mean face (mm, eyes at height 0): head profiles, jaw lift and features."""
    head = profile_field(grid, **mean_profiles(grid.row_t))
    head[:, 1] += lift_profile(grid.t) * side_weight(grid.phi)
    return head + neutral_features(grid.s, grid.t)


def random_smooth_fields(s: np.ndarray, t: np.ndarray, rng: np.random.Generator, n_fields: int,
                         direction_scale: tuple[float, float, float] = (0.35, 0.35, 1.0),
                         radius: tuple[float, float] = (16.0, 34.0)) -> np.ndarray:
    """``[n_fields, N, 3]`` smooth random displacements (peak about 1) over the face.

    Each field is three compact bumps (radii drawn from ``radius``, mm) at random places on the face, each moving
    its region along a random direction (scaled per axis by ``direction_scale``). Half the fields
    are mirror-symmetric about the midline, as most real variation is.
    """
    out = np.zeros((n_fields, s.shape[0], 3), dtype=np.float32)
    scale = np.asarray(direction_scale)
    # evaluate each bump only on its rows when the points come sorted by height (grid order)
    sorted_t = bool(np.all(np.diff(t) >= 0))
    for k in range(n_fields):
        symmetric = k % 2 == 0
        for _ in range(3):
            cs, ct = rng.uniform(-55.0, 55.0), rng.uniform(-105.0, 70.0)
            rs, rt = rng.uniform(*radius, size=2)
            d = rng.normal(size=3) * scale
            d /= np.linalg.norm(d) + 1e-12
            lo, hi = np.searchsorted(t, [ct - rt, ct + rt]) if sorted_t else (0, len(t))
            ss, tt = s[lo:hi], t[lo:hi]
            out[k, lo:hi] += bump(ss, tt, cs, ct, rs, rt)[:, None] * d
            if symmetric:
                out[k, lo:hi] += bump(ss, tt, -cs, ct, rs, rt)[:, None] * (d * [-1.0, 1.0, 1.0])
        peak = np.abs(out[k]).max()
        if peak > 0:
            out[k] /= peak
    return out
