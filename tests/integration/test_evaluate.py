"""jobs/evaluate.py and jobs/reconstruct.py end to end on a checkpoint trained here.

One module fixture makes a small synthetic dataset, trains the tiny preset for a few dozen steps
with :class:`LocalSession` (no Ray), logs it into a temporary SQLite MLflow store and registers
it, so a plain path, ``runs:/`` and ``models:/`` all name the same checkpoint. The model is
barely trained: these tests check what the jobs produce and that the numbers are the ones the
metrics give, not that the model is good.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ICP_ITERS = "30"  # ICP converges in 5-10 iterations on these meshes; the cap bounds a badly predicted face


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import mlflow

    from dfmvr import tracking
    from dfmvr.config import apply_overrides
    from dfmvr.presets import tiny
    from dfmvr.train.loop import LocalSession, run_loop
    from dfmvr.train.ray_worker import RunLogger
    from dfmvr.data.synth import generate

    root = tmp_path_factory.mktemp("eval")
    shards = root / "shards"
    # 12 subjects: 18 training triplets, 2 validation, 4 test (2 subjects)
    generate(str(shards), n_subjects=12, n_captures=2, size=64, seed=11, workers=1, n_vertices=2500,
             splits=(0.75, 0.083, 0.167))
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # the jobs (subprocesses) find the store here
        mlflow.set_tracking_uri(tracking_uri)
        experiment = tracking.setup_experiment(tracking_uri, "dfmvr-eval-test", root / "work")
        run_id = mlflow.start_run(experiment_id=experiment, run_name="tiny").info.run_id
        mlflow.end_run()
        # the default pipeline: the network reads its parse net's masks (an untrained one here: the
        # jobs' outputs are checked, not the model's quality), made once into the mask cache
        from dfmvr.nets import create_parsenet, read_parsenet_file, save_parsenet
        from dfmvr.train.masks import ensure_mask_cache

        torch.manual_seed(0)
        parse_net = save_parsenet(root / "parsenet.pt", create_parsenet("unet", width=4).eval(), {"image_size": 64})
        cfg = apply_overrides(tiny(), {
            "data.url": str(shards), "data.num_workers": 0, "data.batch_size": 4, "data.epoch_samples": 32,
            "data.shuffle_buffer": 8, "train.steps": 30, "train.val_every": 30, "train.ckpt_every": 30,
            "train.log_every": 10, "train.val_samples": 2, "loss.mask_loss": False, "work_dir": str(root / "work"),
            "model.parse_net": str(parse_net),
        })
        bundle = read_parsenet_file(parse_net)
        ensure_mask_cache(cfg, bundle, device="cpu")
        session = LocalSession(root / "ckpts")
        last = run_loop(cfg, session, tracker=RunLogger(tracking_uri, run_id), parse_net=bundle)
        checkpoint = session.checkpoints[-1]
        from dfmvr.bundle import register_best

        reg = register_best(run_id, checkpoint, "dfmvr-eval-test", {"val/rmse_mm": last["val/rmse_mm"]})
        yield SimpleNamespace(root=root, shards=shards, checkpoint=checkpoint, run_id=run_id, tracking_uri=tracking_uri,
                              runs_uri=reg["model_uri"], models_uri=reg["registered_uri"], cfg=cfg)


def _job(name: str, *args: str, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(REPO / "jobs" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _ray_env(tmp: Path) -> dict:
    # Ray's scratch on a short path (unix socket paths are limited to about 107 bytes)
    scratch = Path("/tmp") / f"dfmvr-ev-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    scratch.mkdir(parents=True, exist_ok=True)
    return {"RAY_TMPDIR": str(scratch), "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(tmp)}


def _finite(x) -> bool:
    return isinstance(x, float) and np.isfinite(x)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_job_on_ray_matches_in_process_and_logs_to_the_run(trained, tmp_path):
    """The job (models:/ URI, the split spread over Ray tasks) and the library in this process
    (plain path, no Ray) give the same per-sample numbers; the job logs to the training run."""
    from mlflow import MlflowClient

    from dfmvr.evaluate.metrics import NOW_LANDMARKS_IBUG, now_error
    from dfmvr.evaluate.run import EvalConfig, evaluate
    from dfmvr.serving import load

    out = tmp_path / "job"
    env = _ray_env(tmp_path)
    try:
        res = _job("evaluate.py", "--checkpoint", trained.models_uri, "--out", str(out), "--ray-threshold", "1",
                   "--chunk-size", "1", "--max-samples", "3", "--overlays", "1", "--icp-iters", ICP_ITERS,
                   "--device", "cpu", "--summary-json", str(tmp_path / "summary.json"), env_extra=env)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["ray"] is True and summary["chunks"] == 3 and summary["samples"] == 3
    assert summary["input_masks"] == "parse_net"  # the network read its parse net's masks, as photos meet it
    for key in ("now_mean_mm", "now_median_mm", "p2p_rmse_mm", "vertex_rmse_mm"):
        assert _finite(summary[key]), key
        for baseline in ("mean_face", "single_view"):
            assert _finite(summary["baselines"][baseline][key]), (baseline, key)
    assert "mean face" in res.stdout and "single view" in res.stdout and "now_mean_mm" in res.stdout

    # best and worst overlays, and one JSON line per sample with every method
    pngs = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(pngs) == 2 and pngs[0].startswith("best_01_") and pngs[1].startswith("worst_01_")
    overlay = cv2.imread(str(out / "overlays" / pngs[0]))
    assert overlay is not None and overlay.shape[1] == 6 * 160 and overlay.std() > 10
    lines = [json.loads(x) for x in (out / "per_sample.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all({"model", "mean_face", "single_view"} <= set(x) for x in lines)
    ranked = sorted(lines, key=lambda x: x["model"]["now_mean_mm"])
    assert pngs[0] == f"best_01_{ranked[0]['key']}.png" and pngs[1] == f"worst_01_{ranked[-1]['key']}.png"

    # MLflow: eval/<split>/... on the training run at the checkpoint's step, plus the files
    client = MlflowClient(trained.tracking_uri)
    run = client.get_run(trained.run_id)
    assert summary["mlflow"]["run_id"] == trained.run_id
    assert run.data.metrics["eval/test/now_mean_mm"] == pytest.approx(summary["now_mean_mm"])
    assert run.data.metrics["eval/test/mean_face/p2p_rmse_mm"] == pytest.approx(
        summary["baselines"]["mean_face"]["p2p_rmse_mm"])
    assert client.get_metric_history(trained.run_id, "eval/test/now_mean_mm")[0].step == 30
    artifacts = {a.path for a in client.list_artifacts(trained.run_id, "eval/test")}
    assert {"eval/test/summary.json", "eval/test/per_sample.jsonl", "eval/test/overlays"} <= artifacts

    # the same samples in this process from the plain checkpoint path, with the forward passes of
    # the Ray tasks: one sample, one thread. Another batch size or thread count moves the
    # predicted vertices by ~1e-4 mm (float32 rounding), and ICP on a poorly fitting face (a flat
    # error landscape) turns that into ~1e-3 of the per-sample NoW median (docs/evaluation.md)
    recon = load(trained.checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = evaluate(recon, EvalConfig(split="test", out=str(tmp_path / "lib"), max_samples=3, n_overlays=1,
                                            batch_size=1, icp_iters=int(ICP_ITERS)))
    finally:
        torch.set_num_threads(threads)
    assert report.summary["ray"] is False and report.summary["chunks"] == 1
    by_key = {x["key"]: x for x in lines}
    assert sorted(by_key) == sorted(r["key"] for r in report.records)
    for rec in report.records:
        for method in ("model", "mean_face", "single_view"):
            for k, v in rec[method].items():
                assert by_key[rec["key"]][method][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (rec["key"], method, k)

    # the baselines are what they claim: the mean face's NoW error computed directly, and the
    # single-view numbers come from the model fed the front view three times
    from dfmvr.data.shards import read_manifest
    from dfmvr.data.samples import make_decoder, plan_chunks, read_chunk

    manifest = read_manifest(str(trained.shards))
    item = next(read_chunk(plan_chunks(manifest, "test", 1)[0], make_decoder(manifest, 64, with_gt=True)))
    fm = recon.model.face.model
    kp = fm.keypoints.numpy()
    mean = fm.mean_shape.double().numpy()
    gt = item.gt_vertices.astype(np.float64)
    direct = now_error(mean, fm.tri.numpy(), mean[kp][list(NOW_LANDMARKS_IBUG)], gt, item.gt_faces,
                       gt[kp][list(NOW_LANDMARKS_IBUG)], icp_iters=int(ICP_ITERS))
    assert by_key[item.key]["mean_face"]["now_mean_mm"] == pytest.approx(direct.mean_mm, rel=1e-6)
    from dfmvr.train.metrics import aligned_vertex_rmse_mm

    images = torch.from_numpy(item.images)[None]
    masks = torch.from_numpy(item.masks.astype(np.int64))[None]
    single = recon.predict(images[:, [1, 1, 1]], masks[:, [1, 1, 1]])
    expected = float(aligned_vertex_rmse_mm(single.shape.double(), torch.from_numpy(gt)[None])[0])
    assert by_key[item.key]["single_view"]["vertex_rmse_mm"] == pytest.approx(expected, rel=1e-5)
    full = recon.predict(images, masks)
    assert by_key[item.key]["model"]["vertex_rmse_mm"] == pytest.approx(
        float(aligned_vertex_rmse_mm(full.shape.double(), torch.from_numpy(gt)[None])[0]), rel=1e-5)
    # and they are two reconstructions from two inputs (a model trained for 30 steps barely reacts to
    # its input: seen 1e-3 mm between the two shapes and 3e-4 between the coefficients)
    assert not torch.equal(single.coeffs, full.coeffs)


def _raw_samples(shards: Path, split: str) -> list[dict]:
    """The encoded samples (webdataset dicts of bytes) of a split, in manifest order, with their
    evaluation companions' entries (the meshes)."""
    import tarfile

    from dfmvr.data.shards import read_manifest

    samples: dict[str, dict] = {}
    for shard in read_manifest(str(shards)).split(split).shards:
        assert shard.eval_url, f"{shard.url}: the synthetic shards keep their meshes in an evaluation companion"
        for url in (shard.url, shard.eval_url):
            with tarfile.open(url) as tar:
                for member in tar.getmembers():
                    key, entry = member.name.split(".", 1)
                    samples.setdefault(key, {"__key__": key})[entry] = tar.extractfile(member).read()
    return list(samples.values())


