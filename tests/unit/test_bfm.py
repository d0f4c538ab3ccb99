"""The BFM09 front loader, on a small synthetic .mat with BFM's keys and 1-based indices."""

import numpy as np
import pytest
import torch
from scipy.io import savemat

from dfmvr.facemodel import build_face_model, load_bfm
from dfmvr.config import FaceModelConfig
from dfmvr.facemodel.model import build_point_buf


def _grid(n=12):
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64)
    verts = np.stack([xs.ravel() / n - 0.5, 0.5 - ys.ravel() / n, 0.1 * np.ones(n * n)], 1)
    tri = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
            tri += [(a, c, b), (b, c, d)]
    return verts, np.array(tri)


def _write_mat(path, **overrides):
    rng = np.random.default_rng(0)
    verts, tri = _grid()
    n = len(verts)
    mat = {
        "meanshape": (verts + 2.0).reshape(1, -1),  # off-centre on purpose: the loader re-centres
        "meantex": rng.uniform(50, 200, (1, 3 * n)),
        "idBase": rng.normal(size=(3 * n, 80)) * 1e-3,
        "exBase": rng.normal(size=(3 * n, 64)) * 1e-3,
        "texBase": rng.normal(size=(3 * n, 80)),
        "tri": tri + 1,
        "point_buf": build_point_buf(tri, n) + 1,
        "keypoints": rng.choice(n, 68, replace=False) + 1,
        "skinmask": np.ones((1, n)),
    }
    mat.update(overrides)
    mat = {k: v for k, v in mat.items() if v is not None}
    savemat(path, mat)
    return verts, tri, mat


def test_loads_bfm_format_with_1_based_indices(tmp_path):
    path = tmp_path / "BFM_model_front.mat"
    verts, tri, mat = _write_mat(path)
    model = load_bfm(path)
    assert model.n_vertices == len(verts) and model.n_faces == len(tri)
    assert torch.equal(model.tri, torch.as_tensor(tri))
    assert torch.equal(model.keypoints, torch.as_tensor(mat["keypoints"] - 1))
    # point_buf padding F+1 (1-based) becomes F (0-based)
    assert int(model.point_buf.max()) == len(tri)
    assert model.mean_shape.mean(0).abs().max() < 1e-5
    np.testing.assert_allclose(model.mean_tex.numpy(), mat["meantex"].ravel() / 255.0, rtol=1e-6)
    assert model.layout().size == 269
    assert model.region.min() >= 1 and model.region.max() <= 9
    # the config entry point takes the same path
    again = build_face_model(FaceModelConfig(source="bfm", bfm_path=str(path)))
    assert torch.equal(again.mean_shape, model.mean_shape)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_bfm(tmp_path / "nope.mat")
    assert "nope.mat" in str(e.value) and "procedural" in str(e.value)


@pytest.mark.parametrize(
    "override,key,expect",
    [
        ({"exBase": None}, "exBase", "missing"),
        ({"idBase": np.zeros((10, 80))}, "idBase", "expected shape"),
        ({"keypoints": np.arange(68)}, "keypoints", "1-based"),
        ({"tri": _grid()[1]}, "tri", "1-based"),
        ({"point_buf": np.ones((144, 8), dtype=np.int64) * 9999}, "point_buf", "<="),
    ],
)
def test_malformed_file_names_file_and_key(tmp_path, override, key, expect):
    path = tmp_path / "bad.mat"
    _write_mat(path, **override)
    with pytest.raises(ValueError) as e:
        load_bfm(path)
    msg = str(e.value)
    assert "bad.mat" in msg and repr(key) in msg and expect in msg


def test_not_a_mat_file(tmp_path):
    path = tmp_path / "garbage.mat"
    path.write_bytes(b"this is not matlab")
    with pytest.raises(ValueError, match="garbage.mat"):
        load_bfm(path)
