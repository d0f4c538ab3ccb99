"""The pinhole camera every dfmvr module shares (docs/design.md "Camera").

Perspective, focal 1015 px and principal point 112 px at 224 x 224 (both scale with the image
size), camera at ``z = distance`` (10 decimetres) on the world +z axis looking down -z, y up in
the world. Image coordinates are continuous pixels: x right, y down, pixel ``(row i, col j)``
covers ``[j, j+1) x [i, i+1)`` and its centre is ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Camera:
    """Args:
        image_size: square image side ``S`` in pixels.
        focal: focal length in pixels at this size.
        center: principal point (both axes) in pixels at this size.
        distance: camera position on world +z, decimetres.
        znear, zfar: clipping range, as distances from the camera.

    The design's numbers are :meth:`at_size`'s defaults (focal length and principal point at 224 px).
    """

    image_size: int
    focal: float
    center: float
    distance: float
    znear: float
    zfar: float

    @classmethod
    def at_size(cls, image_size: int, *, focal_224: float = 1015.0, distance: float = 10.0,
                znear: float = 5.0, zfar: float = 15.0) -> "Camera":
        """The camera of docs/design.md ("Camera") scaled to ``image_size``."""
        scale = image_size / 224.0
        return cls(image_size=image_size, focal=focal_224 * scale, center=112.0 * scale,
                   distance=distance, znear=znear, zfar=zfar)

    @classmethod
    def from_config(cls, cfg) -> "Camera":
        """From a :class:`dfmvr.config.RenderConfig`."""
        return cls.at_size(cfg.image_size, focal_224=cfg.focal_224, distance=cfg.camera_distance,
                           znear=cfg.znear, zfar=cfg.zfar)

    def depth(self, points: torch.Tensor) -> torch.Tensor:
        """Distance along the viewing axis of world points ``[..., 3]``: ``[...]``."""
        return self.distance - points[..., 2]

    def project(self, points: torch.Tensor) -> torch.Tensor:
        """World points ``[..., 3]`` to pixel coordinates ``[..., 2]`` (x right, y down)."""
        z = self.depth(points).clamp_min(1e-6)
        u = self.center + self.focal * points[..., 0] / z
        v = self.center - self.focal * points[..., 1] / z
        return torch.stack([u, v], dim=-1)

    def to_screen(self, points: torch.Tensor) -> torch.Tensor:
        """``[..., 3]`` -> ``[..., 3]``: pixel x, pixel y, depth (what a rasteriser consumes)."""
        return torch.cat([self.project(points), self.depth(points).unsqueeze(-1)], dim=-1)
