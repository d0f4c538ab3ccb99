"""Per-vertex face-parsing labels from the 68 landmarks, for models that carry none (BFM).

The procedural model labels its vertices by construction; BFM has no such labels, so they are
derived here from the landmark polygons on the frontal (x, y) projection of the mean shape.
iBUG's numbering is image-side: 17-21 and 36-41 are the subject's *right* brow and eye.
"""

from __future__ import annotations

import numpy as np
from matplotlib.path import Path as _Polygon

# class ids (docs/design.md "Face-parsing classes")
SKIN, L_BROW, R_BROW, L_EYE, R_EYE, NOSE, MOUTH, U_LIP, L_LIP = range(1, 10)

def _poly(points: np.ndarray) -> _Polygon:
    return _Polygon(np.concatenate([points, points[:1]]), closed=True)


def _brow_polygon(brow: np.ndarray, thickness: float) -> np.ndarray:
    """A band under the brow landmarks (they trace the brow's upper edge)."""
    lower = brow[::-1] - np.array([0.0, thickness])
    return np.concatenate([brow, lower])


def regions_from_landmarks(vertices: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Label each vertex with a parsing class (1..9) from the iBUG-68 landmark polygons.

    Args:
        vertices: ``[N, 3]`` mean shape, model frame (x to the subject's left, y up).
        keypoints: ``[68]`` 0-based landmark vertex indices.

    Returns:
        ``[N]`` int64 labels; every vertex is at least skin (1).
    """
    xy = vertices[:, :2].astype(np.float64)
    lm = xy[keypoints]
    iod = np.linalg.norm(lm[36] - lm[45])
    labels = np.full(len(xy), SKIN, dtype=np.int64)
    # Later polygons win: the inner mouth is painted over the lips that surround it.
    inner = lm[60:68]
    upper = np.concatenate([lm[48:55], lm[[64, 63, 62, 61, 60]]])
    lower = np.concatenate([lm[54:60], lm[[48, 60, 67, 66, 65, 64]]])
    nose = np.concatenate([lm[[27]] + [[-0.07 * iod, 0]], lm[[31, 32, 33, 34, 35]], lm[[27]] + [[0.07 * iod, 0]]])
    polys = [
        (R_BROW, _brow_polygon(lm[17:22], 0.08 * iod)),
        (L_BROW, _brow_polygon(lm[22:27], 0.08 * iod)),
        (R_EYE, lm[36:42]),
        (L_EYE, lm[42:48]),
        (NOSE, nose),
        (U_LIP, upper),
        (L_LIP, lower),
        (MOUTH, inner),
    ]
    for cls, pts in polys:
        inside = _poly(pts).contains_points(xy)
        labels[inside] = cls
    return labels
