"""Which samples the evaluation and reconstruction jobs refuse for their 2D landmarks."""

from __future__ import annotations

import numpy as np

from dfmvr.data.samples import LANDMARK_MARGIN, landmark_problem


def _inside(size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(8, size - 8, (3, 68, 2)).astype(np.float32)


def test_landmarks_inside_or_just_past_the_border_are_kept():
    lmk = _inside()
    assert landmark_problem(lmk, 64) is None
    lmk[1, 8] = (30.0, 64.0 + 0.99 * LANDMARK_MARGIN * 64)  # a chin cut by the crop
    lmk[0, 0] = (-0.5, 20.0)
    assert landmark_problem(lmk, 64) is None


def test_landmarks_well_outside_are_named_with_view_index_and_position():
    lmk = _inside()
    lmk[2, 10] = (80.0, 30.0)
    lmk[2, 11] = (81.0, 31.0)
    lmk[0, 3] = (20.0, -7.0)
    problem = landmark_problem(lmk, 64)
    assert problem is not None
    assert "6.4 px outside the 64 x 64 image" in problem
    assert "1 in view 'left' (e.g. landmark 3 at (20.0, -7.0))" in problem
    assert "2 in view 'right' (e.g. landmark 10 at (80.0, 30.0))" in problem
    assert "'front'" not in problem
