"""Sweeps without a cluster: the search-space language, the tune config section, the presets,
the trial config, the results table and chart, the result journal and ASHA's replay."""

from __future__ import annotations

import json
import math

import pytest

from dfmvr.config import Config, apply_overrides, flatten, from_dict, load_yaml, to_dict
from dfmvr.presets import tiny
from dfmvr.tune.journal import ResultJournal, ResumableASHA, best_record, last_step, stopped_early, train_seconds
from dfmvr.tune.presets import get_sweep, list_sweeps
from dfmvr.tune.results import Row, TrialRecord, markdown, plot, summarise
from dfmvr.tune.runs import short_error
from dfmvr.tune.space import DISTRIBUTIONS, parse_distribution, parse_space
from dfmvr.tune.sweep import check_sweep, count_trials, with_plan
from dfmvr.tune.trial import SweepContext, trial_config, trial_name


# --- the space language --------------------------------------------------------------------

def test_each_distribution_parses_to_its_typed_values_and_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

    cfg = tiny()
    dists = parse_space(cfg, {
        "loss.photo": "loguniform(4,64)",
        "optim.lr": "uniform(1e-4, 3e-3)",
        "train.val_samples": "randint(8,64)",
        "model.backbone": "choice(cnn,unet,fusion)",
        "model.regressor": "grid(rednet50,resnet50)",
        "model.view_yaw_deg": "grid((-30,0,30),(-45,0,45))",
        "loss.mask_loss": "false",
    })
    photo = dists["loss.photo"].to_tune()
    assert isinstance(photo, Float) and isinstance(photo.get_sampler(), LogUniform)
    assert (photo.lower, photo.upper) == (4.0, 64.0)
    lr = dists["optim.lr"].to_tune()
    assert isinstance(lr.get_sampler(), Uniform) and (lr.lower, lr.upper) == (1e-4, 3e-3)
    n = dists["train.val_samples"].to_tune()
    assert isinstance(n, Integer) and (n.lower, n.upper) == (8, 64)
    backbone = dists["model.backbone"].to_tune()
    assert isinstance(backbone, Categorical) and backbone.categories == ["cnn", "unet", "fusion"]
    assert dists["model.regressor"].to_tune() == {"grid_search": ["rednet50", "resnet50"]}
    assert dists["model.view_yaw_deg"].values == ((-30.0, 0.0, 30.0), (-45.0, 0.0, 45.0))
    assert dists["loss.mask_loss"].kind == "value" and dists["loss.mask_loss"].to_tune() is False
    assert [d.is_random for d in dists.values()] == [True, True, True, True, False, False, False]
    assert dists["loss.photo"].describe() == "loss.photo=loguniform(4,64)"


