"""Closest points on a triangle mesh, exact, in numpy (no trimesh at run time).

:class:`MeshSurface` answers "where on this surface is each of these points closest, and how far"
for the evaluation metrics (NoW scan-to-mesh error, point-to-plane RMSE and their ICP). Shapes:
``P`` query points, ``N`` vertices, ``F`` faces.

How a query works:

1. candidates: the triangles owning the ``k`` sample points nearest the query point (a KD-tree over
   the samples, built once per mesh). A triangle's samples are its centroid, or for triangles much
   larger than the mesh's typical one, the centroids of its regular subdivision into ``m^2``
   similar sub-triangles, so that every point of the triangle lies within ``r`` of one of its
   samples, ``r`` about the median triangle's centroid-to-corner radius;
2. the exact closest point on each candidate (Ericson, *Real-Time Collision Detection* 5.1.5:
   the point's Voronoi region of the triangle -- a corner, an edge or the face -- decides which
   formula applies), the nearest one wins;
3. a proof that no other triangle is nearer: a triangle none of whose samples is among the ``k``
   nearest has all its samples at least ``s_k`` away (the k-th sample distance), so all its
   points at least ``s_k - r``. When the best distance found is at most that, the answer is
   exact; otherwise every triangle with a sample within ``best + r`` is tried (a ball query),
   which is exact too. On the face meshes dfmvr uses, the fallback is taken by a small share of
   the points (those far off the surface or past its border).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

_logger = logging.getLogger(__name__)

_CHUNK_PAIRS = 500_000
"""Point-triangle pairs evaluated at once (bounds the intermediates to ~50 MB)."""


@dataclass(kw_only=True, slots=True)
class SurfaceHit:
    """The closest surface point of each query point.

    Args:
        points: ``[P, 3]`` closest points on the surface.
        distances: ``[P]`` Euclidean distance from each query point to its closest point.
        faces: ``[P]`` index of the triangle the closest point lies on (when it lies on an edge or
            a corner shared by several triangles, one of them).
    """

    points: np.ndarray
    distances: np.ndarray
    faces: np.ndarray


def closest_points_on_triangles(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest point on triangle ``(a, b, c)`` to ``p``, row by row (Ericson's region method).

    Args:
        p, a, b, c: ``[M, 3]`` float64 query points and triangle corners.

    Returns:
        ``[M, 3]`` closest points. Degenerate (zero-area) triangles are handled as the union of
        their three edges.
    """
    return _closest(p, _TriangleTerms.of(a, b, c))


@dataclass(kw_only=True, slots=True)
class _TriangleTerms:
    """Per-triangle quantities of Ericson's method that do not depend on the query point."""

    a: np.ndarray  # [M, 3] first corner
    ab: np.ndarray  # [M, 3] b - a
    ac: np.ndarray  # [M, 3] c - a
    e11: np.ndarray  # [M] ab.ab
    e12: np.ndarray  # [M] ab.ac
    e22: np.ndarray  # [M] ac.ac
    degenerate: np.ndarray  # [M] bool, zero area

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> "_TriangleTerms":
        ab, ac = b - a, c - a
        e11 = np.einsum("ij,ij->i", ab, ab)
        e22 = np.einsum("ij,ij->i", ac, ac)
        area2 = np.linalg.norm(np.cross(ab, ac), axis=1)
        return cls(a=a, ab=ab, ac=ac, e11=e11, e12=np.einsum("ij,ij->i", ab, ac), e22=e22,
                   degenerate=area2 <= 1e-12 * np.maximum(e11, e22))

    def take(self, idx: np.ndarray) -> "_TriangleTerms":
        return _TriangleTerms(a=self.a[idx], ab=self.ab[idx], ac=self.ac[idx], e11=self.e11[idx],
                              e12=self.e12[idx], e22=self.e22[idx], degenerate=self.degenerate[idx])