def _write_shard(root: Path, split: str, samples: list[dict], image_size: int) -> None:
    """Write samples as given (no validation: some are broken on purpose) and a manifest."""
    import hashlib

    import webdataset

    from dfmvr.data.shards import ShardInfo, write_manifest

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{split}-000000.tar"
    with webdataset.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    subjects = sorted({json.loads(s["meta.json"])["subject"] for s in samples})
    info = ShardInfo(url=str(path), split=split, count=len(samples), size=path.stat().st_size,
                     sha256=hashlib.sha256(path.read_bytes()).hexdigest(), image_size=image_size,
                     keys=[s["__key__"] for s in samples], subjects=subjects)
    write_manifest(str(root), [info], image_size=image_size)


def _renamed(sample: dict, subject: str) -> dict:
    out = dict(sample)
    meta = json.loads(out["meta.json"])
    meta["subject"] = subject
    out["meta.json"] = json.dumps(meta).encode()
    out["__key__"] = f"{subject}-{meta['capture']}"
    return out


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_bad_samples_are_skipped_named_and_listed(trained, tmp_path):
    """A scan without faces, NaN scan vertices, landmarks outside the image and a missing view:
    each is skipped with its key, shard and problem; the good sample is still scored."""
    good = _raw_samples(trained.shards, "test")[0]
    with np.load(io.BytesIO(good["gt.npz"])) as z:
        verts, faces = z["vertices"], z["faces"]
    nofaces = _renamed(good, "nofaces")
    nofaces["gt.npz"] = _npz(vertices=verts, faces=np.zeros((0, 3), np.int32), units=np.array("dm"))
    nanverts = _renamed(good, "nanverts")
    bad_verts = verts.copy()
    bad_verts[5] = np.nan
    nanverts["gt.npz"] = _npz(vertices=bad_verts, faces=faces, units=np.array("dm"))
    outside = _renamed(good, "lmkoutside")
    lmk = np.load(io.BytesIO(good["lmk2d.npy"])).copy()
    lmk[2, 10] = (80.0, 30.0)  # 16 px right of a 64 px image (a few px are tolerated: chins get cut)
    buf = io.BytesIO()
    np.save(buf, lmk)
    outside["lmk2d.npy"] = buf.getvalue()
    noleft = _renamed(good, "noleft")
    del noleft["left.png"]
    root = tmp_path / "bad"
    # written as one tar with the meshes inside (the layout before evaluation companions): still read
    _write_shard(root, "test", [nofaces, good, nanverts, outside, noleft], 64)

    from dfmvr.evaluate.run import EvalConfig, evaluate
    from dfmvr.serving import load

    report = evaluate(load(trained.checkpoint), EvalConfig(out=str(tmp_path / "out"), n_overlays=1,
                                                           icp_iters=int(ICP_ITERS)), data_url=str(root))
    assert [r["key"] for r in report.records] == [good["__key__"]]
    reasons = {s.name: s for s in report.skipped}
    assert sorted(reasons) == ["lmkoutside-e00", "nanverts-e00", "nofaces-e00", "noleft-e00"]
    shard = str(root / "test-000000.tar")
    assert all(s.source == shard for s in report.skipped)
    assert "nofaces-e00" in reasons["nofaces-e00"].reason and "scan has no faces" in reasons["nofaces-e00"].reason
    assert "non-finite" in reasons["nanverts-e00"].reason and "gt['vertices']" in reasons["nanverts-e00"].reason
    assert "outside" in reasons["lmkoutside-e00"].reason and "'right'" in reasons["lmkoutside-e00"].reason
    assert "left.png" in reasons["noleft-e00"].reason and shard in reasons["noleft-e00"].reason
    listed = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert listed["n_skipped"] == 4 and {s["name"] for s in listed["skipped"]} == set(reasons)

    # the job goes on past them (exit 0) and lists them, each with its shard and problem, at the end
    res = _job("evaluate.py", "--checkpoint", str(trained.checkpoint), "--out", str(tmp_path / "job"),
               "--overlays", "1", "--icp-iters", ICP_ITERS, "--device", "cpu", "--no-mlflow", f"data.url={root}")
    assert res.returncode == 0, res.stderr[-3000:]
    tail = res.stdout.split("skipped 4 sample(s):")[1].strip().splitlines()
    assert sorted(line.split()[0] for line in tail) == sorted(reasons)
    assert all(f"({shard})" in line for line in tail)


