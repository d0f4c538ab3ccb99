"""The embedded default's data: made on first use at the configured size, in its own folder."""

from __future__ import annotations

from pathlib import Path


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