def _closest(p: np.ndarray, t: _TriangleTerms) -> np.ndarray:
    """Ericson's ClosestPtPointTriangle, vectorised; the six dot products he takes reduce to two
    per query (``d3 = d1 - ab.ab`` and so on), the rest is per-triangle."""
    ap = p - t.a
    d1 = np.einsum("ij,ij->i", t.ab, ap)
    d2 = np.einsum("ij,ij->i", t.ac, ap)
    d3, d4 = d1 - t.e11, d2 - t.e12
    d5, d6 = d1 - t.e12, d2 - t.e22
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        # the region tests guarantee den != 0 where a ratio is kept; elsewhere it is discarded
        return num / np.where(den == 0.0, 1.0, den)

    # Barycentric (v, w) of the closest point: the face interior first, then each region's test
    # overrides it (the tests are exclusive for non-degenerate triangles; order decides ties).
    denom = va + vb + vc
    v, w = ratio(vb, denom), ratio(vc, denom)
    in_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    w_bc = ratio(d4 - d3, (d4 - d3) + (d5 - d6))
    v, w = np.where(in_bc, 1.0 - w_bc, v), np.where(in_bc, w_bc, w)
    in_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    v, w = np.where(in_ac, 0.0, v), np.where(in_ac, ratio(d2, d2 - d6), w)
    in_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    v, w = np.where(in_ab, ratio(d1, d1 - d3), v), np.where(in_ab, 0.0, w)
    at_c = (d6 >= 0) & (d5 <= d6)
    v, w = np.where(at_c, 0.0, v), np.where(at_c, 1.0, w)
    at_b = (d3 >= 0) & (d4 <= d3)
    v, w = np.where(at_b, 1.0, v), np.where(at_b, 0.0, w)
    at_a = (d1 <= 0) & (d2 <= 0)
    v, w = np.where(at_a, 0.0, v), np.where(at_a, 0.0, w)
    out = t.a + t.ab * v[:, None] + t.ac * w[:, None]

    if t.degenerate.any():
        i = np.flatnonzero(t.degenerate)
        a, b, c = t.a[i], t.a[i] + t.ab[i], t.a[i] + t.ac[i]
        segs = np.stack([_closest_on_segments(p[i], s, e) for s, e in ((a, b), (b, c), (c, a))])
        d = ((segs - p[i][None]) ** 2).sum(-1)
        out[i] = segs[d.argmin(0), np.arange(len(i))]
    return out


def _closest_on_segments(p: np.ndarray, s: np.ndarray, e: np.ndarray) -> np.ndarray:
    d = e - s
    dd = np.einsum("ij,ij->i", d, d)
    t = np.clip(np.einsum("ij,ij->i", p - s, d) / np.where(dd == 0.0, 1.0, dd), 0.0, 1.0)
    return s + d * t[:, None]


_TARGET_FACTOR = 1.0
_MAX_SUBDIVISION = 16
"""Largest ``m`` (``m^2`` samples) for one triangle; bigger ones just loosen the bound ``r``."""


def _subdivision_barycentrics(m: int) -> np.ndarray:
    """``[m^2, 2]`` barycentric ``(v, w)`` of the sub-triangle centroids of a regular ``m``-split."""
    i, j = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    up = (i + j <= m - 1)
    down = (i + j <= m - 2)
    bary = np.concatenate([
        np.stack([i[up] + 1 / 3, j[up] + 1 / 3], axis=1),
        np.stack([i[down] + 2 / 3, j[down] + 2 / 3], axis=1),
    ])
    return bary / m


