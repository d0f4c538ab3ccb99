"""Draw REALY's regions (:func:`dfmvr.evaluate.metrics.vertex_regions`) on face models' mean faces.

    python -m dfmvr.evaluate.regions_figure --out docs/evaluation-regions.png

One row per model (the 2500-vertex and the default 35709-vertex procedural models unless
``--n-vertices`` says otherwise), columns: front and a 40-degree turn to the subject's left.
Faces take the region most of their vertices have, flat-shaded by a light from the front; the
68 landmarks that face the viewer are dots.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
from pathlib import Path

import numpy as np
import torch

from dfmvr.evaluate.metrics import REGION_NAMES, vertex_regions
from dfmvr.facemodel import geometry
from dfmvr.facemodel.model import MM_PER_UNIT, FaceModel

_logger = logging.getLogger(__name__)

REGION_COLOURS = {
    "forehead": (0.95, 0.75, 0.20), "nose": (0.85, 0.25, 0.20), "mouth": (0.60, 0.25, 0.75),
    "cheeks": (0.25, 0.65, 0.35), "other": (0.80, 0.80, 0.80),
}


def draw_regions(ax, model: FaceModel, yaw_deg: float = 0.0) -> None:
    """Draw ``model``'s mean face, faces coloured by region, on a matplotlib axis."""
    from matplotlib.collections import PolyCollection

    v = model.mean_shape.double().numpy() * MM_PER_UNIT
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    rot = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])  # turns +z towards +x
    v = v @ rot.T
    tri = model.tri.numpy()
    ids = np.searchsorted(np.array(sorted(REGION_NAMES)), vertex_regions(model))
    names = np.array(sorted(REGION_NAMES))
    per_face = ids[tri]
    # the region most of a face's three vertices have (ties: the first vertex's)
    major = np.where(per_face[:, 1] == per_face[:, 2], per_face[:, 1], per_face[:, 0])
    colours = np.array([REGION_COLOURS[n] for n in names])[major]
    normal = np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    shade = 0.35 + 0.65 * np.clip(normal[:, 2], 0.0, 1.0)
    visible = normal[:, 2] > 0
    order = np.argsort(v[tri, 2].mean(1))  # far faces first (painter's algorithm)
    order = order[visible[order]]
    polys = v[tri[order]][:, :, :2]
    ax.add_collection(PolyCollection(polys, facecolors=colours[order] * shade[order, None], edgecolors="none"))
    # landmarks on the far side of the turned head would show through it: only the facing ones
    kp_idx = model.keypoints.numpy()
    vn = geometry.vertex_normals(torch.from_numpy(v)[None], model.tri)[0].numpy()
    facing = vn[kp_idx, 2] > 0
    kp = v[kp_idx[facing]]
    ax.scatter(kp[:, 0], kp[:, 1], s=4, c="k", zorder=3)
    ax.set_xlim(v[:, 0].min() - 5, v[:, 0].max() + 5)
    ax.set_ylim(v[:, 1].min() - 5, v[:, 1].max() + 5)
    ax.set_aspect("equal")
    ax.axis("off")


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    from matplotlib.patches import Patch

    from dfmvr.facemodel.procedural import make_procedural_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/evaluation-regions.png", help="PNG to write")
    parser.add_argument("--n-vertices", type=int, nargs="+", default=[2500, 35709])
    parser.add_argument("--dpi", type=int, default=90, help="resolution")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    yaws = (0.0, 40.0)
    fig, axes = plt.subplots(len(args.n_vertices), len(yaws), figsize=(4.2 * len(yaws), 4.6 * len(args.n_vertices)),
                             squeeze=False)
    for row, n in enumerate(args.n_vertices):
        model = make_procedural_model(n, 0)
        for col, yaw in enumerate(yaws):
            draw_regions(axes[row, col], model, yaw)
            axes[row, col].set_title(f"{model.name}, yaw {yaw:g} deg", fontsize=9)
    fig.legend(handles=[Patch(color=REGION_COLOURS[n], label=n) for n in REGION_NAMES],
               loc="lower center", ncol=len(REGION_NAMES), frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # a 128-colour palette (Pillow comes with matplotlib) keeps the figure near 150 KB for docs/
    buf = io.BytesIO()
    fig.savefig(buf, dpi=args.dpi, format="png")
    image = Image.open(buf).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    _logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
