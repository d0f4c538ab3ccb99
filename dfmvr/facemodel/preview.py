"""Render a face model's mean face and random samples in the three training views.

    python -m dfmvr.facemodel.preview --out docs/faces.png
    python -m dfmvr.facemodel.preview --out /tmp/faces.png --n-vertices 3000 --samples 3

Columns: the mean face, then random faces (identity, expression and albedo coefficients drawn
from N(0, scale^2)), then the per-vertex parsing labels of the mean face; rows: yaw -45, 0,
+45 degrees. Rendered with :class:`dfmvr.render.Renderer` (torch backend) through the
camera of docs/design.md ("Camera"), Lambertian SH shading of the albedo.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch

from dfmvr.facemodel import geometry
from dfmvr.facemodel.decode import decode_faces, views_from_yaws
from dfmvr.facemodel.layout import Coeffs
from dfmvr.facemodel.model import FaceModel

_logger = logging.getLogger(__name__)

YAWS = (-45.0, 0.0, 45.0)

LABEL_COLOURS = np.array([
    [0, 0, 0], [230, 190, 160], [120, 70, 30], [200, 120, 40], [30, 110, 230],
    [60, 200, 230], [250, 220, 0], [120, 0, 20], [240, 90, 90], [200, 30, 140],
], dtype=np.float32) / 255.0
"""Colour of each parsing class (background, skin, l/r brow, l/r eye, nose, mouth, upper/lower lip)."""


def preview_gamma(ambient: float = 0.0, front: float = 0.3, above: float = 0.15, side: float = 0.08) -> torch.Tensor:
    """``[1, 27]`` SH lighting: zero is ambient only (flat); the default adds a soft light from
    the front, above and the image's left so that the shape reads."""
    g = torch.zeros(1, 3, 9)
    g[..., 0] = ambient
    g[..., 1] = -above  # basis 1 is -y: negative lights normals facing up
    g[..., 2] = front
    g[..., 3] = side  # basis 3 is -x: positive lights normals facing the image's left
    return g.reshape(1, 27)


def render_face(model: FaceModel, renderer, id_coeff: torch.Tensor, exp_coeff: torch.Tensor,
                tex_coeff: torch.Tensor, yaws_deg=YAWS, gamma: torch.Tensor | None = None) -> torch.Tensor:
    """One face in several views: ``[V, H, W, 3]`` images in [0, 1].

    Args:
        id_coeff, exp_coeff, tex_coeff: ``[1, K]`` coefficients.
        yaws_deg: y-angle of each view (degrees); the face sits at the origin.
    """
    angles, trans = views_from_yaws(yaws_deg)
    g = preview_gamma() if gamma is None else gamma
    out = decode_faces(model, Coeffs(id_coeff, exp_coeff, tex_coeff, g, angles, trans), renderer, clamp_albedo=True)
    return out.image.permute(0, 2, 3, 1).clamp(0.0, 1.0)


def render_labels(model: FaceModel, renderer, yaws_deg=YAWS) -> torch.Tensor:
    """The mean face's parsing labels, coloured: ``[V, H, W, 3]``."""
    n = len(yaws_deg)
    angles = torch.zeros(n, 3)
    angles[:, 1] = torch.tensor([math.radians(y) for y in yaws_deg])
    world = geometry.rigid_transform(model.mean_shape.expand(n, -1, -1), angles, torch.zeros(n, 3))
    out = renderer(world, model.tri, torch.zeros_like(world), model.region)
    return torch.from_numpy(LABEL_COLOURS)[out.region]


def preview_grid(model: FaceModel, n_samples: int = 4, scale: float = 1.0, size: int = 224,
                 seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``([V * size, C * size, 3] image, C column titles)``: mean, samples, labels."""
    from dfmvr.render import Renderer
    from dfmvr.render.camera import Camera

    renderer = Renderer(Camera.at_size(size), backend="torch")
    lay = model.layout()
    gen = torch.Generator().manual_seed(seed)
    columns, titles = [], []
    for i in range(n_samples + 1):
        if i == 0:
            c = [torch.zeros(1, k) for k in (lay.n_id, lay.n_exp, lay.n_tex)]
            titles.append("mean face")
        else:
            c = [scale * torch.randn(1, k, generator=gen) for k in (lay.n_id, lay.n_exp, lay.n_tex)]
            titles.append(f"sample {i}")
        with torch.no_grad():
            columns.append(render_face(model, renderer, *c))
    with torch.no_grad():
        columns.append(render_labels(model, renderer))
    titles.append("parsing labels")
    grid = torch.cat([torch.cat(list(col), dim=0) for col in columns], dim=1)
    return grid.numpy(), titles


def save_preview(path: str | Path, model: FaceModel, n_samples: int = 4, scale: float = 1.0,
                 size: int = 224, seed: int = 0) -> Path:
    """Write the preview grid as a PNG with column and row titles; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, titles = preview_grid(model, n_samples, scale, size, seed)
    h, w = image.shape[:2]
    dpi = 100
    left, top = 0.7, 0.6  # inches for the row and column titles
    fig = plt.figure(figsize=(w / dpi + left, h / dpi + top), dpi=dpi)
    ax = fig.add_axes([left / (w / dpi + left), 0.0, (w / dpi) / (w / dpi + left), (h / dpi) / (h / dpi + top)])
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([size * (i + 0.5) for i in range(len(titles))], titles)
    ax.xaxis.set_ticks_position("top")
    ax.set_yticks([size * (i + 0.5) for i in range(len(YAWS))], [f"yaw {y:+.0f}" for y in YAWS])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(f"{model.name}: {model.n_vertices} vertices; samples ~ N(0, {scale:g}^2)", y=0.995, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/faces.png", help="PNG to write")
    parser.add_argument("--source", choices=("procedural", "bfm"), default="procedural")
    parser.add_argument("--bfm-path", default="", help="BFM_model_front.mat when --source bfm")
    parser.add_argument("--n-vertices", type=int, default=35709)
    parser.add_argument("--seed", type=int, default=0, help="procedural model's seed")
    parser.add_argument("--samples", type=int, default=4, help="random faces beside the mean")
    parser.add_argument("--scale", type=float, default=1.0, help="std of the random coefficients")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from dfmvr.config import FaceModelConfig
    from dfmvr.facemodel import build_face_model

    cfg = FaceModelConfig(source=args.source, bfm_path=args.bfm_path, n_vertices=args.n_vertices, seed=args.seed)
    model = build_face_model(cfg)
    path = save_preview(args.out, model, args.samples, args.scale, args.size)
    _logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
