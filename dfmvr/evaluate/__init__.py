"""Evaluation: the field's 3D face reconstruction metrics (docs/evaluation.md).

:mod:`dfmvr.evaluate.metrics` holds NoW's scan-to-mesh error, the point-to-plane RMSE of
Deep3DFace / MGCNet and REALY's per-region errors; :mod:`dfmvr.evaluate.surface` the exact
closest-point queries on triangle meshes they rest on.
"""

from __future__ import annotations

from dfmvr.evaluate.metrics import (
    NOW_LANDMARKS_IBUG,
    REALY_REGIONS,
    REGION_NAMES,
    IcpConfig,
    NowResult,
    P2PResult,
    ScanError,
    Similarity,
    icp_similarity,
    now_crop,
    now_crop_sphere,
    now_error,
    p2p_rmse,
    point_to_plane,
    procrustes,
    region_errors,
    vertex_regions,
)
from dfmvr.evaluate.surface import MeshSurface, SurfaceHit, closest_points_on_triangles

__all__ = [
    "IcpConfig", "MeshSurface", "NOW_LANDMARKS_IBUG", "NowResult", "P2PResult", "REALY_REGIONS",
    "REGION_NAMES", "ScanError", "Similarity", "SurfaceHit", "closest_points_on_triangles",
    "icp_similarity", "now_crop", "now_crop_sphere", "now_error", "p2p_rmse", "point_to_plane",
    "procrustes", "region_errors", "vertex_regions",
]