@pytest.mark.parametrize("key,spec,error,fragments", [
    ("loss.photoo", "loguniform(4,64)", KeyError, ["tune.space.loss.photoo", "not a config field", "photo"]),
    ("optimizer.lr", "uniform(0.1,1)", KeyError, ["tune.space.optimizer.lr", "optim"]),
    ("loss", "uniform(0.1,1)", KeyError, ["config section", "loss.photo"]),
    ("seed", "grid(1,2)", KeyError, ["tune.space.seed", "tune.seeds"]),
    ("tune.num_samples", "grid(1,2)", KeyError, ["tune.space.tune.num_samples"]),
    ("loss.photo", "lognormal(1,2)", ValueError, ["unknown distribution 'lognormal'", *DISTRIBUTIONS]),
    ("loss.photo", "loguniform(0,3)", ValueError, ["loguniform expects bounds > 0", "'loguniform(0,3)'"]),
    ("loss.photo", "uniform(5,1)", ValueError, ["low < high"]),
    ("loss.photo", "uniform(1)", ValueError, ["two bounds"]),
    ("loss.photo", "uniform(a,b)", ValueError, ["numeric bounds"]),
    ("loss.photo", "randint(1,5)", ValueError, ["holds a float"]),
    ("train.steps", "uniform(1,5)", ValueError, ["holds an integer", "randint"]),
    ("model.mask_input", "uniform(0,1)", ValueError, ["holds bool", "grid(...) or choice(...)"]),
    ("loss.photo", "grid(-1,2)", ValueError, ["tune.space.loss.photo", "'-1'", "expected a number >= 0"]),
    ("loss.photo", "choice()", ValueError, ["one or more"]),
    ("model.backbone", "choice(cnn,transformer)", ValueError, ["expected one of", "'transformer'"]),
    ("data.batch_size", "0", ValueError, ["data.batch_size", "expected >= 1"]),
])
def test_bad_space_entries_fail_naming_the_key_and_what_was_expected(key, spec, error, fragments):
    with pytest.raises(error) as e:
        parse_distribution(tiny(), key, spec)
    message = e.value.args[0]
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_space_entries_come_from_the_command_line_and_yaml_into_the_typed_config(tmp_path):
    cfg = apply_overrides(tiny(), {"tune.space.loss.photo": "loguniform(4,64)",
                                   "tune.space.model.backbone": "choice(cnn,unet,fusion)", "tune.seeds": "3"})
    assert cfg.tune.space == {"loss.photo": "loguniform(4,64)", "model.backbone": "choice(cnn,unet,fusion)"}
    assert cfg.tune.seeds == 3
    flat = flatten(cfg)
    assert flat["tune.space.loss.photo"] == "loguniform(4,64)"  # what MLflow params show
    assert apply_overrides(tiny(), flat) == cfg
    assert from_dict(Config, to_dict(cfg)) == cfg
    yaml_file = tmp_path / "sweep.yaml"
    yaml_file.write_text("tune:\n  space:\n    loss:\n      photo: loguniform(4,64)\n    model.backbone: grid(cnn,unet)\n")
    cfg = apply_overrides(tiny(), load_yaml(yaml_file))
    assert cfg.tune.space == {"loss.photo": "loguniform(4,64)", "model.backbone": "grid(cnn,unet)"}


# --- presets -------------------------------------------------------------------------------

def test_ablation_is_the_papers_table_two_exactly():
    plan = get_sweep("ablation")
    base = tiny()
    got = {}
    for v in plan.variants:
        c = apply_overrides(base, v.overrides)
        got[v.name] = (c.model.backbone, c.model.regressor, c.model.mask_input, c.loss.mask_loss, c.loss.lm3d_loss,
                       v.reference_rmse_mm)
    assert got == {
        "v1": ("cnn", "rednet50", True, True, True, 1.5415),
        "v2": ("unet", "rednet50", True, True, True, 1.5207),
        "v3": ("fusion", "resnet50", True, True, True, 1.5206),
        "v4": ("fusion", "rednet50", False, False, True, 1.4656),
        "v5": ("fusion", "rednet50", True, True, False, 1.5770),
        "v6": ("fusion", "rednet50", True, True, True, 1.4040),
    }
    cfg, dists = check_sweep(with_plan(base, plan, {"tune.seeds": 3}), plan)
    assert cfg.tune.scheduler == "fifo" and count_trials(cfg, plan, dists) == 18
    # the user's choice beats the preset's
    assert with_plan(base, plan, {"tune.scheduler": "asha"}).tune.scheduler == "asha"


def test_loss_weight_search_brackets_every_reference_default():
    plan = get_sweep("loss-weights")
    cfg, dists = check_sweep(with_plan(tiny(), plan, {}), plan)
    defaults = Config().loss
    assert set(dists) == {"loss.photo", "loss.mask", "loss.lm2d", "loss.lm3d", "loss.reg"}
    for key, d in dists.items():
        lo, hi = d.values
        assert d.kind == "loguniform" and lo < getattr(defaults, key.split(".")[1]) < hi
    assert cfg.tune.scheduler == "asha" and count_trials(cfg, plan, dists) == cfg.tune.num_samples == 8
    # the user's space entry replaces the preset's for that key, and adds new ones
    cfg, dists = check_sweep(with_plan(tiny(), plan, {"tune.space.loss.photo": "grid(12,24)",
                                                      "tune.space.optim.lr": "loguniform(1e-4,1e-2)"}), plan)
    assert dists["loss.photo"].kind == "grid" and "optim.lr" in dists
    assert count_trials(cfg, plan, dists) == 16


