"""The procedural morphable face model: dfmvr's embedded default face model, built by code.

``make_procedural_model(n_vertices, seed)`` builds a BFM-like front-of-head model (same fields,
units and conventions as :func:`dfmvr.facemodel.model.load_bfm`):

1. a vertex grid over the face (:mod:`surface`), every vertex tied to canonical face
   coordinates, so parsing labels and landmarks come from the layout (:mod:`anatomy`);
2. an identity population (:mod:`identity`, 300 faces from named shape parameters) whose PCA
   around its mean gives ``mean_shape`` and the 80-column ``id_base``;
3. an expression population (:mod:`expressions`) whose PCA around the neutral face gives the
   64-column ``exp_base``;
4. an albedo population (:mod:`albedo`, light to dark skin) whose PCA gives ``mean_tex`` and the
   80-column ``tex_base``.

Basis columns are eigenvector * sqrt(eigenvalue), so coefficients are about N(0, 1) over the
population, as with BFM. The same ``(n_vertices, seed)`` always gives the same model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time

import numpy as np
import torch

from dfmvr.facemodel import albedo as alb
from dfmvr.facemodel import anatomy as an
from dfmvr.facemodel import expressions as ex
from dfmvr.facemodel import identity as ident
from dfmvr.facemodel import surface as sf
from dfmvr.facemodel.model import MM_PER_UNIT, FaceModel, build_point_buf
from dfmvr.facemodel.regions import L_EYE, L_LIP, MOUTH, R_EYE, SKIN, U_LIP

_logger = logging.getLogger(__name__)

N_ID, N_EXP, N_TEX = 80, 64, 80
POPULATION = 300
"""Faces in each population (identity, expression, albedo)."""
JAW_START_MM = -8.0
"""Height (relative to the eyes) where the jaw contour (iBUG 0 and 16) starts."""


def _pca(q: np.ndarray, design: np.ndarray, k: int, centred: bool, pad_rng: np.random.Generator,
         pad_fields) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[3N]`` and basis ``[3N, k]`` (eigenvector * sqrt(eigenvalue)) of a population.

    The population's samples are ``q @ design`` (``q [S, P]`` weights, ``design [P, N, 3]``
    fields), so their covariance is ``D^T C D`` with ``C`` the covariance of ``q``; its
    eigenvectors are found in the ``P``-dimensional span of the fields (exactly the PCA of
    the ``[S, 3N]`` sample matrix, without forming it). ``centred=False`` keeps the origin as
    the mean (expressions: zero is the neutral face). Components the population does not reach
    (rank below ``k``) are replaced by ``pad_fields(rng, m) -> [m, 3N]`` smooth fields made
    orthogonal to the rest, a little smaller than the smallest real component each, so every
    column moves the face.
    """
    d = design.reshape(design.shape[0], -1)
    gram_d = (d @ d.T).astype(np.float64)  # float32 products are plenty for the whitening
    q = q.astype(np.float64)
    q_mean = q.mean(axis=0)
    qc = q - q_mean if centred else q
    denom = q.shape[0] - 1 if centred else q.shape[0]
    cov = qc.T @ qc / denom
    # whiten the fields' span: M = D D^T = V S V^T, then diagonalise S^1/2 V^T C V S^1/2
    s_m, v_m = np.linalg.eigh(gram_d)
    ok = s_m > 1e-10 * s_m.max()
    s_m, v_m = s_m[ok], v_m[:, ok]
    root = np.sqrt(s_m)
    eigval, w = np.linalg.eigh((root[:, None] * (v_m.T @ cov @ v_m)) * root[None, :])
    order = np.argsort(eigval)[::-1]
    eigval, w = np.clip(eigval[order], 0.0, None), w[:, order]
    keep = int(np.sum(eigval[:k] > 1e-6 * eigval[0]))
    coeff = (v_m / root[None, :]) @ w[:, :keep] * np.sqrt(eigval[:keep])  # [P, keep]
    basis = d.T @ coeff.astype(np.float32)
    if keep < k:
        unit = (basis / np.linalg.norm(basis, axis=0, keepdims=True)).astype(np.float64)
        pads: list[np.ndarray] = []
        for f in pad_fields(pad_rng, k - keep).astype(np.float64):
            f = f - unit @ (unit.T @ f)
            for p in pads:
                f = f - p * (p @ f)
            pads.append(f / np.linalg.norm(f))
        scale = np.sqrt(eigval[keep - 1]) * 0.9 ** np.arange(1, k - keep + 1)
        basis = np.concatenate([basis, (np.stack(pads, axis=1) * scale).astype(np.float32)], axis=1)
        _logger.debug("population rank %d < %d basis columns: padded with %d smooth fields", keep, k, k - keep)
    mean = q_mean.astype(np.float32) @ d if centred else np.zeros(d.shape[1])
    return mean.astype(np.float32), basis.astype(np.float32)


