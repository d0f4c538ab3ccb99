"""The parse net's training, IoU metrics, checkpoint export and ``sharding.fill_masks``.

Data: small shards of :func:`tests.conftest.make_face_sample` faces (an ellipse of skin on
noise with a blob per feature class), written through the shard API. One tiny net (width 8,
32 px) is trained once per module and shared by the tests that need a trained model.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dfmvr.config import apply_overrides
from dfmvr.data.augment import AugmentSettings, PhotoAugment
from dfmvr.data.progress import PROGRESS_NAME
from dfmvr.data.loader import make_loader
from dfmvr.data.shards import VIEWS, ShardWriter, read_manifest, write_manifest
from dfmvr.facemodel.model import N_PARSE_CLASSES, PARSE_CLASSES
from dfmvr.nets.parsenet import BiSeNet, load_parsenet, save_parsenet
from dfmvr.train.parsing import (
    FLIP_CLASSES,
    class_iou,
    confusion_matrix,
    evaluate,
    iou_metrics,
    masked_views,
    mean_iou,
    predict_masks,
    random_hflip,
    train_parsenet,
    triplet_views,
)
from dfmvr.presets import get_preset
from sharding.fill_masks import main as fill_main
from dfmvr.data.synth import iter_shard_samples
from tests.conftest import make_face_sample

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    # other test processes share the 2 cores: two spinning OpenMP threads each make it 30x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_dataset(root: Path, *, train_subjects: int = 6, val_subjects: int = 2, captures: int = 2) -> str:
    infos = []
    layout = (("train", range(train_subjects)), ("val", range(train_subjects, train_subjects + val_subjects)))
    for split, subjects in layout:
        with ShardWriter(str(root), split, max_count=5) as writer:
            for s in subjects:
                for c in range(captures):
                    writer.write(make_face_sample(f"s{s:02d}", f"c{c}", size=SIZE, seed=100 * s + c))
        infos += writer.shards
    write_manifest(str(root), infos, image_size=SIZE)
    return str(root)


def small_config(data_url: str, **overrides):
    base = {
        "data.url": data_url, "data.image_size": SIZE, "data.num_workers": 0, "data.shuffle_buffer": 8,
        "data.epoch_samples": 16, "parsenet.width": 8, "parsenet.steps": 40, "parsenet.batch_size": 4,
        "parsenet.lr": 1e-2, "parsenet.val_every": 1000, "parsenet.log_every": 10,
        # float32 on every CPU: the same numbers whether or not a machine computes bf16 natively
        "parsenet.amp": False,
    }
    base.update(overrides)
    return apply_overrides(get_preset("tiny"), base)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("parse-shards"))


@pytest.fixture(scope="module")
def trained(dataset):
    torch.set_num_threads(1)
    logged: list[tuple[int, dict]] = []
    result = train_parsenet(small_config(dataset), device="cpu", log_metrics=lambda m, s: logged.append((s, m)))
    return result, logged


def val_batches(data_url: str):
    cfg = small_config(data_url)
    return make_loader(cfg.data, "val", rank=0, world_size=1, resampled=False, shuffle=False, batch_size=4)


# --------------------------------------------------------------------------------- metrics


def test_iou_on_a_hand_made_case():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 2]])
    conf = confusion_matrix(pred, target, n_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 2] = 3, 1, 3, 1
    assert torch.equal(conf, expected)
    iou = class_iou(conf)
    # class 0: TP 3, union 3 + 1 (missed) = 4; class 1: TP 3, union 4 + 4 - 3 = 5;
    # class 2: predicted once, never true: 0; class 3: in neither -> NaN, left out of the mean
    assert iou[:3].tolist() == pytest.approx([3 / 4, 3 / 5, 0.0])
    assert math.isnan(iou[3])
    assert mean_iou(iou) == pytest.approx((3 / 4 + 3 / 5 + 0.0) / 3)
    assert math.isnan(mean_iou(torch.full((3,), math.nan)))


def test_iou_metrics_names_every_class():
    target = torch.randint(0, N_PARSE_CLASSES, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    metrics = iou_metrics(confusion_matrix(target, target))
    assert {f"val/iou_{name}" for name in PARSE_CLASSES} <= set(metrics)
    assert metrics["val/miou"] == 1.0 and metrics["val/pixel_acc"] == 1.0


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target holds classes 0\.\.10, expected 0\.\.9"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([0, 10]))


def test_hflip_mirrors_and_swaps_left_and_right_classes():
    masks = torch.zeros(64, 4, 6, dtype=torch.long)
    masks[:, 1, 0], masks[:, 1, 1], masks[:, 2, 0], masks[:, 3, 5] = 2, 4, 6, 9  # left brow, left eye at x=0..1
    images = torch.arange(64 * 3 * 4 * 6, dtype=torch.float32).view(64, 3, 4, 6)
    out_images, out_masks = random_hflip(images, masks, torch.Generator().manual_seed(1))
    flipped = (out_images != images).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < 64
    assert torch.equal(out_images[flipped], images[flipped].flip(-1))
    assert torch.equal(out_images[~flipped], images[~flipped])
    assert torch.equal(out_masks[~flipped], masks[~flipped])
    mirrored = out_masks[flipped]
    assert (mirrored[:, 1, 5] == 3).all() and (mirrored[:, 1, 4] == 5).all()  # right brow, right eye now
    assert (mirrored[:, 2, 5] == 6).all() and (mirrored[:, 3, 0] == 9).all()  # symmetric classes kept
    assert [FLIP_CLASSES[c] for c in FLIP_CLASSES] == list(range(N_PARSE_CLASSES))


# --------------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_beats_a_constant_prediction(trained, dataset):
    result, logged = trained
    assert result.steps == 40 and len(result.losses) == 40
    assert np.mean(result.losses[-5:]) < 0.8 * np.mean(result.losses[:5])
    # the trivial baselines, scored on the same validation views: every pixel background, or skin
    truth = torch.cat([masked_views(b)[1] for b in val_batches(dataset)])
    baselines = {c: mean_iou(class_iou(confusion_matrix(torch.full_like(truth, c), truth))) for c in (0, 1)}
    metrics, _ = evaluate(result.model, triplet_views(val_batches(dataset)))
    assert metrics["val/samples"] == 4
    assert metrics["val/miou"] > max(baselines.values()) + 0.05, (metrics, baselines)
    # the loop's own final validation (which also says how long training had taken by then, and
    # scores the same views degraded as photos are: the robustness figure)
    assert result.val["val/train_seconds"] > 0
    clean = {k: v for k, v in result.val.items() if k.startswith("val/") and k != "val/train_seconds"}
    assert metrics == pytest.approx(clean, nan_ok=True)
    photo, _ = evaluate(result.model, triplet_views(val_batches(dataset)), perturb=PhotoAugment(AugmentSettings(strength=1.0)),
                        prefix="val_photo/")
    assert photo == pytest.approx({k: v for k, v in result.val.items() if k.startswith("val_photo/")}, nan_ok=True)
    assert photo["val_photo/miou"] != metrics["val/miou"]
    steps = [s for s, m in logged if "val/miou" in m]
    assert steps == [40]
    assert [s for s, m in logged if "train/loss" in m] == [10, 20, 30, 40]


def test_training_fails_fast_on_a_missing_validation_split(dataset):
    from dfmvr.data.shards import ManifestError

    with pytest.raises(ManifestError, match="no split 'holdout'"):
        train_parsenet(small_config(dataset, **{"data.val_split": "holdout"}), device="cpu")


def test_exported_checkpoint_loads_frozen_with_the_same_predictions(trained, dataset, tmp_path):
    result, _ = trained
    model = result.model.eval()
    path = save_parsenet(tmp_path / "parsenet.pt", model, {"image_size": SIZE})
    loaded = load_parsenet(path)
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()  # a parent's .train() must not wake its BatchNorm
    assert not loaded.training
    images = torch.cat([masked_views(b)[0] for b in val_batches(dataset)])
    with torch.no_grad():
        expected = model(images)
    got = loaded(images)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    model.train()


def test_predict_masks_resizes_to_the_training_size():
    model = BiSeNet(width=4).eval()
    model.meta = {"image_size": SIZE}
    images = np.random.default_rng(0).integers(0, 256, (5, 48, 48, 3), dtype=np.uint8)
    masks = predict_masks(model, images, batch_size=2)
    assert masks.shape == (5, 48, 48) and masks.dtype == np.uint8 and masks.max() < N_PARSE_CLASSES
    same = predict_masks(model, images[:, :SIZE, :SIZE].copy())
    x = torch.from_numpy(images[:, :SIZE, :SIZE]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        assert np.array_equal(same, model(x).argmax(1).numpy())


# --------------------------------------------------------------------------------- fill_masks


def strip_masks(src: str, dst: Path, keep_every: int = 2) -> tuple[set[str], set[str]]:
    """Copy ``src`` to ``dst`` through the shard API with masks removed from every sample but
    each ``keep_every``-th, and a small ground-truth mesh (its vertices all ``i``, the sample's
    position) given to every third sample that has none; returns (keys with masks, keys without)."""
    manifest = read_manifest(src)
    infos, masked, stripped = [], set(), set()
    for split in manifest.splits:
        with ShardWriter(str(dst), split, max_count=5) as writer:
            for i, sample in enumerate(s for url in manifest.shard_urls(split) for s in iter_shard_samples(url)):
                if i % keep_every:
                    sample.masks = None
                    stripped.add(sample.key)
                else:
                    masked.add(sample.key)
                if sample.gt is None and i % 3 == 0:
                    sample.gt = {"vertices": np.full((4, 3), i, np.float32), "faces": np.array([[0, 1, 2], [1, 2, 3]])}
                writer.write(sample)
        infos += writer.shards
    write_manifest(str(dst), infos, image_size=manifest.image_size)
    return masked, stripped


def corrupt_one_sample(shard: Path) -> str:
    """Replace the front view of the shard's first sample by bytes that are not an image."""
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    key = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == f"{key}.front.png":
                data = b"not a png"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return key


