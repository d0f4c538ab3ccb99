"""Checkpoints are data: a file that would run code when unpickled is refused, by name, and
the code never runs (``torch.load(weights_only=True)`` in every loader)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MARKER_ENV = "DFMVR_TEST_PICKLE_MARKER"


class _Payload:
    """Unpickling this calls ``os.system``: what a hostile checkpoint would do."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ[MARKER_ENV]}",))


def _hostile(path: Path, body: dict) -> Path:
    torch.save(body, path)
    return path


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    m = tmp_path / "ran"
    monkeypatch.setenv(MARKER_ENV, str(m))
    return m


def test_the_payload_runs_code_when_unpickled_freely(tmp_path, marker):
    """The hostile file is real: a plain (non-weights-only) load runs its code."""
    f = _hostile(tmp_path / "checkpoint.pt", {"format_version": 1, "model": _Payload()})
    torch.load(f, weights_only=False)
    assert marker.exists()


def test_reconstruction_checkpoint_with_a_pickle_payload_is_refused(tmp_path, marker):
    from dfmvr.train.checkpoint import load_checkpoint

    d = tmp_path / "ckpt"
    d.mkdir()
    _hostile(d / "checkpoint.pt", {"format_version": 1, "model": {"w": torch.zeros(1)}, "extra": _Payload()})
    with pytest.raises(ValueError, match=r"ckpt/checkpoint.pt: cannot be read as a dfmvr checkpoint"):
        load_checkpoint(d)
    assert not marker.exists()


def test_parse_net_with_a_pickle_payload_is_refused(tmp_path, marker):
    from dfmvr.nets import load_parsenet

    f = _hostile(tmp_path / "parsenet.pt", {"format": "x", "meta": _Payload(), "state_dict": {}})
    with pytest.raises(ValueError, match=r"parsenet.pt: not a readable torch checkpoint"):
        load_parsenet(f)
    assert not marker.exists()
