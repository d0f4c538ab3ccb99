"""The model a user gets from the main job: the paper's pipeline (parse net first, then the
reconstruction network with masks and the mask loss), one bundle that carries the parse net, the
``champion`` alias, ``mlflow.pyfunc`` and ``jobs/reconstruct.py`` on plain PNGs without masks.

One training job on loopback (real Ray, SQLite MLflow) serves every test in the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

NAME = "dfmvr-bundle-test"
SECRET = "hunter2-not-for-logs"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory):
    """``(summary, tracking_uri, work)`` of ``train()`` with the tiny preset's defaults for the
    parse net and the mask loss (no ``model.parse_net`` given), shortened."""
    import mlflow
    import ray

    from dfmvr.config import apply_overrides
    from dfmvr.presets import tiny
    from dfmvr.train.launch import train

    tmp = tmp_path_factory.mktemp("bundle")
    from dfmvr.data.synth import generate

    # enough validation subjects for two halves: the checkpoint is picked on one, reported on the other
    data = tmp / "shards"
    generate(str(data), n_subjects=12, n_captures=2, size=64, seed=3, workers=1, n_vertices=2500,
             splits=(0.5, 0.34, 0.16))
    scratch = Path("/tmp") / f"dfmvr-ray-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    scratch.mkdir(parents=True, exist_ok=True)
    old_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(scratch)
    ray.init(num_cpus=3, include_dashboard=False, _temp_dir=str(scratch), configure_logging=False)
    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        cfg = apply_overrides(tiny(), {
            "work_dir": str(tmp / "work"), "data.url": str(data), "data.batch_size": 4,
            "data.epoch_samples": 64, "data.shuffle_buffer": 16, "train.steps": 6, "train.val_every": 6,
            "train.ckpt_every": 6, "train.log_every": 3, "train.val_samples": 8, "train.num_workers": 1,
            "train.use_gpu": "false", "train.max_failures": 0, "tracking.tracking_uri": tracking,
            # the parse net trained first, from the tiny preset's recipe (the preset itself names
            # the builtin one: tests/unit/test_nets.py)
            "model.parse_net": "",
            "tracking.registered_model": NAME, "parsenet.steps": 4, "parsenet.val_every": 4,
            "parsenet.val_samples": 4, "parsenet.batch_size": 4,
            # a credential in a URI the job carries but never needs here (the data is local)
            "data.s3_endpoint": f"http://minio:{SECRET}@127.0.0.1:9",
        })
        summary = train(cfg)
    finally:
        ray.shutdown()
        if old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmp
    mlflow.set_tracking_uri(tracking)
    return summary, tracking, tmp


def test_main_job_trains_the_parse_net_first_and_bundles_it(trained):
    import mlflow

    from dfmvr.train.checkpoint import load_checkpoint, resolve_checkpoint

    summary, tracking, _ = trained
    assert summary["status"] == "FINISHED"
    assert summary["mask_loss"] is True and summary["parse_net"]
    client = mlflow.MlflowClient(tracking)
    parse_run = client.get_run(summary["parse_net_mlflow_run_id"])
    assert parse_run.info.status == "FINISHED" and parse_run.data.tags["dfmvr.job"] == "parsenet"
    run = client.get_run(summary["mlflow_run_id"])
    for r in (parse_run, run):  # the UI's User and Source columns
        assert r.data.tags.get("mlflow.user") and r.data.tags.get("mlflow.source.name"), r.data.tags
    assert "train/loss_mask" in run.data.metrics  # the mask loss ran from the start
    payload = load_checkpoint(resolve_checkpoint(summary["registered_model_uri"]))
    assert payload["parse_net"]["meta"]["n_classes"] == 10 and payload["parse_net"]["meta"]["arch"] == "unet"
    # the paper's pipeline: the network read the parse net's masks, made once into the mask cache
    from dfmvr.nets import parsenet_digest

    assert summary["masks"] == "parse_net" and payload["config"]["model"]["input_masks"] == "parse_net"
    assert summary["mask_cache"].endswith(f"/parsed-masks/{parsenet_digest(payload['parse_net'])}")
    # the parse net's per-class IoU, in the summary and its MLflow run
    assert set(summary["parse_net_iou"]) == {"background", "skin", "left_brow", "right_brow", "left_eye",
                                             "right_eye", "nose", "mouth", "upper_lip", "lower_lip"}
    finite = [v for v in summary["parse_net_iou"].values() if v is not None]
    assert summary["parse_net_min_class_iou"] == min(finite)
    assert {f"val/iou_{c}" for c in summary["parse_net_iou"]} <= set(parse_run.data.metrics)
    # the headline: the picked checkpoint on the other half of the validation subjects, with the
    # parse net's masks; the shards' own masks beside it; the half it was picked on apart
    assert summary["val_holdout"] is True and summary["val_samples"] == 4
    for key in ("val_gain_pct", "val_gain_pct_given_masks", "val_pick_gain_pct"):
        assert isinstance(summary[key], float), key
    assert summary["val_gain_pct"] != summary["val_pick_gain_pct"]
    assert {"report/gain_pct", "report/gain_pct_given_masks", "report/rmse_mm"} <= set(run.data.metrics)
    # the first version of a model becomes the champion
    assert summary["champion"] is True
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == summary["registered_model_uri"].rsplit("/", 1)[1]


def test_logged_model_requires_this_dfmvr_exactly(trained):
    import mlflow

    summary, _, tmp = trained
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp / "req")))
    lines = [ln.strip() for ln in (local / "requirements.txt").read_text().splitlines() if ln.strip()]
    dfmvr_lines = [ln for ln in lines if ln.split("@")[0].split("=")[0].strip() == "dfmvr"]
    assert dfmvr_lines and all(("@" in ln or "==" in ln) for ln in dfmvr_lines), lines


def _test_views(synth_root: Path, n: int) -> np.ndarray:
    """The first ``n`` test-split triplets as uint8 ``[n, 3, S, S, 3]`` (what a user's PNGs hold)."""
    from dfmvr.config import DataConfig
    from dfmvr.data.loader import make_loader

    cfg = DataConfig(url=str(synth_root), image_size=64)
    batch = next(iter(make_loader(cfg, "test", rank=0, world_size=1, resampled=False, shuffle=False,
                                  batch_size=n, num_workers=0)))
    return ((batch.images.permute(0, 1, 3, 4, 2).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def test_pyfunc_from_the_champion_alias_returns_meshes_without_masks(trained, synth_root):
    import mlflow.pyfunc

    summary, _, _ = trained
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    views = _test_views(synth_root, 2)
    out = model.predict({"images": views})
    n = out["vertices"].shape[1]
    assert out["vertices"].shape == (2, n, 3) and n > 2000 and np.isfinite(out["vertices"]).all()
    assert out["faces"].ndim == 2 and out["faces"].shape[1] == 3 and out["faces"].max() == n - 1
    # the bundled parse net made the masks: the same prediction as the library with them
    from dfmvr.serving import load

    rec = load(f"models:/{NAME}@champion")
    assert rec.parse_net is not None
    direct = rec.reconstruct(*views[0], aligned=True)
    np.testing.assert_allclose(out["vertices"][0], direct["vertices"], atol=1e-5)


def test_the_bundle_loads_from_s3_and_makes_its_own_masks(trained, synth_root, moto_s3, tmp_path):
    """The registered bundle copied to an S3 prefix: ``dfmvr.load("s3://...")`` brings its parse
    net and reconstructs views without masks exactly as from the registry."""
    from dfmvr.data import storage
    from dfmvr.serving import load
    from dfmvr.train.checkpoint import resolve_checkpoint

    summary, _, _ = trained
    # the registered model as MLflow stores it (MLmodel, artifacts/checkpoint/...), copied whole
    local = resolve_checkpoint(summary["registered_model_uri"], cache_dir=tmp_path / "bundle")
    for f in (p for p in local.rglob("*") if p.is_file()):
        storage.put_file(str(f), storage.join(moto_s3.url("bundle"), f.relative_to(local).as_posix()))
    views = _test_views(synth_root, 1)[0]
    from_s3 = load(moto_s3.url("bundle"))
    assert from_s3.parse_net is not None and from_s3.source == moto_s3.url("bundle")
    out = from_s3.reconstruct(*views, aligned=True)
    ref = load(summary["registered_model_uri"]).reconstruct(*views, aligned=True)
    np.testing.assert_allclose(out["vertices"], ref["vertices"], atol=1e-6)


def test_reconstruct_job_on_plain_pngs_without_masks(trained, synth_root, tmp_path):
    import cv2

    summary, tracking, _ = trained
    views = _test_views(synth_root, 3)
    assert len(views) >= 2
    inp = tmp_path / "photos"
    for i, triplet in enumerate(views):
        for name, img in zip(("left", "front", "right"), triplet):
            (inp / f"cap{i}").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(inp / f"cap{i}" / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "reconstruct.py"), "--checkpoint",
                          f"models:/{NAME}@champion", "--input", str(inp), "--aligned", "--out", str(out),
                          "--summary-json", str(tmp_path / "summary.json"), f"tracking.tracking_uri={tracking}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "summary.json").read_text())
    assert result["n_done"] == len(views) and result["n_skipped"] == 0, result
    for i in range(len(views)):
        assert (out / f"cap{i}" / "mesh.obj").stat().st_size > 0
        assert (out / f"cap{i}" / "overlay.png").is_file()


def test_champion_moves_only_to_a_better_version(trained):
    import mlflow

    from dfmvr import bundle as tr
    from dfmvr.train.checkpoint import resolve_checkpoint

    summary, tracking, _ = trained
    client = mlflow.MlflowClient(tracking)
    first = str(client.get_model_version_by_alias(NAME, "champion").version)
    ckpt = resolve_checkpoint(summary["registered_model_uri"])
    score = summary["val_rmse_mm"]
    worse = tr.register_best(summary["mlflow_run_id"], ckpt, NAME, {"val/rmse_mm": score + 1.0})
    assert worse["champion"] is False and worse["previous_champion"] == first
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == first
    better = tr.register_best(summary["mlflow_run_id"], ckpt, NAME, {"val/rmse_mm": score - 0.5})
    assert better["champion"] is True
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == better["version"]


def test_bad_bundles_and_uris_name_the_uri(trained, tmp_path):
    import torch

    from dfmvr.serving import load
    from dfmvr.train.checkpoint import load_checkpoint, resolve_checkpoint

    summary, _, _ = trained
    with pytest.raises(FileNotFoundError, match=f"models:/{NAME}@nosuchalias"):
        load(f"models:/{NAME}@nosuchalias")
    payload = load_checkpoint(resolve_checkpoint(summary["registered_model_uri"]))
    # a parse net with another class count
    bad = tmp_path / "bad-classes"
    bad.mkdir()
    wrong = dict(payload, parse_net=dict(payload["parse_net"], meta=dict(payload["parse_net"]["meta"], n_classes=7)))
    torch.save(wrong, bad / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"bundled in .*bad-classes.*7 classes, expected 10"):
        load(str(bad))
    # a bundle without its parse net, whose config names a file that is gone: the network reads
    # the parse net's masks, so it cannot run; refused at load, naming the checkpoint
    gone = tmp_path / "no-parse-net"
    gone.mkdir()
    stripped = {k: v for k, v in payload.items() if k != "parse_net"}
    stripped["config"] = dict(payload["config"], model=dict(payload["config"]["model"], parse_net="/nonexistent/p.pt"))
    torch.save(stripped, gone / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"no-parse-net: the network reads the parse net's masks .* none is bundled"):
        load(str(gone))


def test_no_credential_in_params_tags_artifacts_checkpoints_or_summary(trained):
    import mlflow

    from dfmvr.train.checkpoint import resolve_checkpoint

    summary, tracking, tmp = trained
    assert SECRET not in json.dumps(summary, default=str)
    client = mlflow.MlflowClient(tracking)
    for run_id in (summary["mlflow_run_id"], summary["parse_net_mlflow_run_id"]):
        run = client.get_run(run_id)
        assert SECRET not in json.dumps([run.data.params, run.data.tags])
        assert run.data.params["data.s3_endpoint"] == "http://127.0.0.1:9"
        config = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.json",
                                                          dst_path=str(tmp / run_id)))
        assert SECRET not in config.read_text()
    ckpt = resolve_checkpoint(summary["registered_model_uri"])
    for f in ckpt.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_loading_by_uri_leaves_no_temporary_folder(trained):
    import tempfile

    from dfmvr.serving import load

    summary, _, _ = trained

    def ours():
        return {p.name for p in Path(tempfile.gettempdir()).glob("dfmvr-ckpt-*")}

    before = ours()
    for uri in (f"models:/{NAME}@champion", summary["registered_model_uri"], summary["model_uri"]):
        assert load(uri).parse_net is not None
    assert ours() == before


def test_dfmvr_load_finds_the_champion_where_the_jobs_logged_it(trained, tmp_path):
    """``dfmvr.load("models:/NAME@champion")`` looks where the jobs log: ``MLFLOW_TRACKING_URI``,
    else ``work/mlflow.db`` of the folder it runs in; it creates no store, and a wrong name's error
    names the store it searched."""
    import shutil

    _, tracking, _ = trained
    store = Path(tracking.removeprefix("sqlite:///"))
    project = tmp_path / "project"
    (project / "work").mkdir(parents=True)
    shutil.copy(store, project / "work" / "mlflow.db")  # the artifacts stay where the job wrote them
    code = ("import sys, dfmvr\n"
            "rec = dfmvr.load(sys.argv[1])\n"
            "print('loaded', rec.model.face.model.n_vertices, rec.parse_net is not None)\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    def run(cwd: Path, uri: str, **extra) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, uri], cwd=cwd, env={**env, **extra}, capture_output=True,
                              text=True, timeout=300)

    # from the project folder, with the embedded store only
    res = run(project, f"models:/{NAME}@champion")
    assert res.returncode == 0 and "loaded" in res.stdout and "True" in res.stdout, res.stderr[-2000:]
    # from anywhere, with MLFLOW_TRACKING_URI set
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run(elsewhere, f"models:/{NAME}@champion", MLFLOW_TRACKING_URI=tracking)
    assert res.returncode == 0 and "loaded" in res.stdout, res.stderr[-2000:]
    # a wrong name: the error names the store it searched
    res = run(project, "models:/no-such-model@champion")
    assert res.returncode != 0
    assert "models:/no-such-model@champion" in res.stderr and str(project / "work" / "mlflow.db") in res.stderr
    # no store at all: said so, and nothing is created
    res = run(elsewhere, f"models:/{NAME}@champion")
    assert res.returncode != 0 and "no MLflow store to look in" in res.stderr, res.stderr[-2000:]
    assert sorted(p.name for p in elsewhere.iterdir()) == []
