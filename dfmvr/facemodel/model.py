"""The morphable face model container and the BFM09 "front" loader.

Every source (BFM, procedural) produces one :class:`FaceModel` with the same fields, units
and conventions, so the rest of dfmvr is face-model agnostic:

- units: decimetres (1 unit = 100 mm), mean shape re-centred at the origin;
- model frame: x to the subject's left (image right when facing the camera), y up, z out of
  the face towards the camera;
- bases laid out as in BFM: ``[3N, K]`` with x, y, z interleaved per vertex;
- albedo in [0, 1] (BFM's 0..255 is divided by 255 at load);
- all indices 0-based (BFM's files are 1-based and converted at load).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from dfmvr.facemodel.layout import CoeffLayout

_logger = logging.getLogger(__name__)

# Face-parsing classes (docs/design.md "Face-parsing classes"); left/right are the subject's own.
PARSE_CLASSES = (
    "background", "skin", "left_brow", "right_brow", "left_eye", "right_eye",
    "nose", "mouth", "upper_lip", "lower_lip",
)
N_PARSE_CLASSES = len(PARSE_CLASSES)

MM_PER_UNIT = 100.0
"""Face-model units are decimetres."""


@dataclass(slots=True)
class FaceModel:
    """A linear 3D morphable model (shapes in the Args use ``N`` vertices, ``F`` faces).

    Args:
        mean_shape: ``[N, 3]`` mean shape, decimetres, centred at the origin.
        id_base: ``[3N, n_id]`` identity basis.
        exp_base: ``[3N, n_exp]`` expression basis.
        mean_tex: ``[3N]`` mean albedo in [0, 1].
        tex_base: ``[3N, n_tex]`` albedo basis (same scale as ``mean_tex``).
        tri: ``[F, 3]`` triangle vertex indices, counter-clockwise seen from outside.
        point_buf: ``[N, 8]`` faces adjacent to each vertex, padded with ``F``.
        keypoints: ``[68]`` vertex index of each iBUG-68 landmark.
        skinmask: ``[N]`` bool, vertices on skin (used by the albedo regulariser).
        region: ``[N]`` parsing class (0..9) of each vertex.
        lm3d_index: ``[K]`` vertices of the sparse 3D-landmark set.
        name: where the model came from, for messages and checkpoints.
    """

    mean_shape: torch.Tensor
    id_base: torch.Tensor
    exp_base: torch.Tensor
    mean_tex: torch.Tensor
    tex_base: torch.Tensor
    tri: torch.Tensor
    point_buf: torch.Tensor
    keypoints: torch.Tensor
    skinmask: torch.Tensor
    region: torch.Tensor
    lm3d_index: torch.Tensor
    name: str = "face model"

    def __post_init__(self) -> None:
        n = self.mean_shape.shape[0]
        checks = {
            "mean_shape": (self.mean_shape, (n, 3)),
            "id_base": (self.id_base, (3 * n, None)),
            "exp_base": (self.exp_base, (3 * n, None)),
            "mean_tex": (self.mean_tex, (3 * n,)),
            "tex_base": (self.tex_base, (3 * n, None)),
            "tri": (self.tri, (None, 3)),
            "point_buf": (self.point_buf, (n, None)),
            "keypoints": (self.keypoints, (68,)),
            "skinmask": (self.skinmask, (n,)),
            "region": (self.region, (n,)),
            "lm3d_index": (self.lm3d_index, (None,)),
        }
        for key, (t, shape) in checks.items():
            ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
            if not ok:
                want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"{self.name}: {key} must have shape {want}; got {tuple(t.shape)}")
        for key in ("tri", "keypoints", "lm3d_index"):
            t = getattr(self, key)
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise ValueError(
                    f"{self.name}: {key} must index vertices 0..{n - 1}; got range "
                    f"{int(t.min())}..{int(t.max())}"
                )

    @property
    def n_vertices(self) -> int:
        return self.mean_shape.shape[0]

    @property
    def n_faces(self) -> int:
        return self.tri.shape[0]

    def layout(self, n_views: int = 3) -> CoeffLayout:
        """The coefficient layout this model needs for ``n_views`` views."""
        return CoeffLayout(
            n_id=self.id_base.shape[1], n_exp=self.exp_base.shape[1],
            n_tex=self.tex_base.shape[1], n_gamma=27, n_views=n_views,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FaceModel":
        """Copy with float tensors moved to ``device``/``dtype`` (index tensors keep their type)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
            moved[f.name] = v
        return replace(self, **moved)

    @property
    def device(self) -> torch.device:
        return self.mean_shape.device

    def signature(self) -> dict:
        """What a checkpoint records to refuse loading onto a different model."""
        lay = self.layout()
        return {"name": self.name, "n_vertices": self.n_vertices, "n_faces": self.n_faces,
                "n_id": lay.n_id, "n_exp": lay.n_exp, "n_tex": lay.n_tex}

    def interocular_mm(self) -> float:
        """Distance between the eye centres (means of iBUG 36-41 and 42-47) of the mean shape, in mm.

        That is the pupils' distance, about 63 mm in adults (the outer corners, 36 and 45, are
        about 90 mm apart).
        """
        p = self.mean_shape[self.keypoints]
        return float((p[36:42].mean(0) - p[42:48].mean(0)).norm()) * MM_PER_UNIT