class MeshSurface:
    """A triangle mesh prepared for exact closest-point queries.

    Args:
        vertices: ``[N, 3]`` vertex positions (any unit; distances come back in it).
        faces: ``[F, 3]`` 0-based vertex indices.
        k: sample points (so at most ``k`` triangles) tried per query point before the exactness
            check; more costs time, never exactness (see the module docstring).

    Raises:
        ValueError: wrong shapes, no faces, indices out of range or non-finite vertices.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, *, k: int = 16) -> None:
        v = np.asarray(vertices, dtype=np.float64)
        f = np.asarray(faces)
        if v.ndim != 2 or v.shape[1] != 3:
            raise ValueError(f"vertices must have shape (N, 3); got {v.shape}")
        if f.ndim != 2 or f.shape[1] != 3 or f.shape[0] == 0:
            raise ValueError(f"faces must have shape (F, 3) with F > 0; got {f.shape}")
        if not np.issubdtype(f.dtype, np.integer):
            raise ValueError(f"faces must be integer vertex indices; got dtype {f.dtype}")
        if f.min() < 0 or f.max() >= len(v):
            raise ValueError(f"faces must index vertices 0..{len(v) - 1}; got range {f.min()}..{f.max()}")
        if not np.isfinite(v).all():
            raise ValueError(f"vertices must be finite; {int((~np.isfinite(v)).any(1).sum())} are not")
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        self.vertices = v
        self.faces = f.astype(np.int64)
        self.corners = v[self.faces]  # [F, 3 corners, 3]
        self._terms = _TriangleTerms.of(self.corners[:, 0], self.corners[:, 1], self.corners[:, 2])
        centroids = self.corners.mean(axis=1)
        radius = np.linalg.norm(self.corners - centroids[:, None], axis=2).max(axis=1)
        target = max(float(np.median(radius)) * _TARGET_FACTOR, 1e-12)
        split = np.clip(np.ceil(radius / target), 1, _MAX_SUBDIVISION).astype(np.int64)
        samples, owners = [], []
        for m in np.unique(split):
            fi = np.flatnonzero(split == m)
            bary = _subdivision_barycentrics(int(m))  # [m^2, 2]
            c = self.corners[fi]
            pts = c[:, None, 0] + bary[None, :, :1] * (c[:, None, 1] - c[:, None, 0]) \
                + bary[None, :, 1:] * (c[:, None, 2] - c[:, None, 0])
            samples.append(pts.reshape(-1, 3))
            owners.append(np.repeat(fi, len(bary)))
        self.samples = np.concatenate(samples)
        self.sample_face = np.concatenate(owners)
        # every point of a face is within radius/m of one of its samples; slack for rounding
        self.bound = float((radius / split).max()) * (1 + 1e-9) + 1e-12
        self.k = min(k, len(self.samples))
        self.tree = cKDTree(self.samples)
        n = np.cross(self.corners[:, 1] - self.corners[:, 0], self.corners[:, 2] - self.corners[:, 0])
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        self.face_normals = n / np.where(norm == 0.0, 1.0, norm)
        """``[F, 3]`` unit normals (right-hand rule over the face's vertex order; zero when degenerate)."""
        self.n_retried = 0
        """Query points that needed the second (ball) query so far (for benchmarks and tests)."""
        self._vertex_normals: np.ndarray | None = None

    @property
    def vertex_normals(self) -> np.ndarray:
        """``[N, 3]`` unit vertex normals: the normals of the faces around each vertex, weighted by
        the face's angle at that vertex (so they do not depend on how a region is triangulated);
        zero for a vertex no non-degenerate face uses. Computed on first use."""
        if self._vertex_normals is None:
            c = self.corners
            weights = np.empty((len(c), 3))
            for i in range(3):
                e1, e2 = c[:, (i + 1) % 3] - c[:, i], c[:, (i + 2) % 3] - c[:, i]
                weights[:, i] = np.arctan2(np.linalg.norm(np.cross(e1, e2), axis=1), np.einsum("ij,ij->i", e1, e2))
            acc = np.zeros_like(self.vertices)
            for i in range(3):
                np.add.at(acc, self.faces[:, i], self.face_normals * weights[:, i, None])
            norm = np.linalg.norm(acc, axis=1, keepdims=True)
            self._vertex_normals = acc / np.where(norm == 0.0, 1.0, norm)
        return self._vertex_normals

    def barycentric(self, points: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """``[P, 3]`` barycentric weights of ``points [P, 3]`` (on or near the surface) in the faces
        ``faces [P]`` (e.g. a :class:`SurfaceHit`'s); for a degenerate face, weight 1 on its corner
        nearest the point."""
        t = self._terms.take(faces)
        ap = np.asarray(points, dtype=np.float64) - t.a
        d1 = np.einsum("ij,ij->i", t.ab, ap)
        d2 = np.einsum("ij,ij->i", t.ac, ap)
        denom = t.e11 * t.e22 - t.e12 ** 2
        safe = np.where(t.degenerate | (denom == 0.0), 1.0, denom)
        v = (t.e22 * d1 - t.e12 * d2) / safe
        w = (t.e11 * d2 - t.e12 * d1) / safe
        out = np.stack([1.0 - v - w, v, w], axis=1)
        bad = t.degenerate | (denom == 0.0)
        if bad.any():
            corners = self.corners[faces[bad]]
            near = np.linalg.norm(corners - np.asarray(points, dtype=np.float64)[bad, None], axis=2).argmin(1)
            out[bad] = np.eye(3)[near]
        return out

    def normals_at(self, hit: SurfaceHit) -> np.ndarray:
        """``[P, 3]`` unit surface normal at each closest point of ``hit``: the vertex normals
        (:attr:`vertex_normals`) interpolated with the point's barycentric weights. Unlike a face
        normal it is one value at a point on an edge or corner (whichever of the faces sharing it
        the query returned) and it varies continuously over the surface; the face's own normal
        where the interpolation vanishes."""
        bary = self.barycentric(hit.points, hit.faces)
        n = np.einsum("pk,pkj->pj", bary, self.vertex_normals[self.faces[hit.faces]])
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        return np.where(norm > 1e-12, n / np.where(norm == 0.0, 1.0, norm), self.face_normals[hit.faces])

    def closest(self, points: np.ndarray) -> SurfaceHit:
        """The closest surface point of each of ``points [P, 3]``; exact (see the module docstring)."""
        p = np.asarray(points, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3:
            raise ValueError(f"points must have shape (P, 3); got {p.shape}")
        out_q = np.empty_like(p)
        out_d = np.empty(len(p))
        out_f = np.empty(len(p), dtype=np.int64)
        unsure = []
        step = max(1, _CHUNK_PAIRS // self.k)  # bounds the [points, k, 3] intermediates
        for lo in range(0, len(p), step):
            q, d, f, certain = self._query(p[lo:lo + step])
            out_q[lo:lo + step], out_d[lo:lo + step], out_f[lo:lo + step] = q, d, f
            unsure.append(lo + np.flatnonzero(~certain))
        todo = np.concatenate(unsure) if unsure else np.zeros(0, np.int64)
        if len(todo):
            self.n_retried += len(todo)
            q, d, f = self._ball(p[todo], out_d[todo] + self.bound)
            out_q[todo], out_d[todo], out_f[todo] = q, d, f
        return SurfaceHit(points=out_q, distances=out_d, faces=out_f)

    def _query(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Nearest point among the faces of the ``k`` nearest samples, and whether it is provably
        the nearest on the whole surface."""
        k = self.k
        sdist, near = self.tree.query(p, k=k)
        sdist = sdist.reshape(len(p), k)
        cand = self.sample_face[near.reshape(len(p), k)]
        q = self._on_faces(np.repeat(p, k, axis=0), cand.reshape(-1)).reshape(len(p), k, 3)
        d2 = ((q - p[:, None]) ** 2).sum(-1)
        best = d2.argmin(axis=1)
        rows = np.arange(len(p))
        d = np.sqrt(d2[rows, best])
        certain = d <= sdist[:, -1] - self.bound if k < len(self.samples) else np.ones(len(p), bool)
        return q[rows, best], d, cand[rows, best], certain

    def _ball(self, p: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact answers by trying every face with a sample within ``radius`` of each point."""
        out_q = np.empty_like(p)
        out_d = np.empty(len(p))
        out_f = np.empty(len(p), dtype=np.int64)
        n_faces = len(self.faces)
        start = 0
        while start < len(p):
            # grow the chunk while its pairs fit the budget (counts first, lists after)
            counts = self.tree.query_ball_point(p[start:start + 4096], radius[start:start + 4096],
                                                return_length=True)
            take = max(1, int(np.searchsorted(np.cumsum(counts), _CHUNK_PAIRS, side="right")))
            stop = start + take
            lists = self.tree.query_ball_point(p[start:stop], radius[start:stop])
            sizes = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
            assert (sizes > 0).all(), "the ball always holds a sample of the face the k-query found"
            owner = np.repeat(np.arange(stop - start), sizes)
            faces = self.sample_face[np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64,
                                                 count=int(sizes.sum()))]
            # a face's samples often share one ball: try each face once per point
            key = np.unique(owner * n_faces + faces)
            owner, faces = key // n_faces, key % n_faces
            q = self._on_faces(p[start + owner], faces)
            d2 = ((q - p[start + owner]) ** 2).sum(-1)
            first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            low = np.minimum.reduceat(d2, first)
            hit = np.flatnonzero(d2 == low[owner])
            pick = hit[np.unique(owner[hit], return_index=True)[1]]
            out_q[start:stop], out_d[start:stop], out_f[start:stop] = q[pick], np.sqrt(d2[pick]), faces[pick]
            start = stop
        return out_q, out_d, out_f

    def _on_faces(self, p: np.ndarray, face_idx: np.ndarray) -> np.ndarray:
        return _closest(p, self._terms.take(face_idx))