def test_sweep_presets_are_listed_and_unknown_ones_name_them():
    assert list_sweeps() == ["ablation", "angles", "loss-weights"]
    assert get_sweep("none").variants == [] and get_sweep("").space == {}
    with pytest.raises(ValueError, match=r"--preset: expected one of \['ablation', 'angles', 'loss-weights'\]"):
        get_sweep("ablations")


def test_asha_grace_period_must_wait_for_the_first_validation():
    cfg = apply_overrides(tiny(), {"train.val_every": 100, "tune.grace_period": 50})
    with pytest.raises(ValueError, match=r"tune.grace_period: expected >= train.val_every \(100"):
        check_sweep(cfg, get_sweep("none"))
    check_sweep(apply_overrides(cfg, {"tune.scheduler": "fifo"}), get_sweep("none"))


# --- the trial ------------------------------------------------------------------------------

def test_trial_config_layers_variant_space_seed_and_what_the_sweep_fixes():
    base = apply_overrides(tiny(), {"tune.name": "abl", "tune.workers_per_trial": 2, "tune.cpus_per_worker": 0.5,
                                    "tune.gpus_per_worker": 0.25, "seed": 7})
    plan = get_sweep("ablation")
    ctx = SweepContext(base=to_dict(base), tracking_uri="sqlite:///x.db", experiment_id="1", parent_run_id="p",
                       train_storage="/tmp/abl-trials", variants={v.name: v.overrides for v in plan.variants})
    params = {"variant": "v4", "seed": 8, "space": {"loss.photo": 12.5}}
    cfg = trial_config(ctx, params, "ab123_00004")
    assert (cfg.model.mask_input, cfg.loss.mask_loss, cfg.model.backbone) == (False, False, "fusion")
    assert cfg.loss.photo == 12.5 and cfg.seed == 8
    assert cfg.train.run_name == "abl-ab123_00004" and cfg.train.storage_path == "/tmp/abl-trials"
    assert (cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.use_gpu) == (2, 0.5, "true")
    assert trial_name(params, "ab123_00004") == "v4-seed8"
    assert trial_name({"seed": 0, "variant": ""}, "ab123_00004") == "trial-00004"


def test_short_error_finds_the_innermost_error_line_of_a_wrapped_ray_error():
    wrapped = ("ray.exceptions.RayTaskError(TrainingFailedError): ray::run_trial() (pid=1)\n"
               "  File \"loop.py\", line 297, in run_loop\n    raise NonFiniteLossError(\n"
               "dfmvr.train.loop.NonFiniteLossError: 3 non-finite losses in a row at step 1 | x\n")
    assert short_error(wrapped) == "dfmvr.train.loop.NonFiniteLossError: 3 non-finite losses in a row at step 1 / x"
    assert short_error(RuntimeError("boom")) == "RuntimeError: boom"
    assert len(short_error("ValueError: " + "x" * 500)) == 200


# --- the result journal and ASHA ------------------------------------------------------------

def test_journal_keeps_every_attempt_and_skips_a_torn_last_line(tmp_path):
    j = ResultJournal(tmp_path / "results.jsonl")
    for rec in ({"trial_id": "a", "step": 4, "metric": 5.0, "checkpoint": "c4", "time_total_s": 60.0},
                {"trial_id": "a", "step": 8, "metric": 4.5, "checkpoint": "c8", "time_total_s": 70.0},
                # restarted after an interruption: Tune's clock starts again
                {"trial_id": "a", "step": 12, "metric": math.inf, "checkpoint": None, "time_total_s": 30.0},
                {"trial_id": "b", "step": 4, "metric": 6.0, "checkpoint": None, "time_total_s": 50.0}):
        j.append(rec)
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"trial_id": "b", "st')
    records = j.read()
    assert [r["step"] for r in records["a"]] == [4, 8, 12] and len(records["b"]) == 1
    assert last_step(records["a"]) == 12 and train_seconds(records["a"]) == 100.0
    assert best_record(records["a"])["checkpoint"] == "c8"
    assert best_record(records["b"])["metric"] == 6.0 and best_record([]) is None


