"""The face-parsing packer and its shards, on synthetic renders written in the exact CelebAMask-HQ
and LaPa layouts (never the real, licensed datasets): class tables round-trip, left stays the
subject's left, LaPa is aligned like the model's crop, splits by subject, bad files are named and
skipped, S3 output, and the reader's batches."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dfmvr.config import FaceModelConfig
from dfmvr.data.align import AlignmentTemplate, estimate_similarity, five_points, warp_mask
from dfmvr.data.parsing_shards import (
    ParsingSample,
    ParsingShardWriter,
    decode_parsing_sample,
    encode_parsing_sample,
    iter_parsing_samples,
    make_parsing_loader,
    read_parsing_manifest,
    write_parsing_manifest,
)
from dfmvr.data.shards import PARSING_VIEWS, ManifestError, ShardWriter, read_manifest, write_manifest
from dfmvr.data.synth import SynthConfig, render_views, sample_params
from dfmvr.data.transforms import resize_masks
from dfmvr.render import Renderer
from dfmvr.render.camera import Camera
from sharding.pack_parsing import ParsingPackConfig, main, pack
from sharding.parsing_layouts import CELEBAMASK_HQ_CLASSES, LAPA_CLASSES, LAPA_FIVE_POINTS, class_table, read_lapa_landmarks
from tests.conftest import make_face_sample

RENDER = 128
SIZE = 64
N_VERTICES = 1500
FACEMODEL = FaceModelConfig(n_vertices=N_VERTICES)

OURS_TO_CELEBA = {1: "skin", 2: "l_brow", 3: "r_brow", 4: "l_eye", 5: "r_eye", 6: "nose", 7: "mouth",
                  8: "u_lip", 9: "l_lip"}
"""Our class -> the CelebAMask-HQ part the fixture writes it as (both subject-relative)."""
OURS_TO_LAPA = {0: 0, 1: 1, 2: 3, 3: 2, 4: 5, 5: 4, 6: 6, 7: 8, 8: 7, 9: 9}
"""Our class -> LaPa id (LaPa's left/right are the image's)."""


# ------------------------------------------------------------------------------------- renders


@pytest.fixture(scope="module")
def face_model():
    from dfmvr.facemodel import build_face_model

    return build_face_model(FACEMODEL)


def _render(face_model, subject: int, *, tilt: bool = False):
    cfg = SynthConfig(out="unused", size=RENDER, seed=5, n_vertices=N_VERTICES)
    p = sample_params(face_model, cfg, subject=subject, capture=1)
    if tilt:  # off-centre, farther and rolled: the LaPa packer must find and straighten it
        p.angles[:, 2] += np.deg2rad([10.0, -14.0, 8.0])
        p.trans[:] = [[0.3, -0.2, -2.0], [-0.35, 0.25, -2.5], [0.2, 0.3, -1.5]]
    return render_views(face_model, Renderer(Camera.at_size(RENDER), backend="torch"), p)


@pytest.fixture(scope="module")
def faces(face_model):
    """Six faces (two subjects x three views): ``(images [6, R, R, 3], classes [6, R, R], lmk68 [6, 68, 2])``."""
    renders = [_render(face_model, subject) for subject in (0, 1)]
    return (np.concatenate([r.images for r in renders]), np.concatenate([r.masks for r in renders]),
            np.concatenate([r.lmk2d for r in renders]))


@pytest.fixture(scope="module")
def tilted(face_model):
    r = _render(face_model, 2, tilt=True)
    return r.images, r.masks, r.lmk2d


# ------------------------------------------------------------------------------------- layouts


def write_celebamask(root: Path, index: int, image: np.ndarray, classes: np.ndarray, *, occluders: bool = True) -> None:
    """One face as CelebAMask-HQ files: a 1024 px jpg and 512 px binary masks per part under ``index // 2000``.

    Skin covers the whole face under its features, glasses the eyes' surroundings, hair the top of
    the background and neck its bottom: the packer's draw order must still give back ``classes``."""
    img_dir = root / "CelebA-HQ-img"
    folder = root / "CelebAMask-HQ-mask-anno" / str(index // 2000)
    img_dir.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    big = cv2.resize(image, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(img_dir / f"{index}.jpg"), big[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    masks = cv2.resize(classes, (512, 512), interpolation=cv2.INTER_NEAREST)  # x4: exact copies
    face = masks > 0
    regions = {part: (face if part == "skin" else masks == cls) for cls, part in OURS_TO_CELEBA.items()}
    if occluders:
        eyes = np.isin(masks, (4, 5)).astype(np.uint8)
        regions["eye_g"] = cv2.dilate(eyes, np.ones((31, 31), np.uint8)).astype(bool) & face
        rows = np.arange(512)[:, None]
        regions["hair"] = ~face & (rows < 120)
        regions["neck"] = ~face & (rows > 470)
    for part, region in regions.items():
        if region.any():
            cv2.imwrite(str(folder / f"{index:05d}_{part}.png"), region.astype(np.uint8) * 255)


def lapa_106(lmk68: np.ndarray) -> np.ndarray:
    """106 LaPa-ordered points from iBUG-68: exact at the five the packer reads (eye centres 104/105,
    nose tip 54, mouth corners 84/90), plausible elsewhere."""
    def resample(points: np.ndarray, n: int, closed: bool = False) -> np.ndarray:
        pts = np.concatenate([points, points[:1]]) if closed else points
        t = np.linspace(0, len(pts) - 1, n + 1 if closed else n)[: n]
        return np.stack([np.interp(t, np.arange(len(pts)), pts[:, k]) for k in range(2)], axis=1)

    out = np.zeros((106, 2))
    out[0:33] = resample(lmk68[0:17], 33)
    for start, brow in ((33, lmk68[17:22]), (42, lmk68[22:27])):
        out[start:start + 5] = brow
        out[start + 5:start + 9] = brow[[3, 2, 1, 0]][:4] + [0.0, 2.0]
    out[51:55] = lmk68[27:31]  # the bridge down to the tip, 54
    out[55:66] = resample(lmk68[31:36], 11)
    out[66:74] = resample(lmk68[36:42], 8, closed=True)
    out[74] = lmk68[36:42].mean(axis=0)
    out[75:83] = resample(lmk68[42:48], 8, closed=True)
    out[83] = lmk68[42:48].mean(axis=0)
    out[84:96] = lmk68[48:60]  # 84 = 48, 90 = 54: the mouth corners
    out[96:104] = lmk68[60:68]
    out[104] = lmk68[36:42].mean(axis=0)
    out[105] = lmk68[42:48].mean(axis=0)
    return out


def write_lapa(folder: Path, name: str, image: np.ndarray, classes: np.ndarray, lmk68: np.ndarray, *,
               hair: bool = True) -> None:
    """One face as LaPa files: ``images/<name>.jpg``, ``labels/<name>.png`` (LaPa ids), ``landmarks/<name>.txt``."""
    for sub in ("images", "labels", "landmarks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "images" / f"{name}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    lut = np.zeros(256, np.uint8)
    for ours, lapa in OURS_TO_LAPA.items():
        lut[ours] = lapa
    labels = lut[classes]
    if hair:
        labels[: classes.shape[0] // 8][classes[: classes.shape[0] // 8] == 0] = 10
    cv2.imwrite(str(folder / "labels" / f"{name}.png"), labels)
    rows = "\n".join(f"{x:.4f} {y:.4f}" for x, y in lapa_106(lmk68))
    (folder / "landmarks" / f"{name}.txt").write_text(f"106\n{rows}\n")


def _iou(a: np.ndarray, b: np.ndarray, cls: int) -> float:
    union = ((a == cls) | (b == cls)).sum()
    return float(((a == cls) & (b == cls)).sum() / union) if union else 1.0


def _samples(root: Path | str, endpoint: str | None = None) -> dict[str, tuple[str, ParsingSample]]:
    """key -> (split, sample) of every packed sample."""
    manifest = read_manifest(str(root), endpoint=endpoint)
    return {s.key: (split, s) for split in manifest.splits for url in manifest.shard_urls(split)
            for s in iter_parsing_samples(url, endpoint=endpoint)}


def _cfg(tmp_path: Path, layout: str, src: Path, **kw) -> ParsingPackConfig:
    kw.setdefault("size", SIZE)
    return ParsingPackConfig(input=str(src), out=str(tmp_path / f"out-{layout}"), layout=layout,
                             facemodel=FACEMODEL, **kw)


# ------------------------------------------------------------------------------------- tables


def test_class_tables_cover_every_label_and_swap_only_lapa():
    assert len(CELEBAMASK_HQ_CLASSES) == 18 and set(LAPA_CLASSES) == set(range(11))
    celeba, lapa = class_table("celebamask-hq"), class_table("lapa")
    assert celeba["l_brow"] == "left_brow" and celeba["r_eye"] == "right_eye" and celeba["eye_g"] == "skin"
    assert {celeba[p] for p in ("hair", "hat", "l_ear", "r_ear", "ear_r", "neck", "neck_l", "cloth")} == {"background"}
    assert lapa["2 left eyebrow"] == "right_brow" and lapa["5 right eye"] == "left_eye"
    assert lapa["8 inner mouth"] == "mouth" and lapa["10 hair"] == "background"
    assert LAPA_FIVE_POINTS == (104, 105, 54, 84, 90)


# ------------------------------------------------------------------------------------- CelebAMask-HQ


def test_celebamask_round_trips_the_masks_through_the_class_table(tmp_path, faces):
    images, classes, _ = faces
    src = tmp_path / "celeba"
    ids = [0, 1, 2001, 4005]  # k folders 0, 1 and 2
    for i, index in enumerate(ids):
        write_celebamask(src, index, images[i], classes[i])
    summary = pack(_cfg(tmp_path, "celebamask-hq", src))
    assert summary.packed == len(ids) and summary.skipped == []
    manifest = read_parsing_manifest(summary.manifest)
    assert manifest.views == PARSING_VIEWS == ("image",) and manifest.is_parsing and manifest.image_size == SIZE
    assert manifest.extra["class_table"] == class_table("celebamask-hq")
    packed = _samples(tmp_path / "out-celebamask-hq")
    assert sorted(packed) == sorted(f"celebamaskhq-{i}" for i in ids)
    for i, index in enumerate(ids):
        sample = packed[f"celebamaskhq-{index}"][1]
        truth = resize_masks(classes[i][None], SIZE)[0]
        assert sample.mask.shape == (SIZE, SIZE) and sample.image.shape == (SIZE, SIZE, 3)
        for cls in np.unique(truth):
            assert _iou(sample.mask, truth, cls) > 0.97, (index, cls)
        assert (sample.mask == truth).mean() > 0.995
        assert sample.meta["dataset"] == "CelebAMask-HQ" and "eye_g" in sample.meta["parts"]
        assert sample.subject == sample.key  # no identity files: every image its own subject
        # the image is the photo resized: compare with the render at the same size
        ref = cv2.resize(images[i], (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(float)
        assert np.abs(sample.image.astype(float) - ref).mean() < 4.0


def test_celebamask_splits_by_identity(tmp_path, faces):
    images, classes, _ = faces
    src = tmp_path / "celeba"
    identity = {0: "7", 1: "7", 2: "8", 3: "8", 4: "9", 5: "9"}
    for index in identity:
        write_celebamask(src, index, images[index], classes[index], occluders=False)
    (src / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx orig_idx orig_file\n" + "".join(f"{i} {100 + i} {100 + i:06d}.jpg\n" for i in identity))
    (src / "identity_CelebA.txt").write_text("".join(f"{100 + i:06d}.jpg {p}\n" for i, p in identity.items()))
    summary = pack(_cfg(tmp_path, "celebamask-hq", src, splits=(0.34, 0.33, 0.33), seed=3))
    packed = _samples(tmp_path / "out-celebamask-hq")
    split_of_person: dict[str, set[str]] = {}
    for split, sample in packed.values():
        assert sample.subject == f"celeba_id{sample.meta['identity']}"
        split_of_person.setdefault(sample.meta["identity"], set()).add(split)
    assert all(len(s) == 1 for s in split_of_person.values()), split_of_person
    assert sorted(summary.per_split) == ["test", "train", "val"]
    manifest = read_manifest(summary.manifest)
    assert manifest.extra["pack_parsing"]["split_by"] == "identity"
    # the same seed gives the same split
    again = pack(_cfg(tmp_path / "again", "celebamask-hq", src, splits=(0.34, 0.33, 0.33), seed=3))
    assert again.per_split == summary.per_split
    assert {k: s for k, (s, _) in _samples(tmp_path / "again" / "out-celebamask-hq").items()} == \
        {k: s for k, (s, _) in packed.items()}


def test_subject_left_brow_stays_left_in_both_layouts(tmp_path, faces):
    images, classes, lmk68 = faces
    front = classes[1].copy()
    front[front == 3] = 1  # the subject's right brow shaved off: only the left one (image right) remains
    ys, xs = np.nonzero(front == 2)
    assert xs.mean() > RENDER / 2  # the render's class 2 is on the image's right, as PARSE_CLASSES says
    write_celebamask(tmp_path / "celeba", 0, images[1], front)
    assert not list((tmp_path / "celeba").rglob("*_r_brow.png"))
    write_lapa(tmp_path / "lapa", "asym", images[1], front, lmk68[1])
    labels = cv2.imread(str(tmp_path / "lapa" / "labels" / "asym.png"), cv2.IMREAD_UNCHANGED)
    assert 2 not in labels and np.nonzero(labels == 3)[1].mean() > RENDER / 2  # LaPa: "right eyebrow", image right
    for layout, src in (("celebamask-hq", tmp_path / "celeba"), ("lapa", tmp_path / "lapa")):
        summary = pack(_cfg(tmp_path, layout, src))
        assert summary.packed == 1, summary.lines()
        (_, sample), = _samples(tmp_path / f"out-{layout}").values()
        assert 3 not in sample.mask, layout
        ys, xs = np.nonzero(sample.mask == 2)
        assert len(xs) > 3 and xs.mean() > SIZE / 2, layout


# ------------------------------------------------------------------------------------- LaPa


def test_lapa_is_aligned_to_the_frontal_template_with_its_labels_mapped(tmp_path, tilted, face_model):
    images, classes, lmk68 = tilted
    src = tmp_path / "lapa"
    for i in range(3):
        write_lapa(src, f"face_{i}.x", images[i], classes[i], lmk68[i])  # a dot in the name
    summary = pack(_cfg(tmp_path, "lapa", src))
    assert summary.packed == 3 and summary.skipped == []
    template = AlignmentTemplate.from_face_model(face_model, (0.0,), SIZE).points(0.0)
    manifest = read_parsing_manifest(summary.manifest)
    np.testing.assert_allclose(manifest.extra["alignment_template"]["yaw_deg"]["0.0"], template, atol=1e-3)
    packed = _samples(tmp_path / "out-lapa")
    for i in range(3):
        split, sample = packed[f"lapa-face_{i}_x"]
        written = read_lapa_landmarks(src / "landmarks" / f"face_{i}.x.txt")[list(LAPA_FIVE_POINTS)]
        np.testing.assert_allclose(written, five_points(lmk68[i]), atol=1e-3)  # the fixture's five points
        matrix = estimate_similarity(written, template)
        np.testing.assert_allclose(sample.meta["align"]["matrix"], matrix, atol=1e-5)
        truth = warp_mask(classes[i], matrix, SIZE)  # hair (10) is background: the truth has none
        assert (sample.mask == truth).mean() > 0.999, i
        for cls in np.unique(truth):
            assert _iou(sample.mask, truth, cls) > 0.97, (i, cls)
        # the subject's right eye (class 5) sits on the template's first (image-left) eye point
        for cls, point in ((5, template[0]), (4, template[1])) if i == 1 else ():  # the frontal view
            ys, xs = np.nonzero(sample.mask == cls)
            assert np.hypot(xs.mean() + 0.5 - point[0], ys.mean() + 0.5 - point[1]) < 1.5, (i, cls)
        assert sample.meta["label_file"] == f"labels/face_{i}.x.png"


def test_lapa_split_folders_are_kept(tmp_path, faces):
    images, classes, lmk68 = faces
    for i, split in enumerate(("train", "train", "val", "test")):
        write_lapa(tmp_path / "lapa" / split, f"n{i}", images[i], classes[i], lmk68[i], hair=False)
    summary = pack(_cfg(tmp_path, "lapa", tmp_path / "lapa", splits=(1.0, 0.0, 0.0)))
    assert summary.per_split == {"train": 2, "val": 1, "test": 1}
    packed = _samples(tmp_path / "out-lapa")
    assert {k: s for k, (s, _) in packed.items()} == {"lapa-n0": "train", "lapa-n1": "train", "lapa-n2": "val",
                                                      "lapa-n3": "test"}
    assert packed["lapa-n2"][1].meta["split_folder"] == "val"


def test_worker_processes_make_the_same_shards(tmp_path, faces):
    images, classes, lmk68 = faces
    for i in range(3):
        write_lapa(tmp_path / "lapa", f"n{i}", images[i], classes[i], lmk68[i])
    shards = {}
    for workers in (1, 2):
        summary = pack(_cfg(tmp_path / str(workers), "lapa", tmp_path / "lapa", workers=workers, max_count=2))
        shards[workers] = {Path(u).name: Path(u).read_bytes() for u in summary.shards}
    assert shards[1] == shards[2] and len(shards[1]) >= 2


def test_lapa_landmark_reader_names_the_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("106\n" + "1 2\n" * 106)
    assert read_lapa_landmarks(path).shape == (106, 2)
    for text, needle in (("68\n" + "1 2\n" * 68, "says 68 landmarks, expected 106"),
                         ("106\n" + "1 2\n" * 100, "holds 100 rows"),
                         ("1 2\n" * 106, "point count 106 on the first line"),
                         ("106\n" + "1 2\n" * 105 + "1 x\n", "rows of 'x y' numbers")):
        path.write_text(text)
        with pytest.raises(ValueError, match=needle) as info:
            read_lapa_landmarks(path)
        assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------- bad input, CLI


def test_bad_celebamask_files_are_named_skipped_and_the_rest_packed(tmp_path, faces):
    images, classes, _ = faces
    src = tmp_path / "celeba"
    for index in (0, 1, 10, 11, 12, 13):
        write_celebamask(src, index, images[index % 6], classes[index % 6], occluders=False)
    anno = src / "CelebAMask-HQ-mask-anno" / "0"
    for path in anno.glob("00010_*.png"):  # 10: no label file at all
        path.unlink()
    cv2.imwrite(str(anno / "00011_skin.png"), np.full((256, 256), 255, np.uint8))  # 11: wrongly sized
    cv2.imwrite(str(anno / "00012_l_eyebrow.png"), np.zeros((512, 512), np.uint8))  # 12: unknown part
    (src / "CelebA-HQ-img" / "13.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # 13: corrupt image
    report = tmp_path / "summary.json"
    code = main(["--layout", "celebamask-hq", "--input", str(src), "--out", str(tmp_path / "out"), "--size", "32",
                 "--summary-json", str(report), "--no-progress"])
    assert code == 0
    summary = json.loads(report.read_text())
    assert summary["packed"] == 2 and summary["n_skipped"] == 4
    reasons = {Path(where).name: reason for where, reason in summary["skipped"]}
    assert set(reasons) == {"10.jpg", "11.jpg", "12.jpg", "13.jpg"}
    assert "00010_<part>.png" in reasons["10.jpg"] and "no mask file" in reasons["10.jpg"]
    assert "00011_skin.png" in reasons["11.jpg"] and "256 x 256 px, expected 512 x 512" in reasons["11.jpg"]
    assert "00012_l_eyebrow.png" in reasons["12.jpg"] and "unknown part 'l_eyebrow'" in reasons["12.jpg"]
    assert "13.jpg" in reasons["13.jpg"] and "unreadable image" in reasons["13.jpg"]
    manifest = read_manifest(str(tmp_path / "out"))
    assert sum(s.count for s in manifest.splits.values()) == 2 and len(manifest.extra["skipped"]) == 4


def test_bad_lapa_files_are_named_skipped_and_the_rest_packed(tmp_path, faces):
    images, classes, lmk68 = faces
    src = tmp_path / "lapa"
    names = ["good0", "good1", "nolabel", "small", "corrupt", "count68", "rows100"]
    for i, name in enumerate(names):
        write_lapa(src, name, images[i % 6], classes[i % 6], lmk68[i % 6])
    (src / "labels" / "nolabel.png").unlink()
    cv2.imwrite(str(src / "labels" / "small.png"), np.zeros((RENDER // 2, RENDER // 2), np.uint8))
    (src / "images" / "corrupt.jpg").write_bytes(b"garbage")
    (src / "landmarks" / "count68.txt").write_text("68\n" + "10 10\n" * 68)
    (src / "landmarks" / "rows100.txt").write_text("106\n" + "10 10\n" * 100)
    report = tmp_path / "summary.json"
    assert main(["--layout", "lapa", "--input", str(src), "--out", str(tmp_path / "out"), "--size", "32",
                 "--n-vertices", str(N_VERTICES), "--summary-json", str(report), "--no-progress"]) == 0
    summary = json.loads(report.read_text())
    assert summary["packed"] == 2 and summary["n_skipped"] == 5
    reasons = {Path(where).stem: reason for where, reason in summary["skipped"]}
    assert "labels/nolabel.png: missing label map" in reasons["nolabel"]
    assert "labels/small.png: label map is 64 x 64 px, expected 128 x 128" in reasons["small"]
    assert "images/corrupt.jpg: unreadable image" in reasons["corrupt"]
    assert "landmarks/count68.txt: says 68 landmarks, expected 106" in reasons["count68"]
    assert "landmarks/rows100.txt: says 106 landmarks but holds 100 rows" in reasons["rows100"]


def test_exit_codes(tmp_path, faces):
    images, classes, lmk68 = faces
    out = tmp_path / "out"
    assert main(["--layout", "helen", "--input", str(tmp_path), "--out", str(out)]) == 2
    assert main(["--layout", "lapa", "--input", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main(["--layout", "celebamask-hq", "--input", str(tmp_path), "--out", str(out)]) == 2  # no CelebA-HQ-img/
    assert main(["--layout", "lapa", "--out", str(out)]) == 2  # no --input
    assert not out.exists()  # nothing was written for bad arguments
    write_lapa(tmp_path / "lapa", "only", images[0], classes[0], lmk68[0])
    (tmp_path / "lapa" / "landmarks" / "only.txt").unlink()
    assert main(["--layout", "lapa", "--input", str(tmp_path / "lapa"), "--out", str(out), "--no-progress",
                 "--n-vertices", str(N_VERTICES), "--size", "32"]) == 1
    assert not (out / "manifest.json").exists()


def test_an_interrupted_pack_resumes(tmp_path, faces):
    images, classes, _ = faces
    src = tmp_path / "celeba"
    for index in range(3):
        write_celebamask(src, index, images[index], classes[index], occluders=False)
    cfg = _cfg(tmp_path, "celebamask-hq", src, size=32, max_count=1, splits=(1.0, 0.0, 0.0))
    first = pack(cfg)
    assert first.packed == 3 and len(first.shards) == 3
    lost = Path(first.shards[-1])
    kept = {Path(u).name: Path(u).read_bytes() for u in first.shards}
    lost.unlink()  # as if the run had stopped before its last shard
    again = pack(cfg)
    assert again.resumed == 2 and again.packed == 3
    assert {Path(u).name: Path(u).read_bytes() for u in again.shards} == kept  # byte-identical shards


# ------------------------------------------------------------------------------------- S3, reader


def test_pack_to_s3_and_read_it_back(tmp_path, faces, moto_s3):
    images, classes, _ = faces
    src = tmp_path / "celeba"
    for index in range(3):
        write_celebamask(src, index, images[index], classes[index], occluders=False)
    url = moto_s3.url("parsing/celeba")
    assert main(["--layout", "celebamask-hq", "--input", str(src), "--out", url, "--endpoint", moto_s3.endpoint,
                 "--size", "32", "--splits", "1,0,0", "--no-progress"]) == 0
    manifest = read_parsing_manifest(url, endpoint=moto_s3.endpoint)
    assert manifest.views == ("image",) and manifest.split("train").count == 3
    loader = make_parsing_loader(url, "train", image_size=16, batch_size=2, endpoint=moto_s3.endpoint, shuffle=False)
    batches = list(loader)
    assert [len(b) for b in batches] == [2, 1] and loader.skipped == 0
    images_t, masks_t = batches[0]
    assert images_t.shape == (2, 3, 16, 16) and masks_t.shape == (2, 16, 16)


def _sample(i: int, size: int = 24, fmt: str = "png") -> ParsingSample:
    rng = np.random.default_rng(i)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (size // 2, size // 2), size // 3, 1, -1)
    mask[size // 3, size // 4] = 5
    return ParsingSample(source="test", id=f"s{i}", image=rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                         mask=mask, meta={"n": i}, image_format=fmt)


def test_parsing_sample_encodes_decodes_and_names_what_is_wrong():
    sample = _sample(0)
    encoded = encode_parsing_sample(sample)
    assert sorted(k for k in encoded if not k.startswith("__")) == ["image.png", "mask.png", "meta.json"]
    back = decode_parsing_sample({**encoded, "__url__": "shard.tar"}, image_size=24)
    assert back.key == "test-s0" and back.subject == "test-s0" and back.meta == {"n": 0, "schema_version": 1}
    np.testing.assert_array_equal(back.image, sample.image)
    np.testing.assert_array_equal(back.mask, sample.mask)
    jpg = decode_parsing_sample(encode_parsing_sample(_sample(1, fmt="jpg")))
    assert jpg.image_format == "jpg" and jpg.image.shape == (24, 24, 3)
    with pytest.raises(ValueError, match=r"sample test-s0 in shard\.tar: missing entry 'mask\.png'"):
        decode_parsing_sample({k: v for k, v in encoded.items() if k != "mask.png"} | {"__url__": "shard.tar"})
    with pytest.raises(ValueError, match=r"sample test-s0: entry 'image\.png' declares 24 x 24 px"):
        decode_parsing_sample(encoded, image_size=32)
    with pytest.raises(ValueError, match="meta.json.*not valid JSON"):
        decode_parsing_sample({**encoded, "meta.json": b"{"})
    with pytest.raises(ValueError, match="malformed sample"):
        decode_parsing_sample({**encoded, "meta.json": b"[" * 100000 + b"]" * 100000})
    bad = _sample(2)
    bad.mask[0, 0] = 12
    with pytest.raises(ValueError, match=r"parsing sample test-s2: mask holds class 12, expected 0\.\.9"):
        bad.validate()
    with pytest.raises(ValueError, match=r"id must be .*\(no dots\), got 'a\.b'"):
        ParsingSample(source="x", id="a.b", image=sample.image, mask=sample.mask).validate()
    with pytest.raises(ValueError, match=r"mask must be uint8 \[24, 24\] like the image, got uint8 \[24, 23\]"):
        ParsingSample(source="x", id="y", image=sample.image, mask=sample.mask[:, :23]).validate()


def test_reader_batches_passes_resamples_and_skips_bad_samples(tmp_path):
    root = str(tmp_path / "shards")
    infos = []
    with ParsingShardWriter(root, "train", max_count=3) as writer:
        for i in range(6):
            if i == 4:  # a sample whose mask entry is not an image: skipped, counted, logged
                encoded = encode_parsing_sample(_sample(i))
                encoded["mask.png"] = b"not a png"
                writer.write_encoded(encoded, key="test-s4", subject="test-s4", image_size=24)
            else:
                writer.write(_sample(i))
    infos += writer.shards
    with ParsingShardWriter(root, "val") as writer:
        writer.write(_sample(9))
    infos += writer.shards
    manifest = read_parsing_manifest(write_parsing_manifest(root, infos, image_size=24))
    assert manifest.split("train").count == 6 and [i.url.rsplit("/", 1)[1] for i in infos] == [
        "train-000000.tar", "train-000001.tar", "val-000000.tar"]

    loader = make_parsing_loader(root, "train", image_size=16, batch_size=2, shuffle=False)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 5 and loader.skipped == 1
    images, masks = batches[0]
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16)
    assert masks.dtype == torch.int64 and masks.shape == (2, 16, 16)
    assert -1.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert set(torch.unique(masks).tolist()) <= set(range(10)) and 1 in masks
    # x / 127.5 - 1 of the resized image
    first = _sample(0).image
    ref = cv2.resize(first, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(images[0].permute(1, 2, 0).numpy(), ref, atol=1e-5)

    train = make_parsing_loader(root, "train", image_size=24, batch_size=4, resampled=True, epoch_samples=10,
                                color_jitter=0.3, seed=1)
    assert len(train) == 3
    for _ in range(2):  # every epoch the same number of full batches (shards drawn with replacement)
        assert [len(b) for b in train] == [4, 4, 4]


def test_reader_refuses_a_capture_manifest(tmp_path):
    other = str(tmp_path / "captures")
    with ShardWriter(other, "train") as writer:
        writer.write(make_face_sample("a", "b", size=24))
    write_manifest(other, writer.shards, image_size=24)
    with pytest.raises(ManifestError, match=r"views \['left', 'front', 'right'\], expected \['image'\]"):
        make_parsing_loader(other, "train", image_size=24, batch_size=1)


# ------------------------------------------------------------------------------------- training on them


@pytest.mark.parametrize("layout", ["celebamask-hq", "lapa"])
def test_the_parse_net_trains_on_packed_parsing_shards_beside_the_triplets(tmp_path, faces, layout):
    """Both layouts packed, then the parse net's job trains on them mixed with a triplet split (and
    on them alone), and validates on their val split (``val_real/``) beside the triplets' own."""
    from dfmvr.config import apply_overrides
    from dfmvr.train.parsing import train_parsenet
    from dfmvr.presets import tiny
    from tests.unit.test_parsing import write_dataset

    images, classes, lmk68 = faces
    if layout == "celebamask-hq":
        for i in range(4):
            write_celebamask(tmp_path / "src", i, images[i], classes[i])
    else:
        for i, split in enumerate(("train", "train", "val", "val")):
            write_lapa(tmp_path / "src" / split, f"n{i}", images[i], classes[i], lmk68[i])
    summary = pack(_cfg(tmp_path, layout, tmp_path / "src", splits=(0.5, 0.5, 0.0)))
    assert summary.per_split.get("train") and summary.per_split.get("val")
    triplets = write_dataset(tmp_path / "triplets")
    torch.set_num_threads(1)
    for share in (0.5, 1.0):
        cfg = apply_overrides(tiny(), {
            "data.url": triplets, "data.image_size": 32, "data.num_workers": 0, "data.shuffle_buffer": 4,
            "data.epoch_samples": 8, "parsenet.width": 4, "parsenet.steps": 3, "parsenet.batch_size": 2,
            "parsenet.val_every": 3, "parsenet.amp": False, "parsenet.robustness": False,
            "parsenet.data_url": str(tmp_path / f"out-{layout}"), "parsenet.data_share": share})
        result = train_parsenet(cfg, device="cpu")
        assert result.steps == 3 and all(np.isfinite(result.losses))
        assert result.val["val_real/samples"] == 2.0  # the parsing shards' val views, one a sample
        assert result.val["val/samples"] > 0  # the triplets' own val split still scores