def build_point_buf(tri: np.ndarray, n_vertices: int, width: int = 8) -> np.ndarray:
    """``[N, width]`` faces adjacent to each vertex, padded with ``F`` (BFM's convention, 0-based).

    Vertices with more than ``width`` faces keep the first ``width``; point_buf is kept for
    format compatibility, normals are computed from all faces (see ``geometry.vertex_normals``).
    """
    n_faces = tri.shape[0]
    buf = np.full((n_vertices, width), n_faces, dtype=np.int64)
    fill = np.zeros(n_vertices, dtype=np.int64)
    for f, (a, b, c) in enumerate(tri):
        for v in (a, b, c):
            if fill[v] < width:
                buf[v, fill[v]] = f
                fill[v] += 1
    return buf


# ----------------------------------------------------------------------------------------------
# BFM09 front model (Deep3DFaceRecon's BFM_model_front.mat)

_BFM_KEYS = {
    # key: (expected shape with N/F/None placeholders, description)
    "meanshape": ("[1, 3N]", "mean shape"),
    "meantex": ("[1, 3N]", "mean albedo, 0..255"),
    "idBase": ("[3N, 80]", "identity basis"),
    "exBase": ("[3N, 64]", "expression basis"),
    "texBase": ("[3N, 80]", "albedo basis"),
    "tri": ("[F, 3]", "1-based triangles"),
    "point_buf": ("[N, 8]", "1-based adjacent faces"),
    "keypoints": ("[68]", "1-based landmark vertices"),
}


def _bfm_error(path: Path, key: str, problem: str) -> ValueError:
    return ValueError(f"BFM file {path}: key {key!r}: {problem}")


