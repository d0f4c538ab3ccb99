"""Shards written to and streamed from a real moto S3 server on loopback (and a local directory).

No S3 call is mocked: boto3 talks HTTP to ``moto.server.ThreadedMotoServer`` on 127.0.0.1, and
DataLoader worker processes open their own connections to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset

from dfmvr.config import DataConfig
from dfmvr.data import shards as sh
from dfmvr.data import storage
from dfmvr.data.loader import make_loader
from tests.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, S3Env, make_face_sample

pytestmark = pytest.mark.integration

SIZE = 32
N_SUBJECTS = 20
CAPTURES = 2


def _samples() -> list[sh.Sample]:
    samples = []
    for subject in range(N_SUBJECTS):
        for capture in range(CAPTURES):
            index = subject * CAPTURES + capture
            samples.append(make_face_sample(f"subj{subject:03d}", f"{capture:02d}", size=SIZE, seed=index))
    return samples


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path) -> str:
    """A shard root: a prefix in a fresh moto bucket, or a local directory."""
    if request.param == "s3":
        env: S3Env = request.getfixturevalue("moto_s3")
        return env.url("datasets/ellipses")
    return str(tmp_path / "shards")


def _write_dataset(root: str, samples: list[sh.Sample], max_count: int = 4) -> tuple[str, dict[str, sh.Sample]]:
    """train: subjects 0..15 (32 samples, 8 shards); val: subjects 16..19 (8 samples, 2 shards)."""
    infos: list[sh.ShardInfo] = []
    with sh.ShardWriter(root, "train", max_count=max_count) as writer:
        for sample in samples[: 16 * CAPTURES]:
            writer.write(sample)
    infos += writer.shards
    with sh.ShardWriter(root, "val", max_count=max_count) as writer:
        for sample in samples[16 * CAPTURES :]:
            writer.write(sample)
    infos += writer.shards
    url = sh.write_manifest(root, infos, image_size=SIZE, extra={"source": "test-ellipses"})
    return url, {sample.key: sample for sample in samples}


def _cfg(root: str, **overrides) -> DataConfig:
    values = dict(url=root, image_size=SIZE, batch_size=3, num_workers=2, shuffle_buffer=8, epoch_samples=20)
    values.update(overrides)
    return DataConfig(**values)


def test_every_sample_once_per_epoch_across_ranks_and_bit_exact(root):
    _, by_key = _write_dataset(root, _samples())
    manifest = sh.read_manifest(root)
    assert len(manifest.shard_urls("train")) == 8
    train_keys = {key for key in by_key if int(key[4:7]) < 16}
    seen: list[str] = []
    per_rank: dict[int, list[str]] = {}
    for rank in (0, 1):
        loader = make_loader(_cfg(root), "train", rank=rank, world_size=2, resampled=False, seed=5)
        keys: list[str] = []
        for batch in loader:
            assert batch.images.shape[1:] == (3, 3, SIZE, SIZE)
            for i, key in enumerate(batch.keys):
                sample = by_key[key]
                for v, view in enumerate(sh.VIEWS):
                    # [-1, 1] float back to uint8 is exact for PNG views
                    pixels = ((batch.images[i, v].numpy().transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
                    np.testing.assert_array_equal(pixels, sample.images[view])
                    np.testing.assert_array_equal(batch.masks[i, v].numpy(), sample.masks[view])
                np.testing.assert_array_equal(batch.lmk2d[i].numpy(), sample.lmk2d)
                np.testing.assert_array_equal(batch.lmk3d[i, : len(sample.lmk3d)].numpy(), sample.lmk3d)
                np.testing.assert_array_equal(batch.coeffs[i].numpy(), sample.coeffs)
                assert batch.yaw_deg[i].tolist() == [-45.0, 0.0, 45.0]
                assert batch.subjects[i] == sample.subject
            keys += batch.keys
        assert loader.skipped == 0
        per_rank[rank] = keys
        seen += keys
    assert sorted(seen) == sorted(train_keys)  # every sample exactly once across the two ranks
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) == len(per_rank[1]) == 16  # 4 shards of 4 samples each


def test_resampled_ranks_yield_the_same_number_of_batches(root):
    _write_dataset(root, _samples())
    counts = []
    for rank in (0, 1):
        loader = make_loader(_cfg(root, batch_size=4), "train", rank=rank, world_size=2, resampled=True, epoch_samples=22)
        for _epoch in range(2):
            batches = list(loader)
            assert all(len(batch) == 4 for batch in batches)
            counts.append(len(batches))
        assert len(loader) == 6  # ceil(ceil(22 / 4) / 2 workers) * 2 workers
    assert counts == [6, 6, 6, 6]


def test_colour_jitter_and_resizing_in_the_loader(root):
    _, by_key = _write_dataset(root, _samples())
    loader = make_loader(
        _cfg(root, image_size=2 * SIZE, color_jitter=0.5, num_workers=0, weight_map="reference"),
        "val",
        resampled=False,
        shuffle=False,
    )
    batch = next(iter(loader))
    assert batch.images.shape[-1] == 2 * SIZE and batch.masks.shape[-1] == 2 * SIZE
    sample = by_key[batch.keys[0]]
    np.testing.assert_allclose(batch.lmk2d[0].numpy(), sample.lmk2d * 2, rtol=1e-6)
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    levels = np.unique(batch.weights.numpy())
    assert len(levels) == 3 and np.allclose(levels, [0.25, 0.5, 0.99])
    plain = make_loader(_cfg(root, image_size=2 * SIZE, num_workers=0), "val", resampled=False, shuffle=False)
    reference = next(iter(plain))
    assert reference.keys == batch.keys
    assert (batch.images - reference.images).abs().mean() > 0.01  # the jitter changed the colours
    np.testing.assert_array_equal(batch.masks.numpy(), reference.masks.numpy())


def test_multipart_upload_arrives_intact(moto_s3: S3Env):
    root = moto_s3.url("multipart")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        sample = make_face_sample(f"big{i}", "00", size=320, seed=i)
        sample.images = {view: rng.integers(0, 256, (320, 320, 3), dtype=np.uint8) for view in sh.VIEWS}
        samples.append(sample)
    settings = storage.TransferSettings(multipart_threshold=1 << 20, multipart_chunksize=5 << 20)
    with sh.ShardWriter(root, "train", max_count=100, transfer=settings) as writer:
        for sample in samples:
            writer.write(sample)
    (info,) = writer.shards
    assert info.size > 5 << 20  # big enough for two parts
    sh.write_manifest(root, writer.shards, image_size=320)
    manifest = sh.read_manifest(root)
    (entry,) = manifest.split("train").shards
    bucket, key = storage.split_s3(entry.url)
    head = moto_s3.client().head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload of two parts
    body = moto_s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == entry.sha256 == info.sha256
    loader = make_loader(DataConfig(url=root, image_size=320, batch_size=6, num_workers=0), "train", resampled=False, shuffle=False)
    (batch,) = list(loader)
    assert batch.keys == [s.key for s in samples] and loader.skipped == 0


def _refusing_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connections are refused


def test_failed_upload_is_not_listed_and_error_names_url_without_credentials(moto_s3: S3Env):
    root = moto_s3.url("failing")
    settings = storage.TransferSettings(attempts=2, backoff_s=0.01, botocore_max_attempts=1, connect_timeout_s=2)
    writer = sh.ShardWriter(root, "train", max_count=2, transfer=settings)
    for i in range(3):  # the third write publishes shard 0
        writer.write(make_face_sample(f"s{i}", "00", size=SIZE, seed=i))
    assert len(writer.shards) == 1
    writer.endpoint = _refusing_endpoint()  # the object store goes away before shard 1 is published
    with pytest.raises(storage.StorageError) as info:
        writer.close()
    text = str(info.value)
    assert text.startswith(f"{root}/train-000001.tar: upload failed after 2 attempts")
    assert FAKE_SECRET_KEY not in text and FAKE_ACCESS_KEY not in text
    assert [Path(s.url).name for s in writer.shards] == ["train-000000.tar"]
    sh.write_manifest(root, writer.shards, image_size=SIZE)
    manifest = sh.read_manifest(root)
    assert [s.name for s in manifest.split("train").shards] == ["train-000000.tar"]
    listed = storage.list_urls(root)
    assert listed == [f"{root}/manifest.json", f"{root}/train-000000.tar"]  # no half-written shard 1

    missing = "s3://dfmvr-no-such-bucket/prefix"
    with pytest.raises(storage.StorageError) as info:
        with sh.ShardWriter(missing, "train", transfer=settings) as writer:
            writer.write(make_face_sample("s0", "00", size=SIZE))
    text = str(info.value)
    assert f"{missing}/train-000000.tar" in text and "NoSuchBucket" in text
    assert FAKE_SECRET_KEY not in text and FAKE_ACCESS_KEY not in text
    assert writer.shards == []


# ----------------------------------------------------------------------------- bad input


def _tar_bytes(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, mtime=0) as tar:
        for sample in samples:
            tar.write(sample)
    return buffer.getvalue()


def _member_offsets(data: bytes) -> list[tuple[str, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(member.name, member.offset) for member in tar.getmembers()]


def _bad_input_dataset(root: str) -> tuple[set[str], int]:
    """Six shards of four samples; returns the keys that must arrive and the exact skip count."""
    counter = iter(range(10_000))

    def fresh(size: int = SIZE) -> dict:
        index = next(counter)
        return sh.encode_sample(make_face_sample(f"subj{index:04d}", "00", size=size, seed=index))

    shard_samples: dict[str, list[dict]] = {name: [fresh() for _ in range(4)] for name in "abcdef"}
    good: set[str] = set()
    skipped = 0
    shard_bytes: dict[str, bytes] = {}
    # a: clean
    good |= {s["__key__"] for s in shard_samples["a"]}
    # b: a sample without right.png and one with a NaN landmark
    b = shard_samples["b"]
    del b[0]["right.png"]
    lmk = np.load(io.BytesIO(b[1]["lmk2d.npy"]))
    lmk[2, 30, 1] = np.nan
    buffer = io.BytesIO()
    np.save(buffer, lmk)
    b[1]["lmk2d.npy"] = buffer.getvalue()
    good |= {s["__key__"] for s in b[2:]}
    skipped += 2
    # c: one sample 16 px (the manifest says 32) and one whose right view alone is 16 px
    c = shard_samples["c"]
    small = fresh(size=16)
    small["__key__"] = c[0]["__key__"]
    small["meta.json"] = c[0]["meta.json"]
    c[0] = small
    c[1]["right.png"] = fresh(size=16)["right.png"]
    good |= {s["__key__"] for s in c[2:]}
    skipped += 2
    # d: truncated in the middle of the third sample
    data = _tar_bytes(shard_samples["d"])
    third = [offset for name, offset in _member_offsets(data) if name.startswith(shard_samples["d"][2]["__key__"])]
    shard_bytes["d"] = data[: third[2] + 700]
    good |= {s["__key__"] for s in shard_samples["d"][:2]}
    skipped += 2
    # e: garbage over the header of the third sample's first entry (tarfile stops silently there)
    data = bytearray(_tar_bytes(shard_samples["e"]))
    third = [offset for name, offset in _member_offsets(bytes(data)) if name.startswith(shard_samples["e"][2]["__key__"])]
    data[third[0] : third[0] + 512] = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    shard_bytes["e"] = bytes(data)
    good |= {s["__key__"] for s in shard_samples["e"][:2]}
    skipped += 2
    # f: not a tar at all
    shard_bytes["f"] = np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    skipped += 4

    infos = []
    for index, name in enumerate("abcdef"):
        data = shard_bytes.get(name) or _tar_bytes(shard_samples[name])
        url = storage.join(root, f"train-{index:06d}.tar")
        storage.write_bytes(url, data)
        subjects = sorted(json.loads(s["meta.json"])["subject"] for s in shard_samples[name])
        infos.append(
            sh.ShardInfo(
                url=url, split="train", count=4, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                image_size=SIZE, keys=[s["__key__"] for s in shard_samples[name]], subjects=subjects,
            )
        )
    sh.write_manifest(root, infos, image_size=SIZE)
    return good, skipped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_the_rest_arrive(root, num_workers, caplog):
    good, skipped = _bad_input_dataset(root)
    assert (len(good), skipped) == (12, 12)
    loader = make_loader(_cfg(root, num_workers=num_workers, batch_size=5), "train", resampled=False, seed=1)
    with caplog.at_level("WARNING", logger="dfmvr.data.loader"):
        keys = [key for batch in loader for key in batch.keys]
    assert sorted(keys) == sorted(good)
    assert loader.skipped == skipped
    if num_workers == 0:  # worker processes log in their own process
        text = caplog.text
        assert "missing entry 'right.png'" in text and "lmk2d holds 1 non-finite" in text
        assert "declares 16 x 16 px; the manifest says 32 x 32 (refused before decoding)" in text
        assert "train-000003.tar: manifest lists 4 samples, read 3" in text  # truncated
        assert "train-000004.tar: manifest lists 4 samples, read 2; 2 lost" in text  # corrupt header
        assert "train-000005.tar: manifest lists 4 samples, read 0; 4 lost" in text  # not a tar
    # a second epoch counts again
    assert sorted(key for batch in loader for key in batch.keys) == sorted(good)
    assert loader.skipped == 2 * skipped


def test_loader_refuses_unknown_schema_version_at_start(root):
    url, _ = _write_dataset(root, _samples()[:4])
    document = json.loads(storage.read_bytes(url))
    document["schema_version"] = 99
    storage.write_bytes(url, json.dumps(document).encode())
    with pytest.raises(sh.ManifestError) as info:
        make_loader(_cfg(root), "train")
    assert "schema_version 99 is not supported" in str(info.value) and "[1]" in str(info.value)
    assert url in str(info.value)


def test_missing_manifest_and_split_are_named(moto_s3: S3Env):
    root = moto_s3.url("nothing-here")
    with pytest.raises(FileNotFoundError, match=f"{root}/manifest.json"):
        make_loader(_cfg(root), "train")
    _write_dataset(root, _samples()[:4])
    with pytest.raises(sh.ManifestError, match=r"no split 'test'; the manifest has \['train'\]"):
        make_loader(_cfg(root), "test")


def test_plain_webdataset_reads_s3_through_the_registered_scheme(moto_s3: S3Env):
    root = moto_s3.url("plain")
    _write_dataset(root, _samples()[:8])
    assert webdataset.gopen_schemes["s3"] is storage.gopen_s3
    urls = sh.read_manifest(root).shard_urls("train")
    dataset = webdataset.WebDataset(urls, shardshuffle=False, nodesplitter=webdataset.split_by_node)
    keys = [sample["__key__"] for sample in dataset]
    assert keys == [s.key for s in _samples()[:8]]


def test_spawned_workers_stream_from_s3(moto_s3: S3Env):
    root = moto_s3.url("spawn")
    _, by_key = _write_dataset(root, _samples()[:12])
    loader = make_loader(
        _cfg(root, s3_endpoint=moto_s3.endpoint), "train", resampled=True, epoch_samples=6,
        num_workers=1, multiprocessing_context="spawn",
    )
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    assert all(key in by_key for batch in batches for key in batch.keys)


def test_rank_from_environment_matches_explicit_rank(tmp_path, monkeypatch):
    root = str(tmp_path / "shards")
    _write_dataset(root, _samples())
    explicit = make_loader(_cfg(root), "train", rank=1, world_size=2, resampled=False)
    expected = sorted(key for batch in explicit for key in batch.keys)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = make_loader(_cfg(root), "train", resampled=False)
    assert sorted(key for batch in from_env for key in batch.keys) == expected
    assert len(expected) == 16


def test_ground_truth_meshes_only_with_gt(root):
    samples = [make_face_sample(f"gt{i}", "00", size=SIZE, seed=i, with_gt=True) for i in range(5)]
    with sh.ShardWriter(root, "test", max_count=3) as writer:
        for sample in samples:
            writer.write(sample)
    sh.write_manifest(root, writer.shards, image_size=SIZE)
    by_key = {s.key: s for s in samples}
    loader = make_loader(_cfg(root, num_workers=2), "test", resampled=False, with_gt=True)
    seen = 0
    for batch in loader:
        for i, key in enumerate(batch.keys):
            np.testing.assert_array_equal(batch.gt_vertices[i].numpy(), by_key[key].gt["vertices"])
            np.testing.assert_array_equal(batch.gt_faces[i].numpy(), by_key[key].gt["faces"])
            seen += 1
    assert seen == 5
    plain = make_loader(_cfg(root, num_workers=0), "test", resampled=False)
    batches = list(plain)
    assert all(batch.gt_vertices is None for batch in batches)
    assert sum(len(b) for b in batches) == 5 and plain.skipped == 0


def _corrupt_every_shard(root: str) -> list[str]:
    """Overwrite every train shard with bytes that are not a tar (as an outage or a wrong object would read)."""
    urls = sh.read_manifest(root).shard_urls("train")
    for url in urls:
        if url.startswith("s3://"):
            bucket, key = storage.split_s3(url)
            storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"not a tar archive" * 10)
        else:
            Path(url).write_bytes(b"not a tar archive" * 10)
    return urls


def test_a_root_where_every_shard_is_corrupt_fails_within_the_bound(root):
    from dfmvr.data.loader import ShardReadError

    _write_dataset(root, _samples())
    urls = _corrupt_every_shard(root)
    loader = make_loader(_cfg(root, num_workers=0, max_bad_shards_in_a_row=5), "train", resampled=True, seed=1)
    with pytest.raises(ShardReadError, match=r"5 shards in a row gave no sample") as err:
        next(iter(loader))
    assert any(u in str(err.value) for u in urls) and "last error" in str(err.value)


def test_shards_unreadable_mid_run_stop_the_reader_naming_them(moto_s3: S3Env):
    from dfmvr.data.loader import ShardReadError

    root = moto_s3.url("datasets/outage")
    _write_dataset(root, _samples())
    loader = make_loader(_cfg(root, num_workers=1, max_bad_shards_in_a_row=4, epoch_samples=400), "train",
                         resampled=True, seed=1)
    batches = iter(loader)
    assert len(next(batches).keys) == 3  # reading works
    # the objects go away mid-run (a deleted prefix, a role that lost its rights)
    client = moto_s3.client()
    for obj in client.list_objects_v2(Bucket=moto_s3.bucket, Prefix="datasets/outage/train-")["Contents"]:
        client.delete_object(Bucket=moto_s3.bucket, Key=obj["Key"])
    with pytest.raises(ShardReadError, match=r"4 shards in a row gave no sample.*s3://") as err:
        for _ in range(1000):  # bounded: the prefetched batches, then the error
            next(batches)
    assert moto_s3.bucket in str(err.value)


def test_some_bad_shards_keep_the_run_going(root):
    """One unreadable shard among good ones is skipped and counted, never fatal."""
    _write_dataset(root, _samples())
    bad = sh.read_manifest(root).shard_urls("train")[0]
    if bad.startswith("s3://"):
        bucket, key = storage.split_s3(bad)
        storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"garbage")
    else:
        Path(bad).write_bytes(b"garbage")
    loader = make_loader(_cfg(root, num_workers=0, max_bad_shards_in_a_row=3, epoch_samples=200), "train",
                         resampled=True, seed=2)
    n = sum(len(b.keys) for b in loader)
    assert n >= 200 and loader.skipped > 0  # a whole epoch arrived (batches of 3)