def _nearest(s: np.ndarray, t: np.ndarray, points: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """Index of the vertex nearest each canonical point ``[K, 2]`` (among ``allowed`` ones)."""
    d2 = (s[None] - points[:, :1]) ** 2 + (t[None] - points[:, 1:]) ** 2
    if allowed is not None:
        d2 = np.where(allowed[None], d2, np.inf)
    return d2.argmin(axis=1)


def _landmarks(grid: sf.FaceGrid, mean_mm: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The 68 iBUG landmark vertices of the mean face."""
    s, t = grid.s, grid.t
    lm = an.canonical_landmarks()
    mid = an.mouth_curves(s)["mid"]
    idx = np.zeros(68, dtype=np.int64)
    not_eye = (labels != L_EYE) & (labels != R_EYE)
    groups = [
        (range(17, 36), None),
        ((36, 39, 42, 45), None),  # eye corners
        ((37, 38, 40, 41, 43, 44, 46, 47), not_eye),  # on the lids
        ((48, 54, 60, 64), None),  # mouth corners
        (range(49, 54), None),
        (range(55, 60), None),
        # the inner lips: on their own lip or the lens half that follows it when the mouth opens
        ((61, 62, 63), (labels == U_LIP) | ((labels == MOUTH) & (t >= mid))),
        ((65, 66, 67), (labels == L_LIP) | ((labels == MOUTH) & (t < mid))),
    ]
    for ids, allowed in groups:
        ids = list(ids)
        idx[ids] = _nearest(s, t, lm[ids], allowed)
    idx[:17] = _jaw_landmarks(grid, mean_mm)
    return idx


def _jaw_landmarks(grid: sf.FaceGrid, v: np.ndarray) -> np.ndarray:
    """iBUG 0-16: 17 points evenly along the face's frontal silhouette below the eyes, from the
    subject's right (-x) round the chin to the left, each the front-facing vertex a few mm inside.
    """
    grid_idx = np.arange(grid.n_vertices).reshape(grid.n_rows, grid.n_cols)
    right = grid_idx[::-1, 0]
    left = grid_idx[:, -1]
    path = np.concatenate([right[v[right, 1] < JAW_START_MM], grid_idx[0, 1:-1], left[v[left, 1] < JAW_START_MM]])
    xy = v[path, :2].astype(np.float64)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
    at = np.linspace(0.0, arc[-1], 17)
    pts = np.stack([np.interp(at, arc, xy[:, 0]), np.interp(at, arc, xy[:, 1])], axis=1)
    centre = np.array([0.0, -40.0])
    inward = (centre - pts) / np.linalg.norm(centre - pts, axis=1, keepdims=True)
    pts = pts + 5.0 * inward
    normals = _vertex_normals(v, grid.tri)
    front = normals[:, 2] > 0.3
    d2 = ((v[None, :, :2] - pts[:, None]) ** 2).sum(-1)
    return np.where(front[None], d2, np.inf).argmin(axis=1)


def _vertex_normals(v: np.ndarray, tri: np.ndarray) -> np.ndarray:
    fn = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])
    vn = np.zeros_like(v)
    for i in range(3):
        np.add.at(vn, tri[:, i], fn)
    return vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)


def _single_threaded_blas():
    """One BLAS thread while building: the matrices are small or tall, and threaded OpenBLAS
    slows down many-fold on a busy machine (seen here: 0.3 s instead of 8 ms per 100x100 eigh
    with other jobs running). ``threadpoolctl`` comes with scikit-learn (an MLflow dependency)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _flat(fields: np.ndarray) -> np.ndarray:
    return fields.reshape(fields.shape[0], -1)


@functools.lru_cache(maxsize=4)  # a 35k-vertex model holds about 100 MB of bases
def make_procedural_model(n_vertices: int = 35709, seed: int = 0) -> FaceModel:
    """Build (once per argument pair; cached, treat as read-only) the procedural face model.

    Args:
        n_vertices: target vertex count; the model has the nearest grid size (within 4 %).
        seed: seeds the populations (and the random detail fields) the bases come from.

    Returns:
        A :class:`FaceModel` named ``procedural:seed=<seed>:n=<N>`` with ``N`` its real vertex count.
    """
    with _single_threaded_blas():
        return _build(n_vertices, seed)


def _build(n_vertices: int, seed: int) -> FaceModel:
    start = time.perf_counter()
    grid = sf.make_grid(n_vertices)
    n = grid.n_vertices
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7)]

    def smooth_pad(rng: np.random.Generator, m: int) -> np.ndarray:
        return _flat(sf.random_smooth_fields(grid.s, grid.t, rng, m))

    z = ident.sample_identity(streams[1], POPULATION)
    mean, id_base = _pca(ident.shape_coefficients(z), ident.identity_design(grid, streams[0]), N_ID,
                         True, streams[6], smooth_pad)

    named = ex.expression_fields(grid)
    exp_design = np.concatenate([np.stack(list(named.values())), ex.micro_fields(grid, streams[2])])
    weights = ex.sample_expressions(streams[3], list(named), POPULATION)
    _, exp_base = _pca(weights, exp_design, N_EXP, False, streams[6], smooth_pad)

    mean_tex, tex_base = _pca(alb.albedo_coefficients(streams[5], POPULATION),
                              alb.albedo_design(grid, streams[4]), N_TEX, True, streams[6], smooth_pad)

    mean_mm = mean.reshape(n, 3)
    labels = an.parse_labels(grid.s, grid.t)
    keypoints = _landmarks(grid, mean_mm, labels)
    extra = _nearest(grid.s, grid.t, an.SPARSE_EXTRA)
    centred = mean_mm - mean_mm.mean(axis=0, keepdims=True)

    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    i64 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    model = FaceModel(
        mean_shape=f32(centred / MM_PER_UNIT),
        id_base=f32(id_base / MM_PER_UNIT),
        exp_base=f32(exp_base / MM_PER_UNIT),
        mean_tex=f32(np.clip(mean_tex, 0.0, 1.0)),
        tex_base=f32(tex_base),
        tri=i64(grid.tri),
        point_buf=i64(build_point_buf(grid.tri, n)),
        keypoints=i64(keypoints),
        skinmask=torch.from_numpy(labels == SKIN),
        region=i64(labels),
        lm3d_index=i64(np.concatenate([keypoints, extra])),
        name=f"procedural:seed={seed}:n={n}",
    )
    _logger.info("built %s: %d vertices, %d faces in %.2f s", model.name, n, grid.tri.shape[0],
                 time.perf_counter() - start)
    return model


