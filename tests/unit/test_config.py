import pytest

from dfmvr.config import (
    Config,
    apply_overrides,
    flatten,
    from_dict,
    load_yaml,
    parse_cli_overrides,
    to_dict,
)


def test_overrides_convert_strings_to_field_types():
    cfg = apply_overrides(Config(), {"loss.photo": "8", "data.resampled": "false", "model.backbone": "unet",
                                     "data.batch_size": "4", "render.backend": "torch"})
    assert cfg.loss.photo == 8.0 and isinstance(cfg.loss.photo, float)
    assert cfg.data.resampled is False
    assert cfg.model.backbone == "unet"
    assert cfg.data.batch_size == 4
    assert cfg.render.backend == "torch"
    # the original is untouched
    assert Config().loss.photo == 24.0


def test_unknown_key_names_the_key_and_valid_fields():
    with pytest.raises(KeyError) as e:
        apply_overrides(Config(), {"optimm.lr": 1})
    assert "optimm" in str(e.value) and "render" in str(e.value)
    with pytest.raises(KeyError) as e:
        apply_overrides(Config(), {"model.bogus": 1})
    assert "bogus" in str(e.value) and "backbone" in str(e.value)


@pytest.mark.parametrize(
    "key,value,expect",
    [
        ("render.backend", "vulkan", "['auto', 'torch', 'pytorch3d']"),
        ("data.batch_size", "four", "expected an integer"),
        ("data.batch_size", "0", "data.batch_size"),
        ("loss.photo", "-1", "loss.photo"),
        ("data.resampled", "maybe", "expected true or false"),
        ("facemodel.source", "bfm", "facemodel.bfm_path"),
        ("model.regressor_blocks", "[3,0,6,3]", "model.regressor_blocks"),
        ("model.involution_norm", "layer", "['group', 'batch']"),
        ("optim.ema_decay", "1.0", "optim.ema_decay"),
        ("loss.shape_grad_2d", "1.5", "loss.shape_grad_2d: expected a number in [0, 1], got 1.5"),
        ("loss.backbone_grad_2d", "-0.1", "loss.backbone_grad_2d: expected a number in [0, 1], got -0.1"),
        ("optim.warmup_steps", "-5", "optim.warmup_steps"),
        ("data.max_bad_shards_in_a_row", "0", "data.max_bad_shards_in_a_row"),
        ("model.input_masks", "exact", "model.input_masks: expected one of ['given', 'parse_net'], got 'exact'"),
        ("parsenet.arch", "", "parsenet.arch: expected a registered parse-net architecture, got ''"),
        ("parsenet.class_weights", "1,2,3", "parsenet.class_weights: expected empty (unweighted) or 10 numbers > 0"),
        ("parsenet.class_weights", "1,1,1,1,1,1,1,1,1,0", "parsenet.class_weights"),
        ("parsenet.dice_weight", "-1", "parsenet.dice_weight"),
        # the tune section (dfmvr/tune/settings.py) checks its fields the same way
        ("tune.name", "a/b", "tune.name"),
        ("tune.seeds", 0, "tune.seeds: expected >= 1, got 0"),
        ("tune.num_samples", 0, "tune.num_samples"),
        ("tune.scheduler", "hyperband", "tune.scheduler: expected one of ['asha', 'fifo'], got 'hyperband'"),
        ("tune.reduction_factor", 1.0, "tune.reduction_factor: expected > 1, got 1.0"),
        ("tune.grace_period", -1, "tune.grace_period"),
        ("tune.max_concurrent_trials", -1, "tune.max_concurrent_trials"),
        ("tune.cpus_per_worker", 0, "tune.cpus_per_worker"),
        ("tune.gpus_per_worker", 1.5, "tune.gpus_per_worker"),
        ("tune.angles", "30,100", "tune.angles"),
        ("tune.angles", "random", "tune.angles"),
    ],
)
def test_bad_values_name_the_field(key, value, expect):
    with pytest.raises(ValueError) as e:
        apply_overrides(Config(), {key: value})
    assert expect in str(e.value)


def test_round_trip_through_dict_and_flat_form():
    cfg = apply_overrides(Config(), {"loss.lm2d": 0.5, "work_dir": "/tmp/x"})
    again = from_dict(Config, to_dict(cfg))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["loss.lm2d"] == 0.5 and flat["work_dir"] == "/tmp/x"
    assert apply_overrides(Config(), flat) == cfg


def test_yaml_and_cli_forms(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("loss:\n  photo: 12\nmodel.backbone: cnn\n")
    flat = load_yaml(p)
    assert flat == {"loss.photo": 12, "model.backbone": "cnn"}
    assert parse_cli_overrides(["optim.lr=1e-4", "a.b=c=d"]) == {"optim.lr": "1e-4", "a.b": "c=d"}
    with pytest.raises(ValueError, match="key=value"):
        parse_cli_overrides(["nonsense"])
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="list.yaml"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")


def test_registry_names_are_checked_with_the_other_values():
    from dfmvr.cli import build_config

    for key, value in (("parsenet.arch", "segformer"), ("model.backbone", "vit"), ("model.regressor", "vgg")):
        with pytest.raises(ValueError, match=rf"{key}: expected one of \[.*\], got '{value}'"):
            build_config([f"{key}={value}"])
    assert build_config(["parsenet.arch=bisenet"])[0].parsenet.arch == "bisenet"