# --------------------------------------------------------------------------- loading


def test_path_s3_runs_and_models_uris_load_the_same_weights(trained, moto_s3):
    import mlflow

    from dfmvr.data import storage
    from dfmvr.serving import load

    for f in trained.checkpoint.iterdir():
        storage.put_file(str(f), storage.join(moto_s3.url("ckpt"), f.name))
    mlflow.set_tracking_uri(trained.tracking_uri)
    uris = [str(trained.checkpoint), moto_s3.url("ckpt"), trained.runs_uri, trained.models_uri]
    models = [load(u) for u in uris]
    rng = np.random.default_rng(0)
    left, front, right = (rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3))
    masks = [rng.integers(0, 10, (64, 64), dtype=np.uint8) for _ in range(3)]
    outputs = [m.reconstruct(left, front, right, masks, aligned=True) for m in models]
    reference = models[0].model.state_dict()
    for uri, m, out in zip(uris, models, outputs):
        state = m.model.state_dict()
        assert state.keys() == reference.keys()
        for k in reference:
            assert torch.equal(state[k], reference[k]), (uri, k)
        np.testing.assert_array_equal(out["coeffs"], outputs[0]["coeffs"])
        assert m.source == uri
    import dfmvr

    assert dfmvr.load(trained.runs_uri).payload["step"] == 30


