"""The 3DMM coefficient vector: named slices instead of magic numbers.

Layout (docs/design.md "Coefficient layout", Deep3DFaceRecon order), for ``V`` views::

    [ id (80) | exp (64) | tex (80) | gamma (27) | view 0: angles (3), trans (3) | view 1 ... ]

``gamma`` is 2nd-order SH lighting, 9 coefficients per RGB channel (R first); 0.8 is added to
each channel's DC term when shading. Angles are radians, ``R = Rz @ Ry @ Rx``; translations are
in face-model units (decimetres). With three views the vector has 269 numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Coeffs(NamedTuple):
    """A coefficient vector split into its parts.

    Shapes: ``id [B, 80]``, ``exp [B, 64]``, ``tex [B, 80]``, ``gamma [B, 27]``,
    ``angles [B, V, 3]`` (radians), ``trans [B, V, 3]`` (decimetres).
    """

    id: torch.Tensor
    exp: torch.Tensor
    tex: torch.Tensor
    gamma: torch.Tensor
    angles: torch.Tensor
    trans: torch.Tensor


@dataclass(frozen=True, slots=True)
class CoeffLayout:
    """Sizes of each part of the coefficient vector."""

    n_id: int = 80
    n_exp: int = 64
    n_tex: int = 80
    n_gamma: int = 27
    n_views: int = 3

    @property
    def n_shared(self) -> int:
        """Numbers shared by all views (identity, expression, texture, lighting)."""
        return self.n_id + self.n_exp + self.n_tex + self.n_gamma

    @property
    def size(self) -> int:
        """Total length: shared part plus 6 pose numbers per view (269 for 80/64/80/27 x 3)."""
        return self.n_shared + 6 * self.n_views

    @property
    def id(self) -> slice:
        return slice(0, self.n_id)

    @property
    def exp(self) -> slice:
        return slice(self.n_id, self.n_id + self.n_exp)

    @property
    def tex(self) -> slice:
        start = self.n_id + self.n_exp
        return slice(start, start + self.n_tex)

    @property
    def gamma(self) -> slice:
        start = self.n_id + self.n_exp + self.n_tex
        return slice(start, start + self.n_gamma)

    @property
    def pose(self) -> slice:
        return slice(self.n_shared, self.size)

    def describe(self) -> str:
        return (
            f"id {self.n_id} + exp {self.n_exp} + tex {self.n_tex} + gamma {self.n_gamma} "
            f"+ {self.n_views} views x (angles 3 + trans 3) = {self.size}"
        )

    def split(self, coeffs: torch.Tensor) -> Coeffs:
        """Split ``coeffs [B, size]`` into :class:`Coeffs`.

        Raises:
            ValueError: when the last dimension is not ``size``; the message gives the layout.
        """
        if coeffs.dim() != 2 or coeffs.shape[1] != self.size:
            raise ValueError(
                f"coefficients must have shape (B, {self.size}) for layout "
                f"[{self.describe()}]; got {tuple(coeffs.shape)}"
            )
        pose = coeffs[:, self.pose].reshape(coeffs.shape[0], self.n_views, 6)
        return Coeffs(
            id=coeffs[:, self.id],
            exp=coeffs[:, self.exp],
            tex=coeffs[:, self.tex],
            gamma=coeffs[:, self.gamma],
            angles=pose[..., :3],
            trans=pose[..., 3:],
        )

    def join(self, parts: Coeffs) -> torch.Tensor:
        """Inverse of :meth:`split`: ``[B, size]``."""
        b = parts.id.shape[0]
        expect = {
            "id": (b, self.n_id),
            "exp": (b, self.n_exp),
            "tex": (b, self.n_tex),
            "gamma": (b, self.n_gamma),
            "angles": (b, self.n_views, 3),
            "trans": (b, self.n_views, 3),
        }
        for name, shape in expect.items():
            got = tuple(getattr(parts, name).shape)
            if got != shape:
                raise ValueError(f"coefficient part {name!r}: expected shape {shape}, got {got}")
        pose = torch.cat([parts.angles, parts.trans], dim=-1).reshape(b, 6 * self.n_views)
        return torch.cat([parts.id, parts.exp, parts.tex, parts.gamma, pose], dim=1)

    def zeros(self, batch: int, **kw) -> Coeffs:
        """All-zero coefficients: the mean face, mean albedo, ambient light, frontal pose."""
        z = lambda *s: torch.zeros(batch, *s, **kw)  # noqa: E731
        return Coeffs(z(self.n_id), z(self.n_exp), z(self.n_tex), z(self.n_gamma),
                      z(self.n_views, 3), z(self.n_views, 3))
