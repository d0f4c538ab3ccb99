"""The training loop without Ray, and the job's checks that fail before Ray starts."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfmvr.config import apply_overrides
from dfmvr.presets import tiny
from dfmvr.train.checkpoint import load_checkpoint
from dfmvr.train.loop import LocalSession, NonFiniteLossError, run_loop

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from dfmvr.data.synth import generate

    root = tmp_path_factory.mktemp("loop-shards")
    generate(str(root), n_subjects=6, n_captures=2, size=64, seed=5, workers=1, n_vertices=2500)
    return root


def _cfg(shards: Path, **extra):
    # the loop's mechanics need no parse net: the shards' own masks, unless a test asks otherwise
    base = {"data.url": str(shards), "data.num_workers": 0, "data.batch_size": 2, "data.epoch_samples": 16,
            "data.shuffle_buffer": 8, "train.steps": 4, "train.val_every": 4, "train.ckpt_every": 2,
            "train.log_every": 2, "train.val_samples": 2, "loss.mask_loss": False, "model.input_masks": "given"}
    base.update(extra)
    return apply_overrides(tiny(), base)


def test_local_loop_checkpoints_and_resumes(shards, tmp_path):
    session = LocalSession(tmp_path / "a")
    last = run_loop(_cfg(shards), session)
    assert last["step"] == 4
    assert [c.name for c in session.checkpoints] == ["step-0000002", "step-0000004"]
    payload = load_checkpoint(session.checkpoints[-1])
    assert payload["step"] == 4 and payload["config"]["train"]["steps"] == 4
    assert payload["optimizer"]["state"], "optimizer state is saved"
    assert "val/rmse_mm" in payload["metrics"] and "val/mean_face_rmse_mm" in payload["metrics"]

    # continue the same run to 6 steps from its last checkpoint: steps 5 and 6 only
    steps = []
    resumed = LocalSession(tmp_path / "b", restore_from=str(session.checkpoints[-1]))
    run_loop(_cfg(shards, **{"train.steps": 6}), resumed, on_step=steps.append)
    assert steps == [5, 6]


def test_time_budget_ends_the_run_on_a_decayed_rate(shards, tmp_path):
    """A maximum far beyond what the deadline allows: rank 0 fits the run to the time left, the
    decay moves with it, and the run ends validated and checkpointed on the schedule's floor; its
    checkpoint keeps the fitted plan for a restart within the job, not for a later job's resume."""
    cfg = _cfg(shards, **{"train.steps": 100_000, "optim.cosine_after": 60_000, "train.val_every": 100_000,
                          "train.ckpt_every": 100_000, "train.log_every": 2, "optim.min_lr_ratio": 0.01})
    session = LocalSession(tmp_path / "budget")
    steps: list[int] = []
    # long enough for the 20 steps the budget times before it fits a plan, on a loaded machine too
    deadline = time.time() + 20.0
    last = run_loop(cfg, session, on_step=steps.append, deadline=deadline)
    final = steps[-1]
    assert 20 < final < 100_000 and steps == list(range(1, final + 1))
    assert last["step"] == final and last["train/steps_planned"] == final
    assert last["train/lr"] == pytest.approx(cfg.optim.lr * 0.01)  # the decay ran to its end
    assert "val/rmse_mm" in last
    payload = load_checkpoint(session.checkpoints[-1])
    plan = payload["extra"]["plan"]
    assert payload["step"] == plan["steps"] == final and 0 < plan["cosine_after"] < final

    # a worker group restarted within the job (the same deadline) keeps the plan: nothing is left
    steps.clear()
    run_loop(cfg, LocalSession(tmp_path / "restarted", restore_from=str(session.checkpoints[-1])),
             on_step=steps.append, deadline=deadline)
    assert steps == []
    # a later job resumes it with a budget of its own: it trains its own train.steps, not the plan
    resumed = LocalSession(tmp_path / "resumed", restore_from=str(session.checkpoints[-1]))
    run_loop(_cfg(shards, **{"train.steps": final + 2}), resumed, on_step=steps.append,
             deadline=time.time() + 600.0)
    assert steps == [final + 1, final + 2]