def test_fill_masks_end_to_end(trained, dataset, tmp_path):
    result, _ = trained
    ckpt = save_parsenet(tmp_path / "net" / "parsenet.pt", result.model.eval(), {"image_size": SIZE})
    result.model.train()
    masked, stripped = strip_masks(dataset, tmp_path / "in")
    given = {s.key: s.gt for split in read_manifest(str(tmp_path / "in")).splits
             for u in read_manifest(str(tmp_path / "in")).shard_urls(split) for s in iter_shard_samples(u)}
    bad_key = corrupt_one_sample(tmp_path / "in" / "train-000000.tar")
    out = tmp_path / "out"
    summary_json = tmp_path / "summary.json"
    rc = fill_main(["--input", str(tmp_path / "in"), "--out", str(out), "--parse-net", str(ckpt),
                    "--batch-size", "3", "--device", "cpu", "--summary-json", str(summary_json)])
    assert rc == 0
    summary = json.loads(summary_json.read_text())
    assert [s["key"] for s in summary["skipped"]] == [bad_key]
    assert summary["filled"] == len(stripped - {bad_key}) and summary["kept"] == len(masked - {bad_key})

    originals = {s.key: s for url in (dataset,) for split in read_manifest(url).splits
                 for shard in read_manifest(url).shard_urls(split) for s in iter_shard_samples(shard)}
    manifest = read_manifest(str(out))
    seen = set()
    for split in manifest.splits:
        for entry in manifest.split(split).shards:
            samples = list(iter_shard_samples(entry.url))
            assert len(samples) == entry.count
            for s in samples:
                seen.add(s.key)
                assert set(s.masks) == set(VIEWS)
                for view in VIEWS:
                    assert s.masks[view].dtype == np.uint8 and s.masks[view].shape == (SIZE, SIZE)
                    assert np.array_equal(s.images[view], originals[s.key].images[view])
                    if s.key in masked:
                        assert np.array_equal(s.masks[view], originals[s.key].masks[view])
                assert s.meta.get("masks") == ("parsenet:parsenet.pt" if s.key in stripped else None)
    assert seen == (masked | stripped) - {bad_key}
    assert manifest.extra["fill_masks"]["skipped"] == [bad_key]
    # the trained net's masks for the stripped samples are better than a constant guess
    filled = {s.key: s for u in manifest.shard_urls("train") + manifest.shard_urls("val")
              for s in iter_shard_samples(u) if s.key in stripped}
    pred = torch.from_numpy(np.stack([filled[k].masks[v] for k in filled for v in VIEWS]))
    truth = torch.from_numpy(np.stack([originals[k].masks[v] for k in filled for v in VIEWS]))
    constant = torch.zeros_like(truth)
    assert mean_iou(class_iou(confusion_matrix(pred, truth))) > mean_iou(class_iou(confusion_matrix(constant, truth)))
    # the ground truth came along, in the output shards' evaluation companions
    written = {s.key: s.gt for split in manifest.splits for u in manifest.shard_urls(split) for s in iter_shard_samples(u)}
    with_gt = [k for k in written if given[k] is not None]
    assert len(with_gt) >= 3 and all(np.array_equal(written[k]["vertices"], given[k]["vertices"]) for k in with_gt)
    assert all(written[k] is None for k in written if given[k] is None)

    # the same command again keeps every output shard it recorded (the shard-writing jobs' one record)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert fill_main(["--input", str(tmp_path / "in"), "--out", str(out), "--parse-net", str(ckpt),
                      "--batch-size", "3", "--device", "cpu", "--summary-json", str(summary_json)]) == 0
    again = json.loads(summary_json.read_text())
    assert (again["filled"], again["kept"]) == (summary["filled"], summary["kept"])
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes


