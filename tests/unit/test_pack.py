"""The real-capture packer on a synthetic render saved as a "real" capture folder: crop and
alignment keep masks and landmarks on their images; bad folders are refused by name and the
rest is packed; Pixel-Face and Bosphorus specifics."""

from __future__ import annotations

import dataclasses

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from dfmvr.config import FaceModelConfig
from dfmvr.data.shards import read_manifest
from dfmvr.render import Renderer
from dfmvr.render.camera import Camera
from dfmvr.data.align import AlignmentTemplate, five_points, transform_points
from sharding.layouts import VIEWS, read_bnt, read_landmarks
from sharding.captures import delaunay_mesh
from sharding.pack import PackConfig, main, pack
from dfmvr.data.synth import SynthConfig, iter_shard_samples, render_views, sample_params

CANVAS = 160
SIZE = 64
N_VERTICES = 1500
FACEMODEL = FaceModelConfig(n_vertices=N_VERTICES)


@pytest.fixture(scope="module")
def face_model():
    from dfmvr.facemodel import build_face_model

    return build_face_model(FACEMODEL)


@pytest.fixture(scope="module")
def capture(face_model):
    """A triplet rendered off-centre, smaller, and rolled inside a larger canvas."""
    cfg = SynthConfig(out="unused", size=CANVAS, seed=11, n_vertices=N_VERTICES)
    p = sample_params(face_model, cfg, subject=0, capture=1)
    p.angles[:, 2] += np.deg2rad([12.0, -8.0, 15.0])  # roll
    p.trans[:] = [[0.35, -0.25, -2.5], [-0.3, 0.2, -2.0], [0.25, 0.3, -3.0]]  # offset and farther (smaller)
    r = render_views(face_model, Renderer(Camera.at_size(CANVAS), backend="torch"), p)
    return r


def _write_pts(path: Path, pts: np.ndarray) -> None:
    body = "\n".join(f"{x:.4f} {y:.4f}" for x, y in pts)
    path.write_text(f"version: 1\nn_points: {len(pts)}\n{{\n{body}\n}}\n")