def test_checkpoint_of_another_face_model_or_layout_is_refused(trained, tmp_path):
    res = _job("evaluate.py", "--checkpoint", str(trained.checkpoint), "--out", str(tmp_path / "x"),
               "facemodel.n_vertices=3000")
    assert res.returncode == 2
    err = res.stderr
    assert str(trained.checkpoint) in err
    assert "procedural:seed=0:n=2499" in err and "n_vertices: checkpoint 2499 vs model" in err
    assert not (tmp_path / "x").exists()

    # weights for another coefficient layout (here: two views instead of three) are refused by name
    from dfmvr.serving import Reconstructor
    from dfmvr.train.checkpoint import load_checkpoint

    payload = load_checkpoint(trained.checkpoint)
    with pytest.raises(ValueError, match=r"checkpoint other\.pt: weights do not fit the model"):
        Reconstructor.from_payload(payload, "other.pt", overrides={"model.view_yaw_deg": [-45.0, 45.0]})


# --------------------------------------------------------------------------- reconstruct


def _capture_folders(trained, root: Path) -> dict[str, np.ndarray]:
    """Four capture folders from the test split: ``png`` (64 px with masks), ``jpg128`` (upscaled to
    128 px, JPEG, with masks), ``nomask`` (no masks: the parse net makes them) and ``noleft``."""
    from dfmvr.data.shards import VIEWS, decode_sample

    samples = [decode_sample(s) for s in _raw_samples(trained.shards, "test")]
    layouts = {"png": (samples[0], 64, "png", True), "jpg128": (samples[1], 128, "jpg", True),
               "nomask": (samples[2], 64, "png", False), "noleft": (samples[3], 64, "png", True)}
    for name, (sample, size, ext, with_masks) in layouts.items():
        d = root / name
        d.mkdir(parents=True)
        for view in VIEWS:
            if name == "noleft" and view == "left":
                continue
            img = cv2.resize(sample.images[view], (size, size), interpolation=cv2.INTER_LINEAR)
            cv2.imwrite(str(d / f"{view}.{ext}"), img[..., ::-1])
            if with_masks:
                cv2.imwrite(str(d / f"{view}.mask.png"),
                            cv2.resize(sample.masks[view], (size, size), interpolation=cv2.INTER_NEAREST))
    return {name: layout[0] for name, layout in layouts.items()}


