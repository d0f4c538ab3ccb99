"""Scoring one reconstruction against a sample's scan: the scan's truth (landmarks, crop, the
model's topology or not) and every metric of :mod:`dfmvr.evaluate.metrics` for one prediction
(docs/evaluation.md, "Metrics"). The methods scored per sample and the baselines are named here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dfmvr.data.batch import TripletItem

METHODS = ("model", "mean_face", "single_view")
"""The reconstructions scored per sample; the last two are the baselines."""
BASELINES = METHODS[1:]
NOSE_TIP_IBUG = 30
RANK_KEY = "now_mean_mm"
"""Per-sample metric of the model that orders the best and worst overlays."""


@dataclass(kw_only=True, slots=True)
class ScanTruth:
    """A sample's ground truth as the metrics take it (face-model units)."""

    vertices: np.ndarray
    faces: np.ndarray
    lmk7: np.ndarray
    """``[7, 3]`` NoW's landmarks on the scan."""
    nose_tip: np.ndarray
    same_topology: bool
    """The scan is a mesh of the face model's topology (synthetic data): vertex-wise metrics apply."""


def scan_truth(item: TripletItem, keypoints: np.ndarray, n_vertices: int, now_ibug: tuple[int, ...]
               ) -> ScanTruth | str:
    """The ground truth of ``item``, or why it has none usable."""
    if item.gt_vertices is None or item.gt_faces is None:
        return "no ground-truth mesh (gt.npz) in the sample"
    verts, faces = item.gt_vertices.astype(np.float64), item.gt_faces
    if len(verts) == n_vertices:
        lmk68 = verts[keypoints]
        same = True
    elif item.lmk3d is not None and len(item.lmk3d) == 68:
        lmk68 = item.lmk3d.astype(np.float64)
        same = False
    else:
        k = 0 if item.lmk3d is None else len(item.lmk3d)
        return (f"scan has {len(verts)} vertices (not the face model's {n_vertices}) and lmk3d holds {k} "
                "points, not the 68 iBUG landmarks: no scan landmarks for the alignment")
    return ScanTruth(vertices=verts, faces=faces, lmk7=lmk68[list(now_ibug)], nose_tip=lmk68[NOSE_TIP_IBUG],
                     same_topology=same)


def score(pred: np.ndarray, truth: ScanTruth, faces: np.ndarray, keypoints: np.ndarray, regions: np.ndarray,
          *, source: str, icp_iters: int) -> tuple[dict[str, float], np.ndarray]:
    """All metrics of one reconstruction ``pred [N, 3]`` (decimetres) against ``truth``.

    Returns:
        ``(metrics, now_distances_mm [K] float32)``.

    Raises:
        dfmvr.evaluate.metrics.ScanError: the scan or the prediction cannot be scored.
    """
    from dfmvr.evaluate import metrics as m
    from dfmvr.train.metrics import aligned_vertex_rmse_mm

    lmk = pred[keypoints]
    pred_lmk7 = lmk[list(m.NOW_LANDMARKS_IBUG)]
    icp = m.IcpConfig(max_iters=icp_iters)
    now = m.now_error(pred, faces, pred_lmk7, truth.vertices, truth.faces, truth.lmk7, icp=icp, source=source)
    out = {"now_mean_mm": now.mean_mm, "now_median_mm": now.median_mm, "now_std_mm": now.std_mm,
           "now_points": float(now.n_scan_points)}
    # the 7 landmarks give ICP its start (a scan's frame need not be the model's); the nose tip crops
    out["p2p_rmse_mm"] = float(m.p2p_rmse(pred, faces, truth.vertices, truth.faces, scan_nose_tip=truth.nose_tip,
                                          pred_nose_tip=lmk[NOSE_TIP_IBUG], scan_landmarks=truth.lmk7,
                                          pred_landmarks=pred_lmk7, icp=icp, source=source))
    if truth.same_topology:
        p, g = torch.from_numpy(pred)[None], torch.from_numpy(truth.vertices)[None]
        out["vertex_rmse_mm"] = float(aligned_vertex_rmse_mm(p.double(), g.double())[0])
        for name, value in m.region_errors(pred, truth.vertices, regions, source=source).items():
            out[f"region_{name}_mm"] = float(value)
    return out, now.distances_mm.astype(np.float32)


def _now_ibug() -> tuple[int, ...]:
    from dfmvr.evaluate.metrics import NOW_LANDMARKS_IBUG

    return tuple(NOW_LANDMARKS_IBUG)


__all__ = ["BASELINES", "METHODS", "NOSE_TIP_IBUG", "RANK_KEY", "ScanTruth", "scan_truth", "score"]
