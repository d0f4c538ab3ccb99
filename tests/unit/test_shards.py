"""Sample encoding, ShardWriter roll-over and publishing, manifest checks (local directories)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dfmvr.data import shards as sh
from dfmvr.data import storage
from tests.conftest import make_face_sample


def test_encode_decode_round_trip_png_is_exact():
    sample = make_face_sample("subjA", "03", size=48, seed=1, with_gt=True)
    encoded = sh.encode_sample(sample)
    assert encoded["__key__"] == "subjA-03"
    expected_entries = {f"{v}.png" for v in sh.VIEWS} | {f"{v}.mask.png" for v in sh.VIEWS}
    expected_entries |= {"lmk2d.npy", "lmk3d.npy", "coeffs.npy", "gt.npz", "meta.json"}
    assert set(encoded) - {"__key__"} == expected_entries
    decoded = sh.decode_sample(encoded)
    assert decoded.key == sample.key
    for view in sh.VIEWS:
        np.testing.assert_array_equal(decoded.images[view], sample.images[view])
        np.testing.assert_array_equal(decoded.masks[view], sample.masks[view])
    np.testing.assert_array_equal(decoded.lmk2d, sample.lmk2d)
    np.testing.assert_array_equal(decoded.lmk3d, sample.lmk3d)
    np.testing.assert_array_equal(decoded.coeffs, sample.coeffs)
    np.testing.assert_array_equal(decoded.gt["vertices"], sample.gt["vertices"])
    np.testing.assert_array_equal(decoded.gt["faces"], sample.gt["faces"])
    assert decoded.gt["units"] == "dm"
    assert decoded.meta["yaw_deg"] == [-45.0, 0.0, 45.0]
    assert decoded.meta["schema_version"] == sh.SCHEMA_VERSION


def test_jpeg_views_decode_close_and_masks_stay_exact():
    sample = make_face_sample("subjA", "00", size=48, seed=2, image_format="jpg")
    encoded = sh.encode_sample(sample)
    assert "front.jpg" in encoded and "front.png" not in encoded
    decoded = sh.decode_sample(encoded)
    assert decoded.image_format == "jpg"
    face = sample.masks["front"] > 0
    error = np.abs(decoded.images["front"].astype(int) - sample.images["front"].astype(int))[face].mean()
    assert error < 12
    np.testing.assert_array_equal(decoded.masks["front"], sample.masks["front"])


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda s: s.lmk2d.__setitem__((1, 5, 0), np.nan), "lmk2d holds 1 non-finite"),
        (lambda s: s.images.pop("right"), "exactly the views"),
        (lambda s: s.images.__setitem__("right", np.zeros((32, 32, 3), np.uint8)), "images['right'] is 32 px, expected 48"),
        (lambda s: s.masks.__setitem__("left", np.full((48, 48), 12, np.uint8)), "class 12"),
        (lambda s: setattr(s, "capture", "0.1"), "no dots"),
        (lambda s: setattr(s, "lmk2d", np.zeros((3, 5, 2), np.float32)), "lmk2d must have shape [3, 68, 2]"),
    ],
)
def test_validate_names_key_and_entry(breakage, message):
    sample = make_face_sample("subjB", "01", size=48, seed=3)
    breakage(sample)
    with pytest.raises(ValueError, match="subjB") as info:
        sample.validate()
    assert message in str(info.value)


def test_decode_missing_view_names_key_url_and_entry():
    encoded = sh.encode_sample(make_face_sample("subjC", "00", size=32))
    del encoded["right.png"]
    encoded["__url__"] = "s3://bucket/train-000003.tar"
    with pytest.raises(ValueError) as info:
        sh.decode_sample(encoded)
    text = str(info.value)
    assert "subjC-00" in text and "train-000003.tar" in text and "'right.png'" in text


def test_decode_garbage_image_is_reported():
    encoded = sh.encode_sample(make_face_sample("subjC", "00", size=32))
    encoded["front.png"] = b"\x89PNG not really"
    with pytest.raises(ValueError, match="'front.png' .* not a decodable image"):
        sh.decode_sample(encoded)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shard_writer_rolls_over_by_count_and_publishes_whole_files(tmp_path):
    root = tmp_path / "shards"
    samples = [make_face_sample(f"s{i:02d}", "00", size=32, seed=i) for i in range(7)]
    with sh.ShardWriter(str(root), "train", max_count=3, start_index=5) as writer:
        for sample in samples:
            writer.write(sample)
    infos = writer.shards
    assert [Path(i.url).name for i in infos] == ["train-000005.tar", "train-000006.tar", "train-000007.tar"]
    assert [i.count for i in infos] == [3, 3, 1]
    assert [k for i in infos for k in i.keys] == [s.key for s in samples]
    assert sorted(p.name for p in root.iterdir()) == [Path(i.url).name for i in infos]  # no temp leftovers
    for info in infos:
        path = Path(info.url)
        assert info.size == path.stat().st_size
        assert info.sha256 == _sha256(path)
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len({n.split(".", 1)[0] for n in names}) == info.count


def test_shard_writer_rolls_over_by_size(tmp_path):
    sample_bytes = sum(len(v) for k, v in sh.encode_sample(make_face_sample("a", "0", size=32)).items() if k != "__key__")
    with sh.ShardWriter(str(tmp_path), "val", max_count=100, max_size=2 * sample_bytes) as writer:
        for i in range(5):
            writer.write(make_face_sample(f"s{i}", "0", size=32, seed=0))
    assert [i.count for i in writer.shards] == [2, 2, 1]


def test_shard_writer_refuses_mixed_sizes_and_discards_on_error(tmp_path):
    with pytest.raises(ValueError, match="views are 48 px, expected 32 px"):
        with sh.ShardWriter(str(tmp_path), "train", max_count=10) as writer:
            writer.write(make_face_sample("a", "0", size=32))
            writer.write(make_face_sample("b", "0", size=48))
    assert writer.shards == []
    assert list(tmp_path.iterdir()) == []


def _write(root: Path, split: str, subjects: list[str], size: int = 32) -> list[sh.ShardInfo]:
    with sh.ShardWriter(str(root), split, max_count=2) as writer:
        for i, subject in enumerate(subjects):
            writer.write(make_face_sample(subject, f"{i:02d}", size=size, seed=i))
    return writer.shards


def test_manifest_round_trip(tmp_path):
    train = _write(tmp_path, "train", ["a", "a", "b", "c", "c"])
    val = _write(tmp_path, "val", ["d", "e"])
    url = sh.write_manifest(str(tmp_path), train + val, image_size=32, extra={"generator": "test"})
    assert url == str(tmp_path / "manifest.json")
    document = json.loads(Path(url).read_text())
    assert document["schema_version"] == sh.SCHEMA_VERSION
    assert document["splits"]["train"]["shards"][0]["name"] == "train-000000.tar"  # relative names
    manifest = sh.read_manifest(str(tmp_path))
    assert manifest.image_size == 32
    assert manifest.split("train").count == 5 and manifest.split("val").count == 2
    assert manifest.split("train").subjects == ["a", "b", "c"]
    assert manifest.shard_urls("val") == [i.url for i in val]
    assert manifest.shard_counts("train") == {i.url: i.count for i in train}
    assert [s.sha256 for s in manifest.split("train").shards] == [i.sha256 for i in train]
    assert manifest.extra == {"generator": "test"}
    with pytest.raises(sh.ManifestError, match=r"no split 'test'; the manifest has \['train', 'val'\]"):
        manifest.split("test")


def test_manifest_refuses_subject_in_two_splits(tmp_path):
    train = _write(tmp_path, "train", ["a", "b"])
    val = _write(tmp_path, "val", ["b", "c"])
    with pytest.raises(sh.ManifestError, match=r"subject 'b' appears in splits \['train', 'val'\]"):
        sh.write_manifest(str(tmp_path), train + val, image_size=32)
    assert not (tmp_path / "manifest.json").exists()


def test_read_manifest_refuses_subject_in_two_splits(tmp_path):
    train = _write(tmp_path, "train", ["a", "b"])
    val = _write(tmp_path, "val", ["c"])
    url = sh.write_manifest(str(tmp_path), train + val, image_size=32)
    document = json.loads(Path(url).read_text())
    document["splits"]["val"]["shards"][0]["subjects"].append("a")
    Path(url).write_text(json.dumps(document))
    with pytest.raises(sh.ManifestError, match="subject 'a' appears in splits"):
        sh.read_manifest(str(tmp_path))


def test_read_manifest_refuses_unknown_schema_version(tmp_path):
    url = sh.write_manifest(str(tmp_path), _write(tmp_path, "train", ["a"]), image_size=32)
    document = json.loads(Path(url).read_text())
    document["schema_version"] = 99
    Path(url).write_text(json.dumps(document))
    with pytest.raises(sh.ManifestError) as info:
        sh.read_manifest(str(tmp_path))
    text = str(info.value)
    assert "manifest.json" in text and "schema_version 99 is not supported" in text
    assert f"{list(sh.SUPPORTED_SCHEMA_VERSIONS)}" in text


def test_write_manifest_checks_stored_shards(tmp_path):
    infos = _write(tmp_path, "train", ["a", "b", "c"])
    Path(infos[1].url).write_bytes(b"short")
    with pytest.raises(sh.ManifestError, match=r"train-000001.tar: stored size 5 bytes, expected \d+ bytes"):
        sh.write_manifest(str(tmp_path), infos, image_size=32)
    with pytest.raises(sh.ManifestError, match="views are 32 px, expected image_size 64 px"):
        sh.write_manifest(str(tmp_path), infos, image_size=64, verify=False)


def test_missing_manifest_names_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "manifest.json")):
        sh.read_manifest(str(tmp_path))


def test_storage_local_put_is_atomic_and_listable(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 1000)
    destination = tmp_path / "deep" / "dir" / "obj.bin"
    assert storage.put_file(source, str(destination)) == 1000
    assert destination.read_bytes() == b"x" * 1000
    assert storage.list_urls(str(destination.parent)) == [str(destination)]
    assert storage.exists(str(destination)) and storage.size(str(destination)) == 1000
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    assert storage.join("s3://bucket/prefix/", "x.tar") == "s3://bucket/prefix/x.tar"
    with pytest.raises(ValueError, match="expected an s3://bucket/key URL"):
        storage.split_s3("/local/path")


def test_ground_truth_goes_to_the_evaluation_companion_and_joins_back(tmp_path):
    from dfmvr.data.samples import make_decoder, plan_chunks, read_chunk

    samples = [make_face_sample("subjA", f"{i:02d}", size=48, seed=i, with_gt=i != 2) for i in range(5)]
    with sh.ShardWriter(str(tmp_path), "test", max_count=5) as writer:
        for sample in samples:
            writer.write(sample)
    (info,) = writer.shards
    assert info.eval_url == str(tmp_path / "test-000000.eval.tar") and info.eval_size > 0
    with tarfile.open(info.url) as tar:
        names = tar.getnames()
    with tarfile.open(info.eval_url) as tar:
        eval_names = tar.getnames()
    # the training stream holds no mesh; the companion holds the meshes only, in the shard's order
    assert not [n for n in names if n.endswith(".gt.npz")] and "subjA-00.front.png" in names
    assert eval_names == [f"subjA-{i:02d}.gt.npz" for i in range(5) if i != 2]
    assert info.size + info.eval_size > 0 and Path(info.eval_url).stat().st_size == info.eval_size

    sh.write_manifest(str(tmp_path), [info], image_size=48)
    manifest = sh.read_manifest(str(tmp_path))
    (entry,) = manifest.split("test").shards
    assert entry.eval_url == info.eval_url and entry.eval_sha256 == info.eval_sha256
    assert manifest.eval_companions("test") == {info.url: info.eval_url}
    # evaluation's reader joins the meshes back by key; the sample without one comes without
    decoder = make_decoder(manifest, 48, with_gt=True)
    items = [x for c in plan_chunks(manifest, "test", 2) for x in read_chunk(c, decoder)]
    assert [x.key for x in items] == [s.key for s in samples]
    for item, sample in zip(items, samples):
        if sample.gt is None:
            assert item.gt_vertices is None or len(item.gt_vertices) == 0
        else:
            np.testing.assert_array_equal(item.gt_vertices, sample.gt["vertices"])

    # the same index written again without meshes leaves no companion of the earlier write behind
    with sh.ShardWriter(str(tmp_path), "test", max_count=5) as writer:
        writer.write(samples[2])
    assert writer.shards[0].eval_url is None and not Path(info.eval_url).exists()


def test_the_companion_join_streams_and_survives_lost_samples():
    from dfmvr.data import reader

    shard = [{"__key__": f"k{i}", "a": i} for i in range(200) if i not in (5, 6, 7)]  # three lost in the shard
    companion = iter({"__key__": f"k{i}", "b": -i} for i in range(200) if i % 50)  # every 50th has none
    joined = list(reader._join_by_key(iter(shard), companion))
    assert [s["__key__"] for s in joined] == [s["__key__"] for s in shard]
    for s in joined:
        i = s["a"]
        assert s.get("b") == (-i if i % 50 else None)
    # streamed: the first sample out has read at most the window of the companion, not all of it
    read = []
    counted = ({"__key__": f"k{i}", "b": -i} for i in range(200) if not read.append(i))
    next(reader._join_by_key(iter(shard), counted))
    assert len(read) <= reader.JOIN_WINDOW
