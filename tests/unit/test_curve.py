"""The learning-curve harness (``benchmarks/learning_curve.py``) trains with the mask loss when the
config names a parse-net file, as ``make train`` does, and without it otherwise."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    from dfmvr.config import apply_overrides
    from dfmvr.data.synth import generate
    from dfmvr.presets import tiny
    from dfmvr.train.curve import load_split

    root = tmp_path_factory.mktemp("curve")
    generate(str(root), n_subjects=10, n_captures=1, size=64, seed=3, workers=1, n_vertices=2500,
             splits=(0.6, 0.4, 0.0))
    # the shards' own masks: the curves here need no parse net (the last test brings one)
    cfg = apply_overrides(tiny(), {"data.url": str(root), "data.num_workers": 0, "data.batch_size": 2,
                                   "model.input_masks": "given", "model.parse_net": ""})
    return cfg, load_split(cfg, "train"), load_split(cfg, "val", with_gt=True)


@pytest.mark.parametrize("with_parse_net", [False, True])
def test_the_mask_loss_runs_when_a_parse_net_is_named(splits, tmp_path, with_parse_net):
    import torch

    from dfmvr.config import apply_overrides
    from dfmvr.nets.parsenet import BiSeNet, save_parsenet
    from dfmvr.train.curve import learning_curve

    cfg, train, val = splits
    if with_parse_net:
        torch.manual_seed(0)
        path = save_parsenet(tmp_path / "parsenet.pt", BiSeNet(width=8), {"image_size": 64})
        cfg = apply_overrides(cfg, {"model.parse_net": str(path)})
    (point,) = learning_curve(cfg, train, val, triplets=4, every=4, seed=0, with_grad_split=True)
    assert ("mask" in point.loss) is with_parse_net
    assert ("mask" in point.grad_split) is with_parse_net
    assert point.nonfinite == 0


def test_a_parse_net_curve_reads_the_mask_cache_and_refuses_the_shards_own_masks(splits, tmp_path):
    import torch

    from dfmvr.config import apply_overrides
    from dfmvr.nets import create_parsenet, read_parsenet_file, save_parsenet
    from dfmvr.train.curve import learning_curve, load_split
    from dfmvr.train.masks import ensure_mask_cache

    cfg, given_train, given_val = splits
    torch.manual_seed(0)
    path = save_parsenet(tmp_path / "parsenet.pt", create_parsenet("unet", width=4), {"image_size": 64})
    cfg = apply_overrides(cfg, {"model.parse_net": str(path), "model.input_masks": "parse_net"})
    with pytest.raises(ValueError, match="the splits hold the samples' own masks"):
        learning_curve(cfg, given_train, given_val, triplets=4, every=4, seed=0)
    cache, _ = ensure_mask_cache(cfg, read_parsenet_file(path), device="cpu")
    train, val = load_split(cfg, "train", mask_cache=cache), load_split(cfg, "val", with_gt=True, mask_cache=cache)
    assert train.mask_source == val.mask_source == cache.source
    assert not torch.equal(train.tensors["masks"], given_train.tensors["masks"])
    (point,) = learning_curve(cfg, train, val, triplets=4, every=4, seed=0)
    assert "mask" in point.loss and point.nonfinite == 0


def test_a_curve_ends_at_its_time_limit_with_a_last_point(splits):
    from dfmvr.train.curve import learning_curve

    cfg, train, val = splits
    points = learning_curve(cfg, train, val, triplets=400, every=200, seed=0, max_seconds=1e-6)
    # any step outlasts a microsecond: one step of 2 triplets, then the point that closes the curve
    assert [(p.triplets, p.step) for p in points] == [(2, 1)]
    assert points[0].nonfinite == 0


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    """16 subjects x 1 capture: 12 training triplets (the benchmark draws batches of 8) and 4 val."""
    from dfmvr.data.synth import generate

    root = tmp_path_factory.mktemp("bench")
    generate(str(root), n_subjects=16, n_captures=1, size=64, seed=4, workers=1, n_vertices=2500,
             splits=(0.75, 0.25, 0.0))
    return root


def _run_benchmark(script: str, *args: str) -> tuple[str, dict]:
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / script), *args, "--threads", "1", "--json"],
                          capture_output=True, text=True, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_learning_curve_benchmark_prints_the_gradient_split(bench_root):
    out, result = _run_benchmark("learning_curve.py", "--data", str(bench_root), "--curves", "full",
                                 "--triplets", "16", "--every", "8", "--val", "4", "--grad-split")
    lines = [line for line in out.splitlines() if "gradient norms" in line]
    assert [line.split(" triplets")[0] for line in lines] == ["full seed 0 8", "full seed 0 16"]
    terms = [part.split(" ")[0] for part in lines[-1].split("): ", 1)[1].split("; ")]
    assert {"photo", "lm2d", "lm3d", "reg"} <= set(terms)
    points = result["curves"]["full"]["seeds"][0]
    assert points[-1]["grad_split"]["lm3d"]["cos_lm3d"] == pytest.approx(1.0, abs=1e-4)


def test_precise_bn_benchmark_recomputes_statistics_and_leaves_the_checkpoint(bench_root, tmp_path):
    import hashlib

    import torch

    from dfmvr.config import apply_overrides, to_dict
    from dfmvr.facemodel import build_face_model
    from dfmvr.model import DFMVR
    from dfmvr.presets import tiny
    from dfmvr.train.checkpoint import CHECKPOINT_FILE, save_checkpoint

    cfg = apply_overrides(tiny(), {"data.url": str(bench_root), "model.input_masks": "given"})
    face = build_face_model(cfg.facemodel)
    torch.manual_seed(0)
    model = DFMVR(cfg.model, cfg.render, face)
    with torch.no_grad():  # the head starts at zero (the mean face whatever the features): give it some
        model.regressor.head.weight.normal_(std=1e-3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model_state=model.state_dict(), step=0, config=to_dict(cfg),
                           face_signature=face.signature())
    digest = hashlib.sha256((ckpt / CHECKPOINT_FILE).read_bytes()).hexdigest()
    out, result = _run_benchmark("precise_bn.py", "--checkpoint", str(ckpt), "--data", str(bench_root),
                                 "--batches", "4x3", "--val", "4")
    res = result["results"]
    assert set(res) == {f"{k}_val_{m}" for k in ("running_stats", "precise_4x3") for m in ("rmse_mm", "gain_pct")}
    # an untrained model's running statistics are the initial zeros and ones: the recomputed
    # ones differ, and so does the prediction
    assert res["precise_4x3_val_rmse_mm"] != pytest.approx(res["running_stats_val_rmse_mm"], rel=1e-6)
    assert hashlib.sha256((ckpt / CHECKPOINT_FILE).read_bytes()).hexdigest() == digest


def test_gpu_presets_benchmark_runs_the_tiny_preset_on_the_cpu():
    # the GPU benchmark's path on the CPU: its own data, a throughput probe, a curve cut by time
    out, result = _run_benchmark("gpu_presets.py", "--device", "cpu", "--presets", "tiny", "--seconds", "0.5",
                                 "--subjects", "12", "--workers", "1", "--val", "4", "--probe-steps", "3")
    res = result["results"]
    assert set(res) == {"tiny_triplets_per_s_fp32", "tiny_val_gain_pct_last"}
    assert res["tiny_triplets_per_s_fp32"] > 0
    curve = result["presets"]["tiny"]["curve"]
    assert not curve["amp"] and all(p["nonfinite"] == 0 for p in curve["points"])
    # planned from the probe's rate, ended by the time limit (0.5 s x 1.3) or the plan, whichever came first
    last = curve["points"][-1]
    assert last["triplets"] == curve["planned_triplets"] or last["train_s"] >= 0.65
    assert result["machine"]["device"] == "cpu"


def test_replicas_take_the_data_parallel_step(splits):
    """``replicas=2``: two batches per step, so the same triplets in half the steps, and BatchNorm's
    running statistics are those of the first batch alone (DDP keeps rank 0's)."""
    import torch

    from dfmvr.train import curve

    cfg, train, val = splits
    points = curve.learning_curve(cfg, train, val, triplets=8, every=4, seed=0, replicas=2)
    assert [(p.triplets, p.step) for p in points] == [(4, 1), (8, 2)]
    with pytest.raises(ValueError, match="replicas"):
        curve.learning_curve(cfg, train, val, triplets=8, every=4, replicas=0)
    with pytest.raises(ValueError, match=f"{len(train)} training triplets"):
        curve.learning_curve(cfg, train, val, triplets=8, every=4, replicas=len(train))
    # what puts the running statistics back to the first batch's after the second
    from dfmvr.train.weights import restore_norm_stats, snapshot_norm_stats

    bn = torch.nn.BatchNorm1d(3)
    stats = snapshot_norm_stats(torch.nn.Sequential(bn))
    bn(torch.randn(4, 3) + 5)
    assert bn.running_mean.abs().min() > 0.1
    restore_norm_stats(stats)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


def test_learning_curve_benchmark_runs_curves_in_parallel_processes(bench_root, tmp_path):
    progress = tmp_path / "progress"
    _, result = _run_benchmark("learning_curve.py", "--data", str(bench_root), "--curves",
                               "full,loss.shape_grad_2d=0;loss.backbone_grad_2d=0", "--triplets", "16", "--every",
                               "8", "--val", "4", "--parallel", "2", "--progress-dir", str(progress))
    assert result["settings"]["parallel"] == 2
    assert {"full_val_gain_pct_16k", "tiny_triplets_per_s"} <= set(result["results"])
    for name, c in result["curves"].items():
        assert [(p["triplets"], p["step"]) for p in c["seeds"][0]] == [(8, 1), (16, 2)], name
    files = sorted(p.name for p in progress.iterdir())
    assert files == ["full-seed0.jsonl", "loss.shape_grad_2d=0_loss.backbone_grad_2d=0-seed0.jsonl"]