def test_reconstruct_job_writes_every_file_and_skips_a_capture_missing_a_view(trained, tmp_path):
    import trimesh

    from dfmvr.nets.parsenet import BiSeNet, save_parsenet
    from dfmvr.serving import load

    captures = tmp_path / "captures"
    samples = _capture_folders(trained, captures)
    torch.manual_seed(0)
    parse_net = save_parsenet(tmp_path / "parsenet.pt", BiSeNet(width=16), {"image_size": 64})
    out = tmp_path / "out"
    res = _job("reconstruct.py", "--checkpoint", trained.runs_uri, "--input", str(captures), "--out", str(out),
               "--device", "cpu", "--aligned", f"model.parse_net={parse_net}", "--summary-json", str(tmp_path / "s.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert sorted(d["name"] for d in summary["done"]) == ["jpg128", "nomask", "png"]
    assert [s["name"] for s in summary["skipped"]] == ["noleft"]
    reason = summary["skipped"][0]["reason"]
    assert str(captures / "noleft") in reason and "'left'" in reason
    assert "noleft" in res.stdout.split("skipped 1 capture(s):")[1]

    recon = load(trained.checkpoint, overrides={"model.parse_net": str(parse_net)})
    fm = recon.model.face.model
    n, f = fm.n_vertices, fm.n_faces
    for name in ("png", "jpg128", "nomask"):
        d = out / name
        for fname in ("mesh.obj", "mesh_albedo.ply", "mesh_shaded.ply", "coeffs.npz", "landmarks3d.txt", "overlay.png"):
            assert (d / fname).is_file(), (name, fname)
        meshes = {fname: trimesh.load(d / fname, process=False) for fname in ("mesh.obj", "mesh_albedo.ply",
                                                                               "mesh_shaded.ply")}
        for fname, mesh in meshes.items():
            assert mesh.vertices.shape == (n, 3) and mesh.faces.shape == (f, 3), fname
            np.testing.assert_array_equal(mesh.faces, fm.tri.numpy())
            assert mesh.visual.kind == "vertex", fname
        np.testing.assert_allclose(meshes["mesh_albedo.ply"].vertices, meshes["mesh.obj"].vertices, atol=1e-4)
        albedo = meshes["mesh_albedo.ply"].visual.vertex_colors[:, :3].astype(int)
        shaded = meshes["mesh_shaded.ply"].visual.vertex_colors[:, :3].astype(int)
        assert np.abs(meshes["mesh.obj"].visual.vertex_colors[:, :3].astype(int) - albedo).max() <= 1
        assert np.abs(albedo - shaded).mean() > 1  # lighting changes the colours
        coeffs = np.load(d / "coeffs.npz")
        assert coeffs["coeffs"].shape == (269,) and coeffs["id"].shape == (80,) and coeffs["angles"].shape == (3, 3)
        lmk = np.loadtxt(d / "landmarks3d.txt")
        np.testing.assert_allclose(lmk, meshes["mesh.obj"].vertices[fm.keypoints.numpy()], atol=1e-3)
        overlay = cv2.imread(str(d / "overlay.png"))
        assert overlay.shape[1] == 6 * 192

    # the Python API gives the same mesh as the job (units: the files are in mm)
    from dfmvr.data.shards import VIEWS

    s = samples["png"]
    api = recon.reconstruct(*(s.images[v] for v in VIEWS), masks=[s.masks[v] for v in VIEWS], aligned=True)
    obj = trimesh.load(out / "png" / "mesh.obj", process=False)
    np.testing.assert_allclose(obj.vertices, api["vertices"] * 100, atol=1e-3)
    np.testing.assert_allclose(np.load(out / "png" / "coeffs.npz")["coeffs"], api["coeffs"], rtol=1e-5, atol=1e-6)

    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet.shape == (96 + 18, 3 * 3 * 96, 3) and summary["contact_sheet"] == str(out / "contact_sheet.png")


def test_reconstruct_from_shards_draws_the_given_landmarks(trained, tmp_path):
    from dfmvr.reconstruct import ReconstructConfig, reconstruct_shards
    from dfmvr.serving import load

    summary = reconstruct_shards(load(trained.checkpoint), str(trained.shards), "test",
                                 ReconstructConfig(out=str(tmp_path), batch_size=3), max_samples=4)
    assert len(summary.done) == 4 and not summary.skipped
    for d in summary.done:
        assert (Path(d["dir"]) / "mesh_shaded.ply").is_file() and d["source"].endswith("test-000000.tar")
    overlay = cv2.imread(str(Path(summary.done[0]["dir"]) / "overlay.png"))[..., ::-1]
    green = (overlay[..., 1] > 200) & (overlay[..., 0] < 80) & (overlay[..., 2] < 80)
    assert green.sum() > 50  # the given landmarks, drawn green


def test_fitting_in_evaluate_and_reconstruct_beats_the_network_and_reports_every_term(trained, tmp_path):
    """--fit-steps: the fit is scored beside the network alone, each term before and after; the
    reconstruction's overlays show both, at the tile's resolution, and mesh_photo.ply is written."""
    import trimesh

    from dfmvr.evaluate.run import EvalConfig, evaluate
    from dfmvr.reconstruct import ReconstructConfig, reconstruct_shards
    from dfmvr.serving import load

    recon = load(trained.checkpoint)
    report = evaluate(recon, EvalConfig(out=str(tmp_path / "eval"), max_samples=4, batch_size=4, icp_iters=30,
                                        n_overlays=1, fit_steps=40))
    s = report.summary
    assert s["fit_steps"] == 40 and s["fit_from"] == "network" and s["fit"]["samples"] == 4
    net = s["baselines"]["network"]
    assert s["vertex_rmse_mm"] < net["vertex_rmse_mm"] and s["now_mean_mm"] < net["now_mean_mm"]
    for term in ("lm2d", "photo", "total"):
        assert s["fit"]["after"][term] < s["fit"]["before"][term], term

    summary = reconstruct_shards(recon, str(trained.shards), "test",
                                 ReconstructConfig(out=str(tmp_path / "rec"), batch_size=2, tile=128, fit_steps=20),
                                 max_samples=2)
    assert len(summary.done) == 2 and not summary.skipped
    for d in summary.done:
        fit = d["fit"]
        assert fit["steps"] == 20 and fit["after"]["total"] < fit["before"]["total"]
        folder = Path(d["dir"])
        overlay = cv2.imread(str(folder / "overlay.png"))
        assert overlay.shape[1] == 6 * 128 and overlay.shape[0] == 2 * (128 + 18)  # network row, fitted row
        photo = trimesh.load(folder / "mesh_photo.ply", process=False)
        albedo = trimesh.load(folder / "mesh_albedo.ply", process=False)
        np.testing.assert_allclose(photo.vertices, albedo.vertices, atol=1e-4)
        # colours from the views: they differ from the albedo where the views see the face
        assert np.abs(photo.visual.vertex_colors[:, :3].astype(int) - albedo.visual.vertex_colors[:, :3]).mean() > 1


def test_reconstruct_job_without_any_usable_capture_exits_1(trained, tmp_path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "in" / "a" / "front.png"), np.zeros((64, 80, 3), np.uint8))
    res = _job("reconstruct.py", "--checkpoint", str(trained.checkpoint), "--input", str(tmp_path / "in"),
               "--out", str(tmp_path / "out"), "--device", "cpu", "--aligned")
    assert res.returncode == 1
    assert "missing view(s) ['left', 'right']" in res.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_done"] == 0 and summary["contact_sheet"] is None