def _write_capture(folder: Path, r, *, masks: bool = True, lm3d: np.ndarray | None = None,
                   scan: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    folder.mkdir(parents=True)
    for i, v in enumerate(VIEWS):
        ext = "jpg" if v == "front" else "png"
        params = [cv2.IMWRITE_JPEG_QUALITY, 98] if ext == "jpg" else []
        cv2.imwrite(str(folder / f"{v}.{ext}"), r.images[i][..., ::-1], params)
        if masks:
            cv2.imwrite(str(folder / f"{v}.mask.png"), r.masks[i])
    _write_pts(folder / "left.pts", r.lmk2d[0])
    np.savetxt(folder / "front.txt", r.lmk2d[1], fmt="%.4f")
    np.save(folder / "right.npy", r.lmk2d[2])
    if lm3d is not None:
        np.savetxt(folder / "lmk3d.txt", lm3d, fmt="%.5f")
    if scan is not None:
        verts, faces = scan
        lines = [f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in verts]
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
        (folder / "scan.obj").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def packed(tmp_path_factory, capture, face_model):
    root = tmp_path_factory.mktemp("real")
    shape_mm = capture.shape * 100.0
    lm3d_mm = shape_mm[face_model.keypoints.numpy()]
    _write_capture(root / "alice" / "take1", capture, lm3d=lm3d_mm, scan=(shape_mm, face_model.tri.numpy()))
    _write_capture(root / "bob" / "take1", capture, masks=False)
    # bad: a missing view
    _write_capture(root / "carol" / "take1", capture)
    (root / "carol" / "take1" / "right.png").unlink()
    # bad: 67 landmarks in a .txt
    _write_capture(root / "dave" / "take1", capture)
    np.savetxt(root / "dave" / "take1" / "front.txt", capture.lmk2d[1][:67])
    # bad: NaN in a .npy
    _write_capture(root / "erin" / "take1", capture)
    bad = capture.lmk2d[2].copy()
    bad[5, 0] = np.nan
    np.save(root / "erin" / "take1" / "right.npy", bad)
    # bad: unparsable .pts
    _write_capture(root / "frank" / "take1", capture)
    (root / "frank" / "take1" / "left.pts").write_text("version: 1\nn_points: 68\n{\n1 2\nx y\n}\n")
    out = tmp_path_factory.mktemp("shards")
    cfg = PackConfig(input=str(root), out=str(out), size=SIZE, facemodel=FACEMODEL, max_count=10)
    summary = pack(cfg)
    manifest = read_manifest(str(out))
    samples = {s.subject: s for split in manifest.splits for url in manifest.shard_urls(split)
               for s in iter_shard_samples(url)}
    return root, summary, samples, cfg


def test_bad_folders_are_named_and_the_rest_packed(packed):
    root, summary, samples, _ = packed
    assert summary.packed == 2 and set(samples) == {"alice", "bob"}
    reasons = {Path(folder).parent.name: reason for folder, reason in summary.skipped}
    assert set(reasons) == {"carol", "dave", "erin", "frank"}
    assert "missing view 'right'" in reasons["carol"] and str(root / "carol" / "take1") in reasons["carol"]
    assert str(root / "dave" / "take1" / "front.txt") in reasons["dave"] and "67" in reasons["dave"]
    assert str(root / "erin" / "take1" / "right.npy") in reasons["erin"] and "NaN" in reasons["erin"]
    assert str(root / "frank" / "take1" / "left.pts") in reasons["frank"]
    lines = "\n".join(summary.lines())
    assert "1 captures packed without masks: run the parse-net job to fill them in" in lines
    assert "skipped 4 captures" in lines


def test_masks_and_landmarks_follow_the_alignment(packed, capture, face_model):
    _, _, samples, cfg = packed
    s = samples["alice"]
    tpl = AlignmentTemplate.from_face_model(face_model, cfg.yaw_deg, SIZE)
    zeros = sample_params(face_model, SynthConfig(out="unused", size=SIZE), subject=0, capture=0)
    for name in ("id", "exp", "tex", "gamma", "trans"):
        getattr(zeros, name)[:] = 0.0
    zeros.angles[:] = [[0.0, math.radians(y), 0.0] for y in cfg.yaw_deg]
    mean_face = render_views(face_model, Renderer(Camera.at_size(SIZE), backend="torch"), zeros)
    assert s.meta["has_masks"] and s.image_size == SIZE
    for i, v in enumerate(VIEWS):
        m = np.asarray(s.meta["align"]["matrices"][v])
        # landmarks: exactly the warp of the input landmarks; five points close to the template
        np.testing.assert_allclose(s.lmk2d[i], transform_points(m, capture.lmk2d[i]), atol=1e-3)
        assert np.abs(five_points(s.lmk2d[i]) - tpl.points(cfg.yaw_deg[i])).max() < 0.06 * SIZE
        # the face mask's centroid is the warped centroid of the input face
        face_in = np.argwhere(capture.masks[i] > 0)[:, ::-1] + 0.5
        face_out = np.argwhere(s.masks[v] > 0)[:, ::-1] + 0.5
        np.testing.assert_allclose(face_out.mean(0), transform_points(m, face_in.mean(0)), atol=1.0)
        # ... and near where the template's own face (the mean face at this yaw) has its centroid
        template_face = np.argwhere(mean_face.masks[i] > 0)[:, ::-1] + 0.5
        assert np.linalg.norm(face_out.mean(0) - template_face.mean(0)) < 0.06 * SIZE, v
        # feature classes under their landmarks
        mask = s.masks[v]

        def near(points, r=1):
            found = set()
            for x, y in np.floor(points).astype(int):
                found |= set(np.unique(mask[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1]).tolist())
            return found

        assert 6 in near(s.lmk2d[i, 30:31]), v
        inner = np.floor(s.lmk2d[i, 17:]).astype(int)
        assert (mask[inner[:, 1], inner[:, 0]] > 0).mean() > 0.95
        # image and mask agree: the face pixels look like the render, the background like the background
        scale = math.sqrt(abs(np.linalg.det(m[:, :2])))
        assert 0.2 < scale < 1.0
    front = s.masks["front"]
    for idx, cls in ((slice(36, 42), 5), (slice(42, 48), 4)):
        x, y = np.floor(s.lmk2d[1, idx].mean(0)).astype(int)
        assert cls in front[y - 1:y + 2, x - 1:x + 2]


def test_aligned_image_is_the_input_under_the_same_warp(packed, tmp_path_factory):
    root, _, samples, _ = packed
    s = samples["alice"]
    for v in VIEWS:
        src = cv2.imread(str(next((root / "alice" / "take1").glob(f"{v}.[pj]*g"))))[..., ::-1]
        m = np.vstack([np.asarray(s.meta["align"]["matrices"][v]), [0, 0, 1]])
        inv = np.linalg.inv(m)[:2]
        ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
        sx, sy = (transform_points(inv, np.stack([xs, ys], -1)) - 0.5).transpose(2, 0, 1)
        expected = cv2.remap(src, sx.astype(np.float32), sy.astype(np.float32), cv2.INTER_LINEAR)
        face = s.masks[v] > 0
        diff = np.abs(expected.astype(int) - s.images[v]).mean(-1)
        # the packer low-pass filters when it shrinks, so compare on the face, loosely
        assert np.median(diff[face]) < 2 and diff[face].mean() < 4, v
        # and a crop shifted by two pixels is clearly worse: the test can tell misalignment
        shifted = np.abs(np.roll(expected, 2, axis=1).astype(int) - s.images[v]).mean(-1)
        assert shifted[face].mean() > 2 * diff[face].mean() + 2, v


def test_maskless_capture_and_3d_truth(packed, capture):
    _, _, samples, _ = packed
    bob, alice = samples["bob"], samples["alice"]
    assert bob.masks is None and bob.meta["has_masks"] is False and bob.gt is None and bob.lmk3d is None
    np.testing.assert_allclose(bob.lmk2d, alice.lmk2d, atol=1e-3)  # same input, same landmarks
    # 3D landmarks and the scan came in mm and are stored in decimetres
    assert alice.gt["units"] == "dm"
    np.testing.assert_allclose(alice.gt["vertices"], capture.shape, atol=1e-4)
    assert alice.lmk3d.shape == (68, 3)


def test_cli_exit_codes(tmp_path, capture):
    good = tmp_path / "in"
    _write_capture(good / "ann" / "c1", capture, masks=False)
    assert main(["--input", str(good), "--out", str(tmp_path / "o1"), "--size", "32", "--n-vertices",
                 str(N_VERTICES), "--no-progress"]) == 0
    bad = tmp_path / "bad"
    _write_capture(bad / "ann" / "c1", capture)
    (bad / "ann" / "c1" / "left.png").unlink()
    assert main(["--input", str(bad), "--out", str(tmp_path / "o2"), "--size", "32", "--n-vertices",
                 str(N_VERTICES), "--no-progress"]) == 1


def test_pixelface_layout_transposes_and_drops_lm3d(tmp_path, capture, packed):
    _, _, samples, _ = packed
    root = tmp_path / "pf"
    images = root / "train" / "p001" / "03" / "Images"
    for i, d in enumerate(("0", "1", "2")):
        (images / d).mkdir(parents=True)
        cv2.imwrite(str(images / d / "t.png"), np.ascontiguousarray(capture.images[i].transpose(1, 0, 2)[..., ::-1]))
        np.save(images / d / "t.npy", capture.lmk2d[i][:, ::-1])  # landmarks in the stored (transposed) frame
        cv2.imwrite(str(images / d / "t.mask.png"), np.ascontiguousarray(capture.masks[i].T))
    (images / "fusion").mkdir()
    np.savetxt(images / "fusion" / "nicp_106_pts.txt", np.arange(106 * 3, dtype=float).reshape(106, 3))
    out = tmp_path / "out"
    summary = pack(PackConfig(input=str(root), out=str(out), layout="pixelface", size=SIZE, facemodel=FACEMODEL,
                              layout_options={"lm3d_drop": (0, 1, 2, 3, 4)}))
    assert summary.packed == 1 and summary.per_split == {"train": 1}
    (s,) = [s for url in read_manifest(str(out)).shard_urls("train") for s in iter_shard_samples(url)]
    ref = samples["alice"]
    np.testing.assert_allclose(s.lmk2d, ref.lmk2d, atol=1e-3)
    for v in VIEWS:
        assert (s.masks[v] != ref.masks[v]).mean() < 0.002
    assert s.lmk3d.shape == (101, 3)
    np.testing.assert_allclose(s.lmk3d[0], np.array([15.0, 16.0, 17.0]) / 100.0, rtol=1e-6)


def test_landmark_readers(tmp_path):
    pts = np.random.default_rng(0).uniform(0, 100, (68, 2))
    _write_pts(tmp_path / "a.pts", pts)
    np.savetxt(tmp_path / "a.txt", pts, delimiter=",")
    for name in ("a.pts", "a.txt"):
        np.testing.assert_allclose(read_landmarks(tmp_path / name), pts, atol=1e-4)
    (tmp_path / "b.pts").write_text("version: 1\nn_points: 68\n{\n" + "1 2\n" * 60 + "}\n")
    with pytest.raises(ValueError, match="n_points 68"):
        read_landmarks(tmp_path / "b.pts")
    np.save(tmp_path / "c.npy", np.zeros((68, 3)))
    with pytest.raises(ValueError, match=r"c\.npy.*shape \[68, 3\]"):
        read_landmarks(tmp_path / "c.npy")


def test_bosphorus_bnt_and_delaunay(tmp_path):
    # a 20 x 30 range grid of a bump, with a background border at zmin
    rows, cols = 20, 30
    ys, xs = np.mgrid[0:rows, 0:cols].astype(float)
    z = 50.0 - 0.05 * ((xs - 15) ** 2 + (ys - 10) ** 2)
    zmin = -1e9
    z[0, :] = zmin
    data = np.stack([xs.ravel(), -ys.ravel(), z.ravel(), xs.ravel() / cols, ys.ravel() / rows])  # 5 columns
    name = b"bs000_N_N_0.png"
    blob = (np.array([rows, cols], "<u2").tobytes() + np.array([zmin], "<f8").tobytes()
            + np.array([len(name)], "<u2").tobytes() + name + np.array([data.size], "<u4").tobytes()
            + data.astype("<f8").tobytes())
    (tmp_path / "s.bnt").write_bytes(blob)
    pts = read_bnt(tmp_path / "s.bnt")
    assert pts.shape == ((rows - 1) * cols, 3) and (pts[:, 2] > zmin).all()
    faces = delaunay_mesh(pts)
    # a full grid of (rows-1) x cols points triangulates into 2 triangles per cell
    assert len(faces) == 2 * (rows - 2) * (cols - 1)
    a, b, c = (pts[faces[:, k], :2] for k in range(3))
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    assert (cross > 0).all()  # counter-clockwise seen from +z
    (tmp_path / "t.bnt").write_bytes(blob[:40])
    with pytest.raises(ValueError, match=r"t\.bnt"):
        read_bnt(tmp_path / "t.bnt")


def test_yaw_warning_for_swapped_views(tmp_path, capture, caplog):
    # the right view's image and landmarks saved as the left view and vice versa
    swapped = type(capture)(images=capture.images[::-1].copy(), masks=capture.masks[::-1].copy(),
                            coverage=capture.coverage[::-1].copy(), lmk2d=capture.lmk2d[::-1].copy(),
                            shape=capture.shape)
    root = tmp_path / "in"
    _write_capture(root / "s" / "c", swapped, masks=False)
    with caplog.at_level("WARNING"):
        summary = pack(PackConfig(input=str(root), out=str(tmp_path / "o"), size=SIZE, facemodel=FACEMODEL))
    assert summary.packed == 1
    assert "look like yaw +45 deg, not -45 deg (left view)" in caplog.text
    assert "look like yaw -45 deg, not +45 deg (right view)" in caplog.text


def test_multipie_and_bosphorus_discovery(tmp_path):
    from sharding.layouts import discover

    mp = tmp_path / "mp"
    for cam, code in (("08_0", "080"), ("05_1", "051"), ("19_0", "190")):
        d = mp / "session01" / "multiview" / "001" / "02" / cam
        d.mkdir(parents=True)
        for illum in ("00", "07"):
            if cam == "19_0" and illum == "00":
                continue  # one illumination lacks the right camera
            (d / f"001_01_02_{code}_{illum}.png").touch()
            (d / f"001_01_02_{code}_{illum}.pts").touch()
    found = {s.capture: s for s in discover("multipie", mp)}
    assert sorted(found) == ["01_02_00", "01_02_07"]
    full = found["01_02_07"]
    assert full.subject == "001" and full.views["left"].image.parent.name == "08_0"
    assert full.views["right"].image.name == "001_01_02_190_07.png" and full.views["right"].landmarks.suffix == ".pts"
    assert found["01_02_00"].views["right"].image is None and "19_0" in found["01_02_00"].views["right"].expected

    bs = tmp_path / "bs" / "bs001"
    bs.mkdir(parents=True)
    for stem in ("bs001_N_N_0", "bs001_YR_R45_0", "bs001_YR_L45_0", "bs001_E_HAPPY_0"):
        (bs / f"{stem}.png").touch()
        (bs / f"{stem}.txt").touch()
    (bs / "bs001_N_N_0.bnt").touch()
    (cap,) = discover("bosphorus", tmp_path / "bs")
    assert cap.capture == "N_N_0" and cap.scan.name == "bs001_N_N_0.bnt"
    assert cap.views["left"].image.name == "bs001_YR_R45_0.png" and cap.views["right"].image.name == "bs001_YR_L45_0.png"


def test_interrupted_packing_publishes_nothing_partial(tmp_path, capture, monkeypatch):
    """Ctrl-C after some captures: no shard holds part of the run and no manifest lists it."""
    import sharding.pack as pack_module

    root = tmp_path / "in"
    for name in ("ann", "ben", "cid"):
        _write_capture(root / name / "c1", capture, masks=False)
    real = pack_module._iter_loaded

    def interrupted(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(pack_module, "_iter_loaded", interrupted)
    out = tmp_path / "out"
    cfg = PackConfig(input=str(root), out=str(out), size=SIZE, facemodel=FACEMODEL, max_count=10)
    with pytest.raises(KeyboardInterrupt):
        pack(cfg)
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()


def test_an_interrupted_pack_resumes_keeping_what_it_published(tmp_path, capture, monkeypatch):
    """Interrupted after some shards were published, the same command again loads only the
    captures those shards do not hold, keeps the shards byte for byte, and the manifest lists
    every capture once; a pack with other settings starts over."""
    import hashlib

    import sharding.pack as pack_module

    root = tmp_path / "in"
    names = ("ann", "ben", "cid", "dan", "eve")
    for name in names:
        _write_capture(root / name / "c1", capture, masks=False)
    real = pack_module._iter_loaded
    loaded: list[str] = []

    def interrupted(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    def counted(sources, *args, **kwargs):
        loaded.extend(Path(s.folder).parent.name for s in sources)
        yield from real(sources, *args, **kwargs)

    out = tmp_path / "out"
    cfg = PackConfig(input=str(root), out=str(out), size=SIZE, facemodel=FACEMODEL, max_count=1, splits=(1.0, 0.0, 0.0))
    monkeypatch.setattr(pack_module, "_iter_loaded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pack(cfg)
    first = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.tar")
             if not p.name.endswith(".eval.tar")}
    assert first and not (out / "manifest.json").exists()
    progress = json.loads((out / "shard-progress.json").read_text())
    kept = {k.split("-")[0] for rec in progress["shards"].values() for k in rec["info"]["keys"]}
    assert len(kept) == len(first) < 3  # the shard open at the interruption was discarded

    monkeypatch.setattr(pack_module, "_iter_loaded", counted)
    summary = pack(cfg)
    assert sorted(loaded) == sorted(set(names) - kept)
    assert summary.packed == len(names)
    # every capture came without masks, those in the kept shards too
    assert summary.without_masks == len(names) and read_manifest(str(out)).extra["without_masks"] == len(names)
    for name, digest in first.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    manifest = read_manifest(str(out))
    keys = [sample.key for url in manifest.shard_urls("train") for sample in iter_shard_samples(url)]
    assert sorted(keys) == sorted(f"{n}-c1" for n in names)

    # other settings: everything again
    loaded.clear()
    pack(dataclasses.replace(cfg, image_format="jpg"))
    assert sorted(loaded) == sorted(names)


def test_verify_finds_a_changed_and_a_missing_shard(packed, tmp_path):
    import shutil

    from sharding.verify import main as verify_main

    _, _, _, cfg = packed
    copy = tmp_path / "copy"
    shutil.copytree(cfg.out, copy)
    # the manifest names shards by path relative to its root: the copy verifies clean
    assert verify_main([str(copy), "--json", str(tmp_path / "ok.json")]) == 0
    shards = sorted(copy.glob("*.tar"))
    data = bytearray(shards[0].read_bytes())
    data[600] ^= 0xFF
    shards[0].write_bytes(bytes(data))
    if len(shards) > 1:
        shards[1].unlink()
    assert verify_main([str(copy), "--json", str(tmp_path / "bad.json")]) == 1
    problems = {Path(p["url"]).name: p["problem"] for p in json.loads((tmp_path / "bad.json").read_text())["problems"]}
    assert "sha256" in problems[shards[0].name]
    if len(shards) > 1:
        assert "cannot be read" in problems[shards[1].name]
    assert verify_main([str(tmp_path / "nowhere")]) == 2


def test_a_second_packer_on_the_same_root_fails_fast(tmp_path, capture):
    from sharding.progress import LOCK_NAME, RootBusyError, root_lock

    root = tmp_path / "in"
    _write_capture(root / "ann" / "c1", capture, masks=False)
    out = tmp_path / "out"
    cfg = PackConfig(input=str(root), out=str(out), size=SIZE, facemodel=FACEMODEL, max_count=10)
    with root_lock(str(out), None):  # a packer at work on this root
        with pytest.raises(RootBusyError, match=r"another packer is writing this root.*pid"):
            pack(cfg)
        assert main(["--input", str(root), "--out", str(out), "--size", "32", "--n-vertices", str(N_VERTICES),
                     "--no-progress"]) == 2
        assert not list(out.glob("*.tar"))
    # released: packing works, and leaves no lock behind
    assert pack(cfg).packed == 1
    assert not (out / LOCK_NAME).exists()


def test_the_lock_is_a_conditional_put_on_s3(moto_s3):
    from sharding.progress import RootBusyError, root_lock

    out = moto_s3.url("packed")
    with root_lock(out, None):
        with pytest.raises(RootBusyError, match=r"s3://.*another packer"):
            with root_lock(out, None):
                pass
    with root_lock(out, None):  # released
        pass
