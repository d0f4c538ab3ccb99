"""The mask cache (``dfmvr.data.parsed_masks``, ``dfmvr.train.masks``): the parse net's masks of
every sample made once, read back by the loader in place of the samples' own, keyed to the parse
net, stale when the shards change, and every bad entry named and skipped."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dfmvr.config import apply_overrides
from dfmvr.data import parsed_masks
from dfmvr.data.loader import make_loader
from dfmvr.data.shards import VIEWS, ShardInfo, ShardWriter, read_manifest, shard_samples, write_manifest
from dfmvr.model import frozen_parse_net
from dfmvr.nets import create_parsenet, parsenet_digest, read_parsenet_file, save_parsenet
from dfmvr.train.parsing import predict_masks
from dfmvr.presets import tiny
from dfmvr.train.masks import MaskCacheMissing, ensure_mask_cache, find_mask_cache
from tests.conftest import make_face_sample

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_dataset(root: Path) -> str:
    infos = []
    for split, subjects in (("train", range(4)), ("val", range(4, 6))):
        with ShardWriter(str(root), split, max_count=3) as writer:
            for s in subjects:
                for c in range(2):
                    writer.write(make_face_sample(f"s{s:02d}", f"c{c}", size=SIZE, seed=10 * s + c))
        infos += writer.shards
    write_manifest(str(root), infos, image_size=SIZE)
    return str(root)


def parse_net_file(path: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    net = create_parsenet("unet", width=4).train()
    with torch.no_grad():  # BatchNorm statistics off their defaults: the masks are not all one class
        net(torch.randn(4, 3, SIZE, SIZE))
    save_parsenet(path, net.eval(), {"image_size": SIZE})
    return read_parsenet_file(path)


def config(data_url: str, **more):
    return apply_overrides(tiny(), {"data.url": data_url, "data.image_size": SIZE, "data.num_workers": 0,
                                    "data.batch_size": 4, **more})


@pytest.fixture
def dataset(tmp_path) -> str:
    return write_dataset(tmp_path / "shards")


def test_the_cache_holds_what_a_fresh_pass_of_the_parse_net_makes(dataset, tmp_path):
    cfg = config(dataset)
    bundle = parse_net_file(tmp_path / "a.pt", seed=0)
    with pytest.raises(MaskCacheMissing, match=rf"no current mask cache of parse net {parsenet_digest(bundle)}"):
        find_mask_cache(cfg, bundle)
    cache, info = ensure_mask_cache(cfg, bundle, device="cpu")
    assert info["made"] and info["samples"] == 12 and not info["skipped"]
    assert cache.url == f"{dataset}/parsed-masks/{parsenet_digest(bundle)}"
    again, info = ensure_mask_cache(cfg, bundle, device="cpu")
    assert not info["made"] and again.companions == cache.companions  # current: made once

    # the same net loaded afresh, computing as the cache's did (bf16 where this CPU has it natively)
    net = frozen_parse_net(read_parsenet_file(tmp_path / "a.pt"), "a.pt", "cpu", amp=cfg.train.parse_net_amp)
    for split in ("train", "val"):
        loader = make_loader(cfg.data, split, rank=0, world_size=1, resampled=False, shuffle=False,
                             mask_cache=cache, keep_given_masks=True)
        plain = make_loader(cfg.data, split, rank=0, world_size=1, resampled=False, shuffle=False)
        for batch, own in zip(loader, plain, strict=True):
            assert batch.mask_source == f"parse_net:{parsenet_digest(bundle)}" and own.mask_source == "given"
            assert batch.keys == own.keys
            views = ((own.images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            fresh = predict_masks(net, views.flatten(0, 1).permute(0, 2, 3, 1).numpy())
            assert torch.equal(batch.masks, torch.from_numpy(fresh).long().view_as(batch.masks))
            assert torch.equal(batch.given_masks, own.masks)  # the samples' own, kept beside
            assert not torch.equal(batch.masks, own.masks)
            assert not torch.equal(batch.weights, own.weights)  # the weight map follows the parse net's masks


def test_another_parse_net_finds_no_cache_and_changed_shards_find_it_stale(dataset, tmp_path):
    cfg = config(dataset)
    a, b = parse_net_file(tmp_path / "a.pt", seed=0), parse_net_file(tmp_path / "b.pt", seed=1)
    assert parsenet_digest(a) != parsenet_digest(b)
    cache_a, _ = ensure_mask_cache(cfg, a, device="cpu")
    with pytest.raises(MaskCacheMissing):
        find_mask_cache(cfg, b)
    cache_b, info = ensure_mask_cache(cfg, b, device="cpu")
    assert info["made"] and cache_b.url != cache_a.url
    assert find_mask_cache(cfg, a).url == cache_a.url  # each parse net keeps its own

    # a shard packed again (other bytes): the cache no longer speaks for it
    manifest = read_manifest(dataset)
    with ShardWriter(dataset, "val", max_count=3) as writer:
        for s in (4, 5):
            writer.write(make_face_sample(f"s{s:02d}", "c0", size=SIZE, seed=999 + s))
    keep = [sh for name, sp in manifest.splits.items() if name != "val" for sh in sp.shards]
    infos = [ShardInfo(url=sh.url, split="train", count=sh.count, size=sh.size, sha256=sh.sha256, image_size=SIZE,
                       keys=[], subjects=sh.subjects) for sh in keep] + writer.shards
    write_manifest(dataset, infos, image_size=SIZE)
    with pytest.raises(MaskCacheMissing):
        find_mask_cache(cfg, a)
    cache, info = ensure_mask_cache(cfg, a, device="cpu")
    # only the new shard's masks are made: the companions of unchanged shards stay
    assert info["made"] and info["samples"] == 2 and find_mask_cache(cfg, a).url == cache.url


def test_a_sample_the_cache_lacks_is_skipped_named_and_counted(dataset, tmp_path, caplog):
    cfg = config(dataset)
    bundle = parse_net_file(tmp_path / "a.pt", seed=0)
    cache, _ = ensure_mask_cache(cfg, bundle, device="cpu")
    first_train = read_manifest(dataset).split("train").shards[0]
    companion = Path(cache.companions[first_train.url])
    with tarfile.open(companion) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(companion, "w") as tar:  # drop the first sample's masks, garble the second's
        for m, data in members:
            if m.name.startswith("s00-c0."):
                continue
            if m.name.startswith("s00-c1.left"):
                data = b"not a png"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    loader = make_loader(cfg.data, "train", rank=0, world_size=1, resampled=False, shuffle=False, mask_cache=cache)
    keys = [k for batch in loader for k in batch.keys]
    assert "s00-c0" not in keys and "s00-c1" not in keys and len(keys) == 6
    assert loader.skipped == 2
    text = caplog.text
    assert "s00-c0" in text and "the mask cache has no" in text
    assert "s00-c1" in text and "cached mask 'left.parsed.png' is undecodable" in text


def test_a_loader_of_a_split_the_cache_does_not_cover_is_refused(dataset, tmp_path):
    cfg = config(dataset)
    bundle = parse_net_file(tmp_path / "a.pt", seed=0)
    cache, _ = ensure_mask_cache(cfg, bundle, splits=("train",), device="cpu")
    with pytest.raises(ValueError, match=r"covers no companion for 2 shard\(s\) of split 'val'"):
        make_loader(cfg.data, "val", rank=0, world_size=1, resampled=False, mask_cache=cache)


def test_a_cache_root_elsewhere_and_a_broken_cache_manifest(dataset, tmp_path):
    cfg = config(dataset, **{"data.parsed_masks_root": str(tmp_path / "masks")})
    bundle = parse_net_file(tmp_path / "a.pt", seed=0)
    cache, _ = ensure_mask_cache(cfg, bundle, device="cpu")
    assert cache.url.startswith(str(tmp_path / "masks" / "parsed-masks"))
    assert not (Path(dataset) / "parsed-masks").exists()  # the shard root is left as it was
    record = json.loads((Path(cache.url) / "manifest.json").read_text())
    assert record["format"] == "dfmvr-parsed-masks" and record["splits"] == ["train", "val"]
    assert record["entries"] == [f"{v}.parsed.png" for v in VIEWS]
    (Path(cache.url) / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest.json: not a mask-cache manifest \(bad JSON"):
        find_mask_cache(cfg, bundle)


def test_companion_entries_join_their_samples_by_key(dataset, tmp_path):
    cfg = config(dataset)
    bundle = parse_net_file(tmp_path / "a.pt", seed=0)
    cache, _ = ensure_mask_cache(cfg, bundle, device="cpu")
    url = read_manifest(dataset).split("val").shards[0].url
    with shard_samples(url, companions=[cache.companions[url]]) as samples:
        joined = list(samples)
    assert [s["__key__"] for s in joined] == ["s04-c0", "s04-c1", "s05-c0"]
    for raw in joined:
        masks = parsed_masks.decode_masks(raw, SIZE)
        assert masks.shape == (3, SIZE, SIZE) and masks.dtype == np.uint8 and "left.png" in raw
