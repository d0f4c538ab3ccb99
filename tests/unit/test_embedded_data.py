"""The embedded default's data: made on first use at the configured size, in its own folder."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_another_size_is_made_in_its_own_folder_and_then_reused(tmp_path):
    from dfmvr.config import apply_overrides
    from dfmvr.data.embedded import default_data_url, ensure_data
    from dfmvr.data.shards import read_manifest
    from dfmvr.presets import tiny

    cfg = apply_overrides(tiny(), {"work_dir": str(tmp_path), "data.image_size": 32, "render.image_size": 32})
    assert default_data_url(cfg) == str(tmp_path / "shards")
    small = apply_overrides(cfg, {"data.synth_subjects": 10, "data.synth_captures": 1})
    url = ensure_data(small)
    assert url == str(tmp_path / "shards-10x1")
    manifest = read_manifest(url)
    assert sum(s.count for s in manifest.splits.values()) == 10
    assert not (tmp_path / "shards").exists()
    stamp = Path(url, "manifest.json").stat().st_mtime_ns
    assert ensure_data(small) == url and Path(url, "manifest.json").stat().st_mtime_ns == stamp


def test_shards_another_configuration_made_are_made_again_and_user_shards_are_left_alone(tmp_path, caplog,
                                                                                          monkeypatch):
    import json
    import logging

    from dfmvr.config import apply_overrides
    from dfmvr.data.embedded import DATA_URL_ENV, ensure_data
    from dfmvr.data.shards import read_manifest
    from dfmvr.presets import tiny

    monkeypatch.delenv(DATA_URL_ENV, raising=False)
    cfg = apply_overrides(tiny(), {"work_dir": str(tmp_path), "data.image_size": 32, "render.image_size": 32,
                                   "data.synth_subjects": 6, "data.synth_captures": 1})
    url = ensure_data(cfg)
    assert read_manifest(url).extra["synth"]["seed"] == 0

    # another seed at the same dataset size: same folder, made again, and the log says why
    with caplog.at_level(logging.WARNING, logger="dfmvr.data.embedded"):
        assert ensure_data(apply_overrides(cfg, {"seed": 1})) == url
    assert "seed 0 there, 1 asked for" in caplog.text
    assert read_manifest(url).extra["synth"]["seed"] == 1

    # shards recorded as made by another face model (its code changed since): made again
    path = Path(url, "manifest.json")
    doc = json.loads(path.read_text())
    doc["extra"]["synth"]["facemodel"]["digest"] = "0123456789abcdef"
    path.write_text(json.dumps(doc))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dfmvr.data.embedded"):
        ensure_data(apply_overrides(cfg, {"seed": 1}))
    assert "another face model (digest 0123456789abcdef there" in caplog.text
    assert read_manifest(url).extra["synth"]["facemodel"]["digest"] != "0123456789abcdef"

    # the same shards named by data.url are the user's: used as they are, whatever the seed
    stamp = path.stat().st_mtime_ns
    assert ensure_data(apply_overrides(cfg, {"seed": 0, "data.url": url})) == url
    assert path.stat().st_mtime_ns == stamp


def test_a_relative_data_url_comes_back_absolute(tmp_path, monkeypatch):
    # the driver checks the manifest from its directory; Ray's workers open the shards from theirs
    from dfmvr.config import apply_overrides
    from dfmvr.data.embedded import DATA_URL_ENV, ensure_data
    from dfmvr.presets import tiny

    monkeypatch.delenv(DATA_URL_ENV, raising=False)
    cfg = apply_overrides(tiny(), {"work_dir": str(tmp_path), "data.image_size": 32, "render.image_size": 32,
                                   "data.synth_subjects": 4, "data.synth_captures": 1})
    made = ensure_data(cfg)
    monkeypatch.chdir(tmp_path)
    assert ensure_data(apply_overrides(cfg, {"data.url": Path(made).name})) == made
    monkeypatch.setenv(DATA_URL_ENV, Path(made).name)
    assert ensure_data(cfg) == made
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        ensure_data(apply_overrides(cfg, {"data.url": "nowhere"}))