def expression_names() -> list[str]:
    """Names accepted by :func:`expression_coefficients`."""
    return list(ex.expression_fields(sf.make_grid(200)))


def expression_coefficients(model: FaceModel, **strengths: float) -> torch.Tensor:
    """Expression coefficients ``[n_exp]`` closest to named expressions of a procedural model.

    Example: ``expression_coefficients(model, jaw_open=1.0, smile_L=0.5, smile_R=0.5)``.

    Args:
        model: a model from :func:`make_procedural_model`.
        strengths: expression name (see :func:`expression_names`) -> strength (1 = full).

    Raises:
        ValueError: ``model`` is not a procedural model, or an expression name is unknown.
    """
    if not model.name.startswith("procedural:"):
        raise ValueError(f"expression_coefficients needs a procedural face model, got {model.name!r}")
    grid = sf.make_grid(model.n_vertices, sf.grid_shape_of_mesh(model.n_vertices, model.n_faces))
    fields = ex.expression_fields(grid)
    unknown = sorted(set(strengths) - set(fields))
    if unknown:
        raise ValueError(f"unknown expression(s) {unknown}; expected some of {sorted(fields)}")
    target = sum(w * fields[k] for k, w in strengths.items()) / MM_PER_UNIT
    base = model.exp_base.double()
    rhs = torch.as_tensor(np.asarray(target, dtype=np.float64), device=base.device).reshape(-1, 1)
    return torch.linalg.lstsq(base, rhs).solution[:, 0].to(model.exp_base.dtype)