def test_fill_masks_reads_a_shard_cut_short_again(trained, dataset, tmp_path):
    """An input shard that yields fewer samples than its manifest lists (cut short here; an outage
    or damage in real life) is written from what could be read, but not recorded as done: the same
    command again reads it again, and keeps the shards it did record."""
    result, _ = trained
    ckpt = save_parsenet(tmp_path / "net" / "parsenet.pt", result.model.eval(), {"image_size": SIZE})
    result.model.train()
    strip_masks(dataset, tmp_path / "in")
    cut = tmp_path / "in" / "train-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--out", str(out), "--parse-net", str(ckpt), "--batch-size", "3",
            "--device", "cpu", "--summary-json", str(tmp_path / "summary.json")]
    assert fill_main(args) == 0
    assert [lost["shard"] for lost in json.loads((tmp_path / "summary.json").read_text())["lost"]] == [str(cut)]
    recorded = json.loads((out / PROGRESS_NAME).read_text())["shards"]
    assert "train-000000.tar" not in recorded and len(recorded) >= 2
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert fill_main(args) == 0
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert again["train-000000.tar"] != mtimes["train-000000.tar"]
    assert {n: t for n, t in again.items() if n in recorded} == {n: t for n, t in mtimes.items() if n in recorded}


def test_fill_masks_refuses_bad_checkpoints_and_manifests(dataset, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert fill_main(["--input", dataset, "--out", str(tmp_path / "o1"), "--parse-net", str(missing)]) == 2
    assert f"parse net checkpoint {missing}: no such file" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    assert fill_main(["--input", dataset, "--out", str(tmp_path / "o2"), "--parse-net", str(garbage)]) == 2
    assert f"parse net checkpoint {garbage}" in capsys.readouterr().err
    ckpt = save_parsenet(tmp_path / "ok.pt", BiSeNet(width=4), {"image_size": SIZE})
    future = tmp_path / "future"
    future.mkdir()
    doc = json.loads((Path(dataset) / "manifest.json").read_text())
    doc["schema_version"] = 99
    (future / "manifest.json").write_text(json.dumps(doc))
    assert fill_main(["--input", str(future), "--out", str(tmp_path / "o3"), "--parse-net", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "schema_version 99 is not supported" in err and "[1]" in err
    assert fill_main(["--input", dataset, "--out", dataset, "--parse-net", str(ckpt)]) == 2
    assert "must differ from --input" in capsys.readouterr().err
    for name in ("o1", "o2", "o3"):
        assert not (tmp_path / name).exists()


# --------------------------------------------------------------------------------- the job


def test_job_logs_one_mlflow_run_and_exports_the_checkpoint(dataset, tmp_path):
    import mlflow

    work = tmp_path / "work"
    summary_json = tmp_path / "summary.json"
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(repo / "jobs" / "train_parsenet.py"), f"work_dir={work}", f"data.url={dataset}",
         f"data.image_size={SIZE}", "data.num_workers=0", "data.epoch_samples=16", "parsenet.width=4",
         "parsenet.steps=6", "parsenet.batch_size=2", "parsenet.val_every=3", "parsenet.log_every=2",
         "--summary-json", str(summary_json)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(summary_json.read_text())
    ckpt = work / "parsenet" / "parsenet.pt"
    assert summary["checkpoint"] == str(ckpt.resolve()) and proc.stdout.strip().endswith(str(ckpt.resolve()))
    assert set(summary["iou"]) == set(PARSE_CLASSES) and summary["steps"] == 6
    loaded = load_parsenet(ckpt)
    assert loaded.meta["image_size"] == SIZE and loaded.width == 4
    assert loaded.meta["miou"] == pytest.approx(summary["miou"])

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dfmvr.job"] == "parsenet"
    assert run.data.params["parsenet.width"] == "4"
    history = client.get_metric_history(run.info.run_id, "val/miou")
    assert [m.step for m in history] == [3, 6]
    assert history[-1].value == pytest.approx(summary["miou"])
    assert {f"val/iou_{c}" for c in ("background", "skin")} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "parsenet")] == ["parsenet/parsenet.pt"]
    assert not (tmp_path / "mlruns").exists()  # artifacts under the work dir, not the cwd


def test_fill_masks_on_synthetic_shards_to_s3(tmp_path, moto_s3):
    from dfmvr.data.synth import generate

    synthetic = generate(str(tmp_path / "synth"), n_subjects=3, n_captures=2, size=SIZE, seed=3, workers=1,
                         n_vertices=2500, splits=(0.5, 0.5, 0.0))
    ckpt = save_parsenet(tmp_path / "untrained.pt", BiSeNet(width=4), {"image_size": SIZE})
    masked, stripped = strip_masks(str(Path(synthetic.manifest).parent), tmp_path / "in", keep_every=3)
    assert masked and stripped
    out = moto_s3.url("filled")
    assert fill_main(["--input", str(tmp_path / "in"), "--out", out, "--parse-net", str(ckpt), "--device", "cpu"]) == 0
    manifest = read_manifest(out)
    samples = [s for split in manifest.splits for u in manifest.shard_urls(split) for s in iter_shard_samples(u)]
    assert {s.key for s in samples} == masked | stripped
    assert all(s.masks is not None and s.masks["front"].shape == (SIZE, SIZE) for s in samples)
    assert {s.key for s in samples if s.meta.get("masks") == "parsenet:untrained.pt"} == stripped


def test_training_with_photo_augmentation_sees_other_views_than_without(dataset):
    seen = {}
    for strength in (0.0, 1.0):
        result = train_parsenet(small_config(dataset, **{"parsenet.steps": 3, "parsenet.augment": strength,
                                                          "parsenet.robustness": False}), device="cpu")
        assert all(np.isfinite(result.losses)) and "val_photo/miou" not in result.val
        seen[strength] = result.losses
    # the same seed, data and net: only the augmented views can make the first loss differ
    assert seen[0.0][0] != seen[1.0][0]


def test_training_views_mix_parsing_shards_into_each_step_by_the_share(dataset, tmp_path):
    from dfmvr.data.parsing_shards import ParsingSample, ParsingShardWriter, write_parsing_manifest
    from dfmvr.train.parsing import TrainingViews

    rng = np.random.default_rng(0)
    with ParsingShardWriter(str(tmp_path / "parsing"), "train", max_count=4) as writer:
        for i in range(6):
            # every pixel class 9: the parsing views are the only ones wholly lower lip
            writer.write(ParsingSample(source="t", id=str(i), image=rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8),
                                       mask=np.full((SIZE, SIZE), 9, np.uint8)))
    write_parsing_manifest(str(tmp_path / "parsing"), writer.shards, image_size=SIZE)
    for share, expect in ((0.25, 3), (0.5, 6), (1.0, 12)):
        cfg = small_config(dataset, **{"parsenet.data_url": str(tmp_path / "parsing"), "parsenet.data_share": share})
        images, masks = next(iter(TrainingViews(cfg)))
        assert images.shape == (12, 3, SIZE, SIZE) and masks.shape == (12, SIZE, SIZE)
        assert int((masks == 9).flatten(1).all(1).sum()) == expect, share