def test_non_finite_losses_stop_with_the_last_good_state(shards, tmp_path, caplog):
    good = LocalSession(tmp_path / "good")
    run_loop(_cfg(shards, **{"train.steps": 2}), good)
    before = load_checkpoint(good.checkpoints[-1])

    # an infinite loss weight makes every step's loss non-finite: each is skipped and counted,
    # and after train.max_nan_steps in a row the run stops with a checkpoint of the weights it had
    bad = LocalSession(tmp_path / "bad", restore_from=str(good.checkpoints[-1]))
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row at step 2.*max_nan_steps=3"):
        run_loop(_cfg(shards, **{"loss.photo": float("inf"), "train.max_nan_steps": 3, "train.steps": 8}), bad)
    assert sum("non-finite loss" in r.getMessage() for r in caplog.records) == 3
    assert bad.reports[-1]["train/nan_steps"] == 3
    after = load_checkpoint(bad.checkpoints[-1])
    assert after["step"] == 2
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key]), key


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(*args: str, env_extra: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def test_unknown_key_and_bad_value_fail_before_ray(tmp_path):
    t0 = time.perf_counter()
    bad_key = _job("optim.lrr=1e-4", f"work_dir={tmp_path}")
    assert bad_key.returncode == 2
    assert "optim.lrr" in bad_key.stderr and "'lr'" in bad_key.stderr
    bad_value = _job("model.regressor=vgg", "render.backend=opengl", f"work_dir={tmp_path}")
    assert bad_value.returncode == 2 and "render.backend" in bad_value.stderr and "pytorch3d" in bad_value.stderr
    assert not (tmp_path / "ray_results").exists()
    assert time.perf_counter() - t0 < 60  # generous: it is about not starting Ray, not speed


def test_unreachable_mlflow_server_fails_fast_without_credentials(tmp_path):
    port = _closed_port()
    res = _job(f"work_dir={tmp_path}", f"tracking.tracking_uri=http://alice:s3cr3t@127.0.0.1:{port}")
    assert res.returncode != 0
    assert f"http://127.0.0.1:{port}" in res.stderr and "unreachable" in res.stderr
    assert "s3cr3t" not in res.stderr + res.stdout
    assert not (tmp_path / "shards").exists()


def test_unreachable_s3_endpoint_fails_fast_with_the_url(tmp_path):
    port = _closed_port()
    res = _job(f"work_dir={tmp_path}", "data.url=s3://nobucket/shards", f"data.s3_endpoint=http://127.0.0.1:{port}",
               f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
               env_extra={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY": "topsecretvalue"})
    assert res.returncode != 0
    assert "s3://nobucket/shards/manifest.json" in res.stderr and f"127.0.0.1:{port}" in res.stderr
    assert "topsecretvalue" not in res.stderr + res.stdout


@pytest.mark.parametrize("log_images", [True, False])
def test_validation_grids_follow_tracking_log_images(shards, tmp_path, log_images):
    import mlflow

    from dfmvr.train.ray_worker import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("loop", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    run_loop(_cfg(shards, **{"tracking.log_images": log_images}), LocalSession(tmp_path / "ckpt"),
             tracker=RunLogger(uri, run_id))
    grids = [a.path for a in client.list_artifacts(run_id, "val_images")]
    assert grids == (["val_images/val_step0000004.png"] if log_images else [])
    assert "val/loss" in client.get_run(run_id).data.metrics, "metrics are logged either way"


@pytest.mark.parametrize("input_masks", ["given", "parse_net"])
def test_validation_scores_the_other_masks_beside_the_ones_the_model_reads(shards, tmp_path, input_masks):
    """A model that reads the samples' own masks is also scored with the parse net's as input
    (what photos without mask files get); one that reads the parse net's (from the mask cache) is
    also scored on the shards' exact masks (the upper bound), and its checkpoint loads with the
    parse net it needs."""
    from dfmvr.nets import BiSeNet, read_parsenet_file, save_parsenet
    from dfmvr.serving import Reconstructor
    from dfmvr.tracking import GIVEN_MASKS_METRIC, PARSED_MASKS_METRIC
    from dfmvr.train.masks import MaskCacheMissing, ensure_mask_cache
    from dfmvr.train.report import holdout_report

    torch.manual_seed(0)
    net = save_parsenet(tmp_path / "parsenet.pt", BiSeNet(width=8), {"image_size": 64})
    cfg = _cfg(shards, **{"train.steps": 2, "train.val_every": 2, "model.input_masks": input_masks,
                          "model.parse_net": str(net), "data.parsed_masks_root": str(tmp_path / "masks")})
    session = LocalSession(tmp_path / "run")
    if input_masks == "parse_net":
        with pytest.raises(MaskCacheMissing, match="no current mask cache of parse net"):
            run_loop(cfg, session, parse_net=read_parsenet_file(net))
        ensure_mask_cache(cfg, read_parsenet_file(net), device="cpu")
    last = run_loop(cfg, session, parse_net=read_parsenet_file(net))
    assert math.isfinite(last["val/rmse_mm"])
    # training's validations score what the model reads; the holdout report adds the other masks
    assert GIVEN_MASKS_METRIC not in last and PARSED_MASKS_METRIC not in last
    report = holdout_report(apply_overrides(cfg, {"train.holdout_report": False}), session.checkpoints[-1],
                            read_parsenet_file(net), device="cpu")
    assert math.isfinite(report["report/rmse_mm"])
    if input_masks == "given":
        # an untrained parse net's masks are nothing like the shards': another score
        other = report["report/rmse_mm_parse_net_masks"]
        assert "report/rmse_mm_given_masks" not in report
    else:
        other = report["report/rmse_mm_given_masks"]
        assert "report/rmse_mm_parse_net_masks" not in report
    assert math.isfinite(other) and other != report["report/rmse_mm"]
    if input_masks == "parse_net":
        recon = Reconstructor.from_checkpoint(session.checkpoints[-1])
        assert recon.model.input_parse_net is recon.parse_net is not None
        images = torch.rand(1, 3, 3, 64, 64) * 2 - 1
        given = torch.ones(1, 3, 64, 64, dtype=torch.long)
        # masks that come with the views are not what the network reads: its parse net's are
        assert torch.equal(recon.predict(images, given).shape, recon.predict(images).shape)
        payload = load_checkpoint(session.checkpoints[-1])
        payload.pop("parse_net")
        with pytest.raises(ValueError, match=r"ckpt: the network reads the parse net's masks \(model.input_masks"):
            Reconstructor.from_payload(payload, "ckpt", overrides={"model.parse_net": ""})


def test_a_parse_net_run_without_a_parse_net_is_refused(shards, tmp_path):
    with pytest.raises(ValueError, match="model.input_masks is parse_net but the job has no parse net"):
        run_loop(_cfg(shards, **{"model.input_masks": "parse_net"}), LocalSession(tmp_path / "x"))


def test_validation_picks_on_one_half_of_the_subjects_and_the_report_scores_the_other(tmp_path):
    from dfmvr.data.synth import generate
    from dfmvr.train.loop import _val_batches, validate, validation_halves
    from dfmvr.facemodel import build_face_model
    from dfmvr.model import DFMVR

    root = tmp_path / "shards"
    generate(str(root), n_subjects=10, n_captures=2, size=64, seed=5, workers=1, n_vertices=2500,
             splits=(0.6, 0.4, 0.0))
    cfg = _cfg(root)
    pick, report = validation_halves(cfg)
    assert len(pick) == len(report) == 2 and not pick & report
    model = DFMVR(cfg.model, cfg.render, build_face_model(cfg.facemodel))
    seen = []
    for subjects in (pick, report, None):
        batches = list(_val_batches(cfg)())
        metrics, _ = validate(model, iter(batches), cfg, subjects=subjects)
        seen.append(metrics["val/samples"])
    assert seen == [4.0, 4.0, 8.0]  # two captures of each of two subjects, or all eight triplets
    # the loader can leave the other half undecoded: the same triplets
    assert {s for b in _val_batches(cfg, subjects=pick)() for s in b.subjects} == set(pick)
    assert validation_halves(apply_overrides(cfg, {"train.holdout_report": False})) == (None, None)