def load_bfm(path: str | Path, lm3d_index: np.ndarray | None = None) -> FaceModel:
    """Load ``BFM_model_front.mat`` exactly as Deep3DFaceRecon writes it.

    Keys (``N = 35709``, ``F = 70789`` for the real file): ``meanshape [1,3N]``, ``meantex [1,3N]``,
    ``idBase [3N,80]``, ``exBase [3N,64]``, ``texBase [3N,80]``, ``tri [F,3]`` (1-based),
    ``point_buf [N,8]`` (1-based), ``keypoints [68]`` (1-based), ``skinmask [N]`` (optional).
    The mean shape is re-centred; albedo is divided by 255; indices become 0-based.

    Args:
        path: the .mat file; users bring it (BFM cannot be redistributed; dfmvr never downloads it).
        lm3d_index: optional ``[K]`` 0-based vertices of the sparse 3D-landmark set; defaults
            to the 68 keypoints.

    Raises:
        FileNotFoundError: the file does not exist (the message says where to get it).
        ValueError: a missing key, a wrong shape or 0-based indices; names the file and key.
    """
    from scipy.io import loadmat

    from dfmvr.facemodel.regions import regions_from_landmarks

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"BFM file {path}: not found. BFM cannot be redistributed: request BFM09 from the "
            "University of Basel and build BFM_model_front.mat with Deep3DFaceRecon's "
            "util/load_mats.py, or use facemodel.source=procedural"
        )
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types for a non-.mat file
        raise ValueError(f"BFM file {path}: not a readable MATLAB .mat file ({e})") from e

    for key, (shape, what) in _BFM_KEYS.items():
        if key not in mat:
            raise _bfm_error(path, key, f"missing ({what}, expected shape {shape})")

    mean = np.asarray(mat["meanshape"], dtype=np.float64).reshape(-1)
    if mean.size % 3:
        raise _bfm_error(path, "meanshape", f"expected [1, 3N] values, got {mean.size} (not a multiple of 3)")
    n = mean.size // 3
    tri = np.asarray(mat["tri"]).astype(np.int64)
    n_faces = tri.shape[0] if tri.ndim == 2 else -1
    expected = {
        "meantex": (1, 3 * n), "idBase": (3 * n, 80), "exBase": (3 * n, 64), "texBase": (3 * n, 80),
        "tri": (n_faces, 3), "point_buf": (n, 8),
    }
    for key, shape in expected.items():
        got = np.asarray(mat[key]).shape
        if got != shape:
            raise _bfm_error(path, key, f"expected shape {list(shape)} (N={n} vertices), got {list(got)}")
    keypoints = np.asarray(mat["keypoints"]).astype(np.int64).reshape(-1)
    if keypoints.shape != (68,):
        raise _bfm_error(path, "keypoints", f"expected 68 values, got {keypoints.shape[0]}")
    point_buf = np.asarray(mat["point_buf"]).astype(np.int64)

    # 1-based in the file: 0 never appears, and the largest index may equal the count.
    for key, arr, bound in (("tri", tri, n), ("keypoints", keypoints, n), ("point_buf", point_buf, n_faces + 1)):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 1:
            raise _bfm_error(path, key, f"expected 1-based indices (min 1), got min {lo}: is this file 0-based?")
        if hi > bound:
            raise _bfm_error(path, key, f"expected indices <= {bound}, got max {hi}")

    mean = mean.reshape(n, 3)
    mean = mean - mean.mean(axis=0, keepdims=True)
    skin = np.asarray(mat["skinmask"]).reshape(-1) if "skinmask" in mat else np.ones(n)
    if skin.shape != (n,):
        raise _bfm_error(path, "skinmask", f"expected {n} values, got {skin.shape[0]}")
    tri0 = tri - 1
    keypoints0 = keypoints - 1
    region = regions_from_landmarks(mean, keypoints0)
    f32 = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    i64 = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    _logger.info("loaded BFM %s: %d vertices, %d faces", path, n, n_faces)
    return FaceModel(
        mean_shape=f32(mean),
        id_base=f32(mat["idBase"]),
        exp_base=f32(mat["exBase"]),
        mean_tex=f32(np.asarray(mat["meantex"]).reshape(-1) / 255.0),
        tex_base=f32(np.asarray(mat["texBase"]) / 255.0),
        tri=i64(tri0),
        point_buf=i64(point_buf - 1),
        keypoints=i64(keypoints0),
        skinmask=torch.as_tensor(skin > 0),
        region=i64(region),
        lm3d_index=i64(keypoints0 if lm3d_index is None else lm3d_index),
        name=f"bfm:{path.name}",
    )
