"""One malformed sample of each kind, among good ones: training's loader, evaluation's reader and
mask filling each finish with exactly the good samples, and name every bad one."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset

from dfmvr.data import shards as sh
from tests.conftest import make_face_sample

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SIZE = 32


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _png_declaring(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a PNG) with its IHDR rewritten to declare ``width`` x ``height`` (valid CRC)."""
    ihdr = bytearray(data[12:29])
    ihdr[4:8], ihdr[8:12] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    return data[:12] + bytes(ihdr) + zlib.crc32(bytes(ihdr)).to_bytes(4, "big") + data[33:]


CORRUPTIONS = {
    "types": lambda s: s.update({"meta.json": json.dumps({**json.loads(s["meta.json"]), "yaw_deg": 45}).encode()}),
    "nesting": lambda s: s.update({"meta.json": b"[" * 100_000 + b"]" * 100_000}),
    "truncated_image": lambda s: s.update({"left.png": s["left.png"][:60]}),
    "wrong_shape": lambda s: s.update({"lmk2d.npy": _npy(np.zeros((3, 5, 2), np.float32))}),
    "huge_declared": lambda s: s.update({"front.png": _png_declaring(s["front.png"], 16384, 16384)}),
    "missing_entry": lambda s: s.pop("lmk2d.npy"),
    "pickle_in_npy": lambda s: s.update({"lmk3d.npy": _npy(np.array([{"x": 1}], dtype=object))}),
    "meta_not_object": lambda s: s.update({"meta.json": b"[1, 2, 3]"}),
}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory) -> tuple[str, dict[str, set[str]], dict[str, dict[str, str]]]:
    """``(root, good keys by split, bad keys by split and corruption)``: a train and a test shard,
    each with a good sample between every two bad ones (subjects differ per split)."""
    root = tmp_path_factory.mktemp("fuzz")
    good: dict[str, set[str]] = {}
    bad: dict[str, dict[str, str]] = {}
    infos = []
    for split in ("train", "test"):
        samples = []
        good[split], bad[split] = set(), {}
        for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
            ok = sh.encode_sample(make_face_sample(f"{split}good{i:02d}", "00", size=SIZE, seed=i))
            broken = sh.encode_sample(make_face_sample(f"{split}bad{i:02d}", "00", size=SIZE, seed=100 + i))
            corrupt(broken)
            samples += [ok, broken]
            good[split].add(ok["__key__"])
            bad[split][name] = broken["__key__"]
        buffer = io.BytesIO()
        with webdataset.TarWriter(buffer, mtime=0) as tar:
            for s in samples:
                tar.write(s)
        data = buffer.getvalue()
        url = str(root / f"{split}-000000.tar")
        Path(url).write_bytes(data)
        infos.append(sh.ShardInfo(url=url, split=split, count=len(samples), size=len(data),
                                  sha256=hashlib.sha256(data).hexdigest(), image_size=SIZE,
                                  keys=[s["__key__"] for s in samples],
                                  subjects=[f"{split}{kind}{i:02d}" for i in range(len(CORRUPTIONS))
                                            for kind in ("good", "bad")]))
    sh.write_manifest(str(root), infos, image_size=SIZE)
    return str(root), good, bad


def test_the_corruptions_are_real(fuzzed):
    """Each bad sample fails decoding on its own (the test can fail)."""
    root, _, bad = fuzzed
    assert len(bad["train"]) == len(CORRUPTIONS)
    png = sh.encode_sample(make_face_sample("x", "00", size=SIZE, seed=0))["front.png"]
    assert sh.image_header_size(_png_declaring(png, 16384, 16384)) == (16384, 16384)


def test_training_loader_yields_exactly_the_good_samples(fuzzed):
    from dfmvr.config import DataConfig
    from dfmvr.data.loader import make_loader

    root, good, bad = fuzzed
    loader = make_loader(DataConfig(url=root, image_size=SIZE, batch_size=4, num_workers=0), "train",
                         resampled=False, shuffle=False)
    keys = {k for batch in loader for k in batch.keys}
    assert keys == good["train"]
    assert loader.skipped == len(bad["train"])


def test_evaluation_reader_yields_the_good_and_names_the_bad(fuzzed):
    from dfmvr.data.samples import Skipped, make_decoder, plan_chunks, read_chunk

    root, good, bad = fuzzed
    manifest = sh.read_manifest(root)
    decoder = make_decoder(manifest, SIZE, with_gt=False)
    out = [x for chunk in plan_chunks(manifest, "test", 64) for x in read_chunk(chunk, decoder)]
    assert {x.key for x in out if not isinstance(x, Skipped)} == good["test"]
    skipped = {x.name: x.reason for x in out if isinstance(x, Skipped)}
    assert set(skipped) == set(bad["test"].values())
    huge = skipped[bad["test"]["huge_declared"]]
    assert "refused before decoding" in huge and "16384" in huge


def test_mask_filling_writes_exactly_the_good_samples(fuzzed, tmp_path):
    from dfmvr.nets import BiSeNet, save_parsenet

    root, good, bad = fuzzed
    net = save_parsenet(tmp_path / "parsenet.pt", BiSeNet(width=8), {"image_size": SIZE})
    out = tmp_path / "filled"
    res = subprocess.run([sys.executable, "-m", "sharding.fill_masks", "--input", root, "--out", str(out),
                          "--parse-net", str(net), "--device", "cpu"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    from dfmvr.config import DataConfig
    from dfmvr.data.loader import make_loader

    written = {k for split in ("train", "test")
               for batch in make_loader(DataConfig(url=str(out), image_size=SIZE, batch_size=4, num_workers=0), split,
                                        resampled=False, shuffle=False)
               for k in batch.keys}
    assert written == good["train"] | good["test"]
    for key in [*bad["train"].values(), *bad["test"].values()]:
        assert key in res.stdout + res.stderr
