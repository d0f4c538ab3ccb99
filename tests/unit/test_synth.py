"""Synthetic triplets: determinism across worker counts, subject splits, resumption, and that
masks, landmarks and ground-truth meshes agree with the rendered images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dfmvr.data.shards import read_manifest
from dfmvr.facemodel.geometry import compute_shape, rigid_transform
from dfmvr.render.camera import Camera
from dfmvr.data.progress import PROGRESS_NAME
from dfmvr.data.synth import generate, iter_shard_samples, write_preview

SIZE = 64
N_VERTICES = 1500
SETTINGS = dict(n_subjects=4, n_captures=2, size=SIZE, seed=3, n_vertices=N_VERTICES, max_count=2)


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_a")
    summary = generate(str(root), workers=1, **SETTINGS)
    return root, summary


@pytest.fixture(scope="module")
def samples(dataset):
    root, _ = dataset
    manifest = read_manifest(str(root))
    out = []
    for split in manifest.splits:
        for url in manifest.shard_urls(split):
            out.extend((split, s) for s in iter_shard_samples(url))
    return out


@pytest.fixture(scope="module")
def face_model():
    from dfmvr.facemodel.procedural import make_procedural_model

    return make_procedural_model(n_vertices=N_VERTICES, seed=0)


def test_same_seed_same_bytes_for_any_worker_count(dataset, tmp_path):
    root, summary = dataset
    assert summary.n_samples == 8 and len(summary.generated) == 4 and not summary.kept
    other = tmp_path / "synth_b"
    generate(str(other), workers=2, **SETTINGS)
    assert _digests(other) == _digests(root)
    assert len(_digests(root)) == 8  # four shards, each with its evaluation companion (the meshes)


def test_different_seed_differs(dataset, tmp_path):
    root, _ = dataset
    settings = dict(SETTINGS, seed=4, n_subjects=1, n_captures=1, splits=(1.0, 0.0, 0.0))
    generate(str(tmp_path), workers=1, **settings)
    assert set(_digests(tmp_path)) == {"train-000000.tar", "train-000000.eval.tar"}
    for name, digest in _digests(tmp_path).items():
        assert digest != _digests(root).get(name)


def test_splits_are_disjoint_by_subject(dataset, samples):
    root, summary = dataset
    manifest = read_manifest(str(root))
    subjects = {split: set(entry.subjects) for split, entry in manifest.splits.items()}
    assert set(subjects) == {"train", "val", "test"}
    names = list(subjects)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not subjects[a] & subjects[b]
    # every subject has all its captures, in its own split only; capture 0 is neutral
    seen: dict[str, set] = {}
    for split, s in samples:
        assert s.subject in subjects[split]
        seen.setdefault(s.subject, set()).add(s.capture)
        assert s.meta["source"] == "synthetic" and s.meta["yaw_deg"] == [-45.0, 0.0, 45.0]
        assert s.meta["expression"] == ("neutral" if s.capture == "e00" else "random")
    assert len(seen) == 4 and all(len(c) == 2 for c in seen.values())


def test_resume_regenerates_only_the_missing_shard(dataset):
    root, _ = dataset
    before = _digests(root)
    shards = sorted(n for n in before if not n.endswith(".eval.tar"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in root.glob("*.tar")}
    victim = shards[1]
    (root / victim).unlink()
    summary = generate(str(root), workers=1, **SETTINGS)
    assert summary.generated == [victim]
    assert sorted(summary.kept) == sorted(set(shards) - {victim})
    assert _digests(root) == before  # remade byte for byte
    for name, mtime in mtimes.items():
        if name not in (victim, victim.replace(".tar", ".eval.tar")):
            assert (root / name).stat().st_mtime_ns == mtime
    # a shard whose bytes changed is not trusted either, nor one whose evaluation companion did
    for tampered in (shards[0], shards[2].replace(".tar", ".eval.tar")):
        data = bytearray((root / tampered).read_bytes())
        data[-1] ^= 0xFF
        (root / tampered).write_bytes(bytes(data))
        summary = generate(str(root), workers=1, **SETTINGS)
        assert summary.generated == [tampered.replace(".eval.tar", ".tar")]
        assert _digests(root) == before
    progress = json.loads((root / PROGRESS_NAME).read_text())
    assert sorted(progress["shards"]) == shards
    # a shard recorded as made by another face model (the model's code changed) is made again
    other = shards[3]
    progress["shards"][other]["extra"]["model"] = "0" * 16
    (root / PROGRESS_NAME).write_text(json.dumps(progress))
    summary = generate(str(root), workers=1, **SETTINGS)
    assert summary.generated == [other]
    assert _digests(root) == before


def test_landmarks_sit_on_the_face_and_features(samples):
    for _, s in samples:
        for i, view in enumerate(("left", "front", "right")):
            mask = s.masks[view]
            face = mask > 0
            px = np.floor(s.lmk2d[i]).astype(int)
            # the crop is tight (as Deep3DFaceRecon's): a big face's chin may leave the frame
            # (about 2% of samples), the inner face never does
            assert ((px[17:] >= 0) & (px[17:] < SIZE)).all(), s.key
            inside = ((px >= 0) & (px < SIZE)).all(axis=1)
            assert inside.mean() > 0.9, s.key
            px = np.clip(px, 0, SIZE - 1)
            # every landmark is on the face or, at a side view's silhouette (nose tip, far eye,
            # jaw), within a pixel and a half of it
            dist = cv2.distanceTransform((~face).astype(np.uint8), cv2.DIST_L2, 5)
            assert dist[px[:, 1], px[:, 0]].max() <= 1.5, (s.key, view)
            assert face[px[:, 1], px[:, 0]].mean() >= 0.85, (s.key, view)
            if view == "front":  # all inner-face landmarks (17..67) are inside; the jaw is the outline
                assert face[px[17:, 1], px[17:, 0]].all(), s.key

            def classes_near(points, r=1):
                found = set()
                for x, y in np.floor(points).astype(int):
                    found |= set(np.unique(mask[max(y - r, 0):y + r + 1, max(x - r, 0):x + r + 1]).tolist())
                return found

            assert 6 in classes_near(s.lmk2d[i, 30:31]), (s.key, view)  # nose tip on the nose
            assert 7 in classes_near(s.lmk2d[i, 60:68]) or 8 in classes_near(s.lmk2d[i, 48:60])  # mouth
        # in the frontal view the eye landmarks sit on the matching eye class (subject's own sides)
        front = s.masks["front"]
        right_eye = np.floor(s.lmk2d[1, 36:42].mean(0)).astype(int)
        left_eye = np.floor(s.lmk2d[1, 42:48].mean(0)).astype(int)
        assert 5 in front[right_eye[1] - 1:right_eye[1] + 2, right_eye[0] - 1:right_eye[0] + 2]
        assert 4 in front[left_eye[1] - 1:left_eye[1] + 2, left_eye[0] - 1:left_eye[0] + 2]


def test_gt_mesh_and_coefficients_reproduce_the_views(samples, face_model):
    cam = Camera.at_size(SIZE)
    layout = face_model.layout(3)
    for _, s in samples:
        assert s.gt["units"] == "dm" and s.coeffs.shape == (layout.size,)
        verts = torch.as_tensor(s.gt["vertices"])
        np.testing.assert_array_equal(s.gt["faces"], face_model.tri.numpy())
        c = layout.split(torch.as_tensor(s.coeffs)[None])
        np.testing.assert_allclose(compute_shape(face_model, c.id, c.exp)[0].numpy(), s.gt["vertices"], atol=1e-5)
        np.testing.assert_allclose(s.lmk3d, s.gt["vertices"][face_model.lm3d_index.numpy()])
        for i, view in enumerate(("left", "front", "right")):
            posed = rigid_transform(verts[None], c.angles[:, i], c.trans[:, i])
            uv = cam.project(posed)[0].numpy()
            np.testing.assert_allclose(uv[face_model.keypoints.numpy()], s.lmk2d[i], atol=1e-3)
            # the mesh covers the rendered face: its vertices land on face pixels (the mesh
            # border and the profile edge within a pixel and a half), and face pixels have a
            # vertex within a pixel or two
            px = np.clip(np.floor(uv).astype(int), 0, SIZE - 1)
            face = s.masks[view] > 0
            dist = cv2.distanceTransform((~face).astype(np.uint8), cv2.DIST_L2, 5)
            d = dist[px[:, 1], px[:, 0]]
            assert np.quantile(d, 0.995) <= 1.5 and d.max() <= 3.0, (s.key, view)  # slivers at the edge
            assert face[px[:, 1], px[:, 0]].mean() > 0.85, (s.key, view)
            hit = np.zeros_like(face)
            hit[px[:, 1], px[:, 0]] = True
            near = cv2.dilate(hit.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
            assert near[face].mean() > 0.97, (s.key, view)


def test_images_are_lit_and_composited(samples):
    for _, s in samples:
        for view in ("left", "front", "right"):
            img, face = s.images[view].astype(float), s.masks[view] > 0
            skin = img[face].mean(axis=0)
            assert 20 < skin.mean() < 235, (s.key, view, skin)  # neither black nor blown out
            assert 0.15 < face.mean() < 0.8  # the face fills a plausible part of the frame


def test_preview_png(dataset, tmp_path):
    import cv2

    root, _ = dataset
    path = write_preview(str(root), str(tmp_path / "p.png"), count=2, scale=2)
    img = cv2.imread(path)
    assert img.shape == (2 * SIZE * 2, 6 * SIZE * 2, 3)
