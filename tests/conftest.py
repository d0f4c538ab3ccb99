"""Shared fixtures: a real moto S3 server on loopback, and small random-but-valid face samples.

``moto_s3`` starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 (one per test session; a fresh
bucket per test), points ``AWS_ENDPOINT_URL`` and dummy credentials at it through
``monkeypatch`` and yields an :class:`S3Env`. ``make_face_sample`` draws a "face" (an ellipse
with feature blobs for every parsing class) into three views with matching masks and
landmarks; it needs no renderer.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pytest

from dfmvr.data.shards import VIEWS, Sample

FAKE_ACCESS_KEY = "AKIAFAKEDFMVRTESTKEY"
FAKE_SECRET_KEY = "fake-secret-dfmvr-0123456789abcdefghij"


@dataclass(frozen=True)
class S3Env:
    """A bucket on the test's moto server."""

    endpoint: str
    """``http://127.0.0.1:PORT``."""
    bucket: str
    """Bucket created for this test."""

    def url(self, prefix: str = "") -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self):
        """A plain boto3 client on the server (for assertions)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=FAKE_ACCESS_KEY,
            aws_secret_access_key=FAKE_SECRET_KEY,
            region_name="us-east-1",
        )


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on loopback for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    """A fresh bucket on the moto server, with the AWS environment pointing at it."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    env = S3Env(endpoint=moto_server, bucket=f"dfmvr-test-{uuid.uuid4().hex[:12]}")
    env.client().create_bucket(Bucket=env.bucket)
    return env


def _ibug_template() -> np.ndarray:
    """68 points in a unit face box (x right, y down), roughly in iBUG order and placement."""
    points = []
    points += [(0.1 + 0.8 * t, 0.35 + 0.55 * np.sin(np.pi * t)) for t in np.linspace(0, 1, 17)]  # jaw 0-16
    points += [(0.2 + 0.2 * t, 0.3) for t in np.linspace(0, 1, 5)]  # brow 17-21
    points += [(0.6 + 0.2 * t, 0.3) for t in np.linspace(0, 1, 5)]  # brow 22-26
    points += [(0.5, 0.4 + 0.15 * t) for t in np.linspace(0, 1, 4)]  # nose bridge 27-30
    points += [(0.42 + 0.16 * t, 0.6) for t in np.linspace(0, 1, 5)]  # nostrils 31-35
    for cx in (0.3, 0.7):  # eyes 36-47
        points += [(cx + 0.07 * np.cos(a), 0.4 + 0.03 * np.sin(a)) for a in np.linspace(np.pi, -np.pi, 6, endpoint=False)]
    points += [(0.5 + 0.15 * np.cos(a), 0.75 + 0.06 * np.sin(a)) for a in np.linspace(np.pi, -np.pi, 12, endpoint=False)]
    points += [(0.5 + 0.1 * np.cos(a), 0.75 + 0.03 * np.sin(a)) for a in np.linspace(np.pi, -np.pi, 8, endpoint=False)]
    template = np.asarray(points, dtype=np.float32)
    assert template.shape == (68, 2)
    return template


_TEMPLATE = _ibug_template()


def make_face_sample(
    subject: str,
    capture: str,
    *,
    size: int = 64,
    seed: int = 0,
    image_format: str = "png",
    with_lmk3d: bool = True,
    with_gt: bool = False,
    with_coeffs: bool = True,
) -> Sample:
    """A random but valid sample: noisy background, an ellipse "face" per view with a blob of
    every feature class, masks that match the drawing, and landmarks inside the face box."""
    rng = np.random.default_rng(seed)
    images, masks, lmk2d = {}, {}, []
    for index, view in enumerate(VIEWS):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        cx = size * (0.5 + 0.08 * (index - 1)) + rng.uniform(-2, 2)
        cy = size * 0.5 + rng.uniform(-2, 2)
        ax, ay = size * 0.28, size * 0.36
        cv2.ellipse(mask, (int(cx), int(cy)), (int(ax), int(ay)), 0, 0, 360, 1, -1)
        for cls in range(2, 10):
            fx = cx + ax * (0.55 * np.cos(cls) )
            fy = cy + ay * (0.55 * np.sin(cls))
            cv2.circle(mask, (int(fx), int(fy)), max(1, size // 32), int(cls), -1)
        skin = rng.integers(120, 230, 3)
        image[mask > 0] = (skin + rng.integers(-10, 10, (int((mask > 0).sum()), 3))).clip(0, 255).astype(np.uint8)
        images[view] = image
        masks[view] = mask
        box = np.array([cx - ax, cy - ay], np.float32)
        lmk2d.append(box + _TEMPLATE * np.array([2 * ax, 2 * ay], np.float32))
    sample = Sample(
        subject=subject,
        capture=capture,
        images=images,
        masks=masks,
        lmk2d=np.stack(lmk2d).astype(np.float32),
        lmk3d=rng.normal(size=(7, 3)).astype(np.float32) if with_lmk3d else None,
        coeffs=rng.normal(size=269).astype(np.float32) if with_coeffs else None,
        meta={"yaw_deg": [-45.0, 0.0, 45.0], "source": "test-ellipses"},
        image_format=image_format,
    )
    if with_gt:
        n = int(rng.integers(10, 30))
        sample.gt = {
            "vertices": rng.normal(size=(n, 3)).astype(np.float32),
            "faces": rng.integers(0, n, (2 * n, 3)).astype(np.int32),
            "units": "dm",
        }
    return sample


@pytest.fixture
def face_sample():
    """The :func:`make_face_sample` factory."""
    return make_face_sample


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic dataset (8 subjects x 2 captures, 64 px, the tiny face model), one per
    test module that asks for it."""
    from dfmvr.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(str(root), n_subjects=8, n_captures=2, size=64, seed=3, workers=1, n_vertices=2500)
    return root
