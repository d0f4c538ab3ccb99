"""Differentiable mesh rendering: camera, rasterisers (pure PyTorch and pytorch3d), renderer.

``Renderer(camera, backend="auto" | "torch" | "pytorch3d")`` renders batches of meshes sharing
one triangle list to colour images, coverage masks, per-pixel region labels and depth, with
gradients to vertex positions and colours. ``create_renderer(cfg.render)`` builds one from the
config.
"""

from __future__ import annotations

from dfmvr.render.camera import Camera
from dfmvr.render.renderer import BACKENDS, Rendered, Renderer, create_renderer, resolve_backend

__all__ = ["BACKENDS", "Camera", "Rendered", "Renderer", "create_renderer", "resolve_backend"]
