"""Ray Tune sweeps end to end on loopback: shards on a moto S3 server, MLflow in a temporary
SQLite store, a real local Ray started by ``jobs/tune.py``; ASHA, a crashing trial, a driver
killed mid-sweep and ``--resume``; bad input; the angle test sets.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_train_ray import _stop_processes_mentioning, _upload_tree

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

LRS = {"good": 3e-3, "fair": 1e-3, "frozen": 1e-9, "diverging": 1e30}
"""One learning rate per trial, in the order Tune starts them (two at a time): two that learn
(``good`` beats ``fair`` at step 4, so ASHA stops ``fair`` there when ``good`` reports first, and
lets it finish otherwise: a race), one that stays at the mean face (both earlier trials beat it at
step 4: ASHA stops it there, always) and one whose first step blows the weights up (every later
loss is non-finite: the trial crashes)."""


@pytest.fixture
def scratch():
    """A short Ray temp dir (unix socket paths are limited to about 107 bytes); every process
    started under it is stopped afterwards (never ``ray stop``: it stops every Ray on the machine)."""
    path = Path("/tmp") / f"dfmvr-tune-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    (path / "tmp").mkdir(parents=True)
    try:
        yield path
    finally:
        _stop_processes_mentioning(str(path))


def _env(scratch: Path) -> dict[str, str]:
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", RAY_USAGE_STATS_ENABLED="0", MPLBACKEND="Agg",
                PYTHONUNBUFFERED="1", RAY_TMPDIR=str(scratch), TMPDIR=str(scratch / "tmp"))


def _experiment_states(path: Path) -> dict[str, str]:
    """Trial id -> status in Tune's newest saved experiment state ({} before the first save)."""
    states = sorted(path.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
        trials = [json.loads(t[0]) for t in data["trial_data"]]
    except (json.JSONDecodeError, KeyError, IndexError, OSError):
        return {}  # caught mid-write
    return {t["trial_id"]: t["status"] for t in trials}


@pytest.mark.slow
def test_sweep_with_asha_a_crash_and_a_killed_driver_resumes_and_tracks_every_trial(synth_root, moto_s3, tmp_path,
                                                                                   scratch):
    import mlflow

    data_url = moto_s3.url("shards")
    _upload_tree(synth_root, data_url)
    work = tmp_path / "work"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = ",".join(f"{lr:g}" for lr in LRS.values())
    sweep = [sys.executable, "jobs/tune.py", "preset=tiny", f"work_dir={work}", f"data.url={data_url}",
             f"tracking.tracking_uri={tracking}", "data.batch_size=2", "data.num_workers=0", "data.epoch_samples=64",
             "data.shuffle_buffer=8", "train.steps=8", "train.val_every=4", "train.ckpt_every=4",
             "train.log_every=4", "train.val_samples=8", "train.max_failures=0", "train.max_nan_steps=3",
             "loss.mask_loss=false", "model.parse_net=", "parsenet.steps=4", "parsenet.val_every=4",
             "parsenet.val_samples=4",
             "parsenet.batch_size=2", "tune.name=lr", "tune.max_concurrent_trials=2", "tune.reduction_factor=4",
             f"tune.space.optim.lr=grid({space})"]
    experiment = work / "tune_results" / "lr"

    # 1. start the sweep; kill its driver once Tune has saved a finished trial
    log1 = (tmp_path / "driver1.log").open("w")
    driver = subprocess.Popen(sweep, cwd=REPO, env=_env(scratch), stdout=log1, stderr=subprocess.STDOUT)
    killed_with: dict[str, str] = {}
    deadline = time.time() + 480
    while driver.poll() is None and time.time() < deadline:
        states = _experiment_states(experiment)
        if "TERMINATED" in states.values():
            driver.send_signal(signal.SIGKILL)
            killed_with = states
            break
        time.sleep(0.5)
    driver.wait(timeout=60)
    assert killed_with, "no trial finished before the deadline:\n" + (tmp_path / "driver1.log").read_text()[-4000:]
    assert len([s for s in killed_with.values() if s == "TERMINATED"]) < 4, "the sweep ended before the kill"
    _stop_processes_mentioning(str(scratch))  # the dead driver's Ray

    # 2. resume: the remaining trials run, finished ones are kept
    summary_path = tmp_path / "summary.json"
    resumed = subprocess.run([sys.executable, "jobs/tune.py", "--resume", f"work_dir={work}", "tune.name=lr",
                              "--summary-json", str(summary_path)],
                             cwd=REPO, env=_env(scratch), capture_output=True, text=True, timeout=600)
    (tmp_path / "driver2.log").write_text(resumed.stdout + resumed.stderr)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "| trial | variant | seeds | val RMSE (mm) | train time | status |" in resumed.stdout  # printed

    summary = json.loads(summary_path.read_text())
    assert (summary["trials"], summary["finished"] + summary["stopped"], summary["failed"]) == (4, 3, 1)
    folder = work / "sweeps" / "lr"
    results = json.loads((folder / "results.json").read_text())
    by_lr = {}
    for t in results["trials"]:
        by_lr[next(k for k, lr in LRS.items() if math.isclose(t["params"]["optim.lr"], lr))] = t
    assert by_lr["good"]["status"] == "finished" and by_lr["good"]["steps"] == 8
    assert (by_lr["fair"]["status"], by_lr["fair"]["steps"] == 8) in (("finished", True), ("stopped", False))
    stopped, failed = by_lr["frozen"], by_lr["diverging"]
    assert stopped["status"] == "stopped" and stopped["steps"] < 8  # ASHA, at its first rung
    assert stopped["val_rmse_mm"] > max(by_lr["good"]["val_rmse_mm"], by_lr["fair"]["val_rmse_mm"])
    assert failed["status"] == "failed" and "NonFiniteLossError" in failed["error"]

    # the table and the chart agree with the trials
    table = (folder / "results.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines() if line.startswith("| trial-")}
    assert len(rows) == 4
    for t in results["trials"]:
        row = rows[t["name"]]
        if t["val_rmse_mm"] is None:
            assert row[3] == "-"
        else:
            assert row[3] == f"{t['val_rmse_mm']:.4f}"
    assert rows[failed["name"]][5].startswith("1 failed: dfmvr.train.loop.NonFiniteLossError")
    assert rows[stopped["name"]][5] == f"1 stopped early at step {stopped['steps']}"
    assert (folder / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # MLflow: the parent with the sweep's params and results, a child per trial with its own
    client = mlflow.MlflowClient(tracking)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.space.optim.lr"] == f"grid({space})"
    assert parent.data.params["tune.name"] == "lr" and parent.data.params["train.steps"] == "8"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.md", "results.png", "results.json"}
    assert parent.data.metrics["trials/failed"] == 1 and parent.data.metrics["trials/stopped"] == summary["stopped"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["dfmvr.trial_id"] for c in children) == sorted(t["trial_id"] for t in results["trials"])
    expected_status = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
    for child in children:
        t = next(t for t in results["trials"] if t["trial_id"] == child.data.tags["dfmvr.trial_id"])
        assert child.info.run_id == t["run_id"]
        assert child.info.status == expected_status[t["status"]], (t["name"], child.info.status)
        assert child.data.tags["dfmvr.trial_status"] == t["status"]
        assert math.isclose(float(child.data.params["optim.lr"]), t["params"]["optim.lr"])
        if t["status"] == "failed":
            assert "NonFiniteLossError" in child.data.tags["dfmvr.error"]
            assert "error.txt" in {a.path for a in client.list_artifacts(child.info.run_id)}
            continue
        history = [m.value for m in client.get_metric_history(child.info.run_id, "val/rmse_mm")]
        # the table's number is one the trial logged. Not always the history's minimum: a trial
        # running when the driver was killed may have logged a validation whose report never
        # reached the driver; --resume reruns it from its last checkpoint, so the history also
        # holds that lost attempt's value (same step, logged twice)
        assert any(v == pytest.approx(t["val_rmse_mm"], abs=1e-6) for v in history), (history, t["val_rmse_mm"])
        assert child.data.metrics["best/val_rmse_mm"] == pytest.approx(t["val_rmse_mm"], abs=1e-6)
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 1  # metrics per report
        assert "checkpoint" in {a.path for a in client.list_artifacts(child.info.run_id)}

    # the best trial's checkpoint loads back from its child run
    from dfmvr.serving import load

    mlflow.set_tracking_uri(tracking)
    assert summary["best_trial"] == by_lr["good"]["name"]
    rec = load(summary["best_checkpoint"])
    assert rec.cfg.optim.lr == pytest.approx(LRS["good"]) and rec.payload["step"] == 8

    # one parse net for the whole sweep, trained before the first trial and kept by --resume
    # (one parse-net run in MLflow), bundled in the trials' checkpoints
    assert summary["parse_net"] == str(work.resolve() / "parsenet" / "parsenet.pt")
    parse_runs = client.search_runs([parent.info.experiment_id], filter_string="tags.`dfmvr.job` = 'parsenet'")
    assert len(parse_runs) == 1 and parse_runs[0].info.status == "FINISHED"
    assert rec.payload["parse_net"]["meta"]["image_size"] == 64 and rec.parse_net is not None

    # trials that had ended before the kill were not run again: one process, each step once
    ended_before = [tid for tid, s in killed_with.items() if s == "TERMINATED"]
    assert ended_before
    for tid in ended_before:
        journal = work / "runs" / f"lr-{tid}" / "steps.jsonl"
        records = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        assert [r["step"] for r in records] == list(range(1, len(records) + 1)), tid
        assert len({r["pid"] for r in records}) == 1, tid


def _tune_main():
    spec = importlib.util.spec_from_file_location("dfmvr_jobs_tune", REPO / "jobs" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("args,fragments", [
    (["tune.space.loss.photoo=loguniform(4,64)"], ["tune.space.loss.photoo", "not a config field", "photo"]),
    (["tune.space.loss.photo=lognormal(4,64)"], ["unknown distribution 'lognormal'", "loguniform"]),
    (["--preset", "ablation", "tune.space.model.backbone=choice(cnn,vit)"], ["model.backbone", "'vit'"]),
    (["--preset", "ablations"], ["--preset: expected one of"]),
    (["--resume", "tune.name=never-ran"], ["--resume: no sweep to resume", "never-ran"]),
])
def test_bad_input_fails_before_anything_starts(args, fragments, tmp_path, capsys):
    import ray

    work = tmp_path / "work"
    rc = _tune_main()([f"work_dir={work}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *args])
    err = capsys.readouterr().err
    assert rc == 2
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (work / "sweeps").exists()


def test_angle_sets_differ_only_in_side_view_yaw_and_evaluate_a_checkpoint(synth_root, tmp_path):
    from dfmvr.config import apply_overrides
    from dfmvr.data.shards import read_manifest
    from dfmvr.presets import tiny
    from dfmvr.train.loop import LocalSession, run_loop
    from dfmvr.tune.angles import evaluate_angles, make_angle_sets, metric_name
    from dfmvr.data.synth import iter_shard_samples

    cfg = apply_overrides(tiny(), {
        "data.url": str(synth_root), "data.num_workers": 0, "data.batch_size": 2, "data.epoch_samples": 16,
        "data.shuffle_buffer": 8, "train.steps": 2, "train.val_every": 2, "train.ckpt_every": 2, "train.log_every": 2,
        "train.val_samples": 2, "loss.mask_loss": False, "facemodel.n_vertices": 2500,
        "model.input_masks": "given",  # the angle sets' mechanics; no parse net needed
        "tune.angles": "30,60,random", "tune.angles_subjects": 3, "tune.angles_captures": 2})
    session = LocalSession(tmp_path / "ckpt")
    run_loop(cfg, session)
    sets = make_angle_sets(cfg, str(tmp_path / "angles"))
    assert list(sets) == ["yaw30", "yaw60", "random"]
    yaws = {}
    for label, url in sets.items():
        manifest = read_manifest(url)
        assert manifest.split("test").count == 3 * 2  # all subjects but the packer's one train subject
        yaws[label] = {s.key: tuple(s.meta["yaw_deg"]) for shard in manifest.shard_urls("test")
                       for s in iter_shard_samples(shard)}
    assert set(yaws["yaw30"].values()) == {(-30.0, 0.0, 30.0)}
    assert set(yaws["yaw60"].values()) == {(-60.0, 0.0, 60.0)}
    assert all(-left in (30.0, 60.0) and front == 0.0 and right in (30.0, 60.0)
               for left, front, right in yaws["random"].values())
    assert yaws["random"].keys() == yaws["yaw30"].keys()  # the same subjects and captures

    metrics = evaluate_angles(str(session.checkpoints[-1]), cfg, sets)
    for label in sets:
        assert 0 < metrics[metric_name(label)] < 100
    # the same identities in every set: the mean face is equally far from all of them
    mean_face = {metrics[f"angles/{label}/mean_face_rmse_mm"] for label in sets}
    assert max(mean_face) - min(mean_face) < 1e-4
    # a model trained at 45 degrees sees 30 and 60 degree views differently
    assert metrics[metric_name("yaw30")] != metrics[metric_name("yaw60")]