class _Trial:
    """What ASHA reads of a trial: its id."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def _asha(journal) -> ResumableASHA:
    s = ResumableASHA(journal=str(journal), time_attr="step", max_t=16, grace_period=4, reduction_factor=4)
    assert s.set_search_properties("val/rmse_mm", "min")
    return s


def test_resumed_asha_compares_new_trials_with_the_rungs_of_trials_before_the_interruption(tmp_path):
    journal = tmp_path / "results.jsonl"
    j = ResultJournal(journal)
    j.append({"trial_id": "a", "step": 4.0, "metric": 4.90})
    j.append({"trial_id": "b", "step": 4.0, "metric": 4.99})
    worse = {"step": 4.0, "val/rmse_mm": 5.05}

    fresh = _asha(tmp_path / "none.jsonl")  # what Tuner.restore gives without the journal
    fresh.on_trial_add(None, _Trial("c"))
    assert fresh.on_trial_result(None, _Trial("c"), worse) == "CONTINUE"

    resumed = _asha(journal)
    for t in ("a", "b", "c"):
        resumed.on_trial_add(None, _Trial(t))
    assert resumed.on_trial_result(None, _Trial("c"), worse) == "STOP"
    resumed.on_trial_add(None, _Trial("d"))
    assert resumed.on_trial_result(None, _Trial("d"), {"step": 4.0, "val/rmse_mm": 4.80}) == "CONTINUE"
    # the early stop is journaled (the table tells it from an interruption); the end of a trial is not
    assert resumed.on_trial_result(None, _Trial("d"), {"step": 16.0, "val/rmse_mm": 4.70}) == "STOP"
    records = ResultJournal(journal).read()
    assert stopped_early(records["c"]) and not stopped_early(records.get("d", []))
    assert records["c"][-1] == {"trial_id": "c", "step": 4.0, "event": "stopped"}


# --- the table and the chart ----------------------------------------------------------------

def _rec(name, variant, seed, status, val, *, steps=8, secs=60.0, error="", extra=None, description=None):
    description = f"{variant} desc" if description is None else description
    return TrialRecord(trial_id=f"x_{seed:05d}{name}", name=name, variant=variant, description=description,
                       seed=seed, params={}, status=status, val_rmse_mm=val, steps=steps, train_seconds=secs,
                       error=error, extra=extra or {})


def test_rows_average_seeds_and_say_which_trials_stopped_or_failed(tmp_path):
    records = [
        _rec("v2-seed0", "v2", 0, "finished", 1.50), _rec("v2-seed1", "v2", 1, "finished", 1.54),
        _rec("v1-seed0", "v1", 0, "finished", 1.60), _rec("v1-seed1", "v1", 1, "failed", None, steps=1,
                                                           error="NonFiniteLossError: 3 non-finite losses"),
        _rec("v1-seed2", "v1", 2, "stopped", 1.70, steps=4),
    ]
    rows = summarise(records, references={"v1": 1.5415, "v2": 1.5207}, order=["v1", "v2"])
    assert [r.trial for r in rows] == ["v1", "v2"]
    v1, v2 = rows
    assert v2.seeds == 2 and v2.mean == pytest.approx(1.52) and v2.std == pytest.approx(0.0282843, rel=1e-5)
    assert v2.status == "finished" and v2.reference == 1.5207
    assert v1.seeds == 2 and v1.values == [1.60, 1.70]
    assert v1.status == ("1 finished, 1 stopped early at step 4, 1 failed: NonFiniteLossError: 3 non-finite losses")
    table = markdown(rows, title="abl", reference_name="paper Tab. II")
    lines = table.splitlines()
    assert lines[2] == "| trial | variant | seeds | val RMSE (mm) | train time | status | paper (mm) |"
    assert "| v2 | v2 desc | 2 | 1.5200 ± 0.0283 | 1m00s | finished | 1.5207 |" in lines
    assert "paper: paper Tab. II." in table
    png = plot(rows, tmp_path / "r.png", title="abl", reference_name="paper")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_angle_rows_are_the_test_angles_over_every_trained_seed():
    records = [_rec("angles-seed0", "angles", 0, "finished", 4.0,
                    extra={"angles/yaw30/rmse_mm": 3.0, "angles/random/rmse_mm": 3.3}),
               _rec("angles-seed1", "angles", 1, "finished", 4.1,
                    extra={"angles/yaw30/rmse_mm": 3.2, "angles/random/rmse_mm": 3.5})]
    rows = summarise(records, angles=["yaw30", "random"])
    assert [(r.trial, r.seeds) for r in rows] == [("yaw30", 2), ("random", 2)]
    assert rows[0].mean == pytest.approx(3.1) and rows[1].mean == pytest.approx(3.4)


def test_trials_cut_short_by_a_stopped_sweep_are_interrupted_not_stopped():
    rows = summarise([_rec("trial-00000", "", 0, "interrupted", 5.0, steps=4, description="lr=0.1"),
                      _rec("trial-00001", "", 1, "finished", 4.0, description="lr=0.01")])
    assert [(r.trial, r.variant, r.status) for r in rows] == [("trial-00000", "lr=0.1", "1 interrupted"),
                                                              ("trial-00001", "lr=0.01", "finished")]


def test_a_row_without_values_shows_no_number():
    row = Row(trial="t", variant="", seeds=0, values=[], mean=None, std=None, train_seconds=None, status="1 failed: x")
    assert "| t |  | 0 | - | - | 1 failed: x |" in markdown([row])


# --- the random-angle test set --------------------------------------------------------------

def test_random_side_yaws_come_from_the_listed_angles_and_nothing_else_changes():
    import numpy as np

    from dfmvr.config import FaceModelConfig
    from dfmvr.facemodel import build_face_model
    from dfmvr.data.synth import SynthConfig, sample_params

    model = build_face_model(FaceModelConfig(n_vertices=400))
    fixed = SynthConfig(out="unused", size=32, seed=5)
    drawn = SynthConfig(out="unused", size=32, seed=5, side_yaw_choices=(30, 45, 60))
    assert drawn.fingerprint() != fixed.fingerprint()
    assert SynthConfig(out="unused", size=32, seed=5).fingerprint() == fixed.fingerprint()
    yaws = set()
    for capture in range(12):
        a, b = sample_params(model, fixed, 1, capture), sample_params(model, drawn, 1, capture)
        for name in ("id", "exp", "tex", "gamma", "trans"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        left, front, right = b.yaw_deg
        assert front == 0.0 and -left in (30.0, 45.0, 60.0) and right in (30.0, 45.0, 60.0)
        assert a.yaw_deg == (-45.0, 0.0, 45.0)
        # the jitter is the same: only the nominal yaw differs
        assert np.allclose(b.angles[:, 1] - np.radians(b.yaw_deg), a.angles[:, 1] - np.radians(a.yaw_deg))
        yaws.update((-left, right))
    assert yaws == {30.0, 45.0, 60.0}


def test_results_json_round_trips(tmp_path):
    from dfmvr.tune.results import write

    records = [_rec("v6-seed0", "v6", 0, "finished", 1.4)]
    paths = write(tmp_path, summarise(records, order=["v6"]), records, title="t")
    data = json.loads(paths["json"].read_text())
    assert data["rows"][0]["mean"] == 1.4 and data["trials"][0]["name"] == "v6-seed0"
    assert paths["table"].read_text().startswith("### t")
