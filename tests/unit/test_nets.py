"""dfmvr.nets: every registered backbone x regressor at the tiny preset, involution against a
brute-force loop, the parse nets (every registered one) and their checkpoints."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfmvr.config import ModelConfig
from dfmvr.facemodel.layout import CoeffLayout
from dfmvr.nets import (
    BiSeNet,
    Involution2d,
    create_backbone,
    create_parsenet,
    create_regressor,
    initial_coefficients,
    list_backbones,
    list_parsenets,
    list_regressors,
    load_parsenet,
    parsenet_digest,
    save_parsenet,
)
from dfmvr.nets.blocks import AttentionGate
from dfmvr.train.parsing import parse_loss

# The tiny preset: 64 px, encoder width 8 with 4 levels, regressor stem width 16.
SIZE, WIDTH, LEVELS, REG_WIDTH = 64, 8, 4, 16
LAYOUT = CoeffLayout()
PAIRS = list(itertools.product(list_backbones(), list_regressors()))


def _views(batch: int = 2, channels: int = 4, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, channels, size, size, generator=g) * 2 - 1


def _pair(backbone: str, regressor: str, in_channels: int = 4, yaw=(-45.0, 0.0, 45.0)):
    torch.manual_seed(0)
    bb = create_backbone(backbone, in_channels=in_channels, width=WIDTH, levels=LEVELS)
    reg = create_regressor(regressor, in_channels=bb.out_channels, width=REG_WIDTH, layout=LAYOUT, view_yaw_deg=yaw)
    return bb, reg


def test_registries_hold_the_paper_variants_and_reject_unknown_names():
    assert {"fusion", "unet", "cnn"} <= set(list_backbones())
    assert {"rednet50", "resnet50"} <= set(list_regressors())
    with pytest.raises(ValueError, match=r"unknown backbone 'fusoin'.*'fusion'"):
        create_backbone("fusoin", in_channels=4, width=WIDTH, levels=LEVELS)
    with pytest.raises(ValueError, match=r"unknown regressor 'rednet'.*'rednet50'"):
        create_regressor("rednet", in_channels=8, width=REG_WIDTH, layout=LAYOUT)


@pytest.mark.parametrize("in_channels", [4, 3], ids=["mask_input", "rgb_only"])
@pytest.mark.parametrize("backbone,regressor", PAIRS)
def test_shapes_at_tiny_preset(backbone, regressor, in_channels):
    bb, reg = _pair(backbone, regressor, in_channels)
    feat = bb(_views(channels=in_channels))
    assert feat.shape[:2] == (2, bb.out_channels)
    if backbone in ("fusion", "unet"):
        assert feat.shape[-2:] == (SIZE, SIZE) and bb.out_channels == WIDTH
    coeffs = reg(feat)
    assert coeffs.shape == (2, LAYOUT.size) == (2, 269)
    assert torch.isfinite(coeffs).all()


@pytest.mark.parametrize("backbone", list_backbones())
def test_backbone_input_checks_name_expected_and_actual(backbone):
    bb = create_backbone(backbone, in_channels=4, width=WIDTH, levels=LEVELS)
    with pytest.raises(ValueError, match=r"C=4.*\(2, 3, 3, 64, 64\)"):
        bb(_views(channels=3))
    with pytest.raises(ValueError, match="divisible by 8; got 60 x 60"):
        bb(_views(size=60))


def test_fusion_encoders_do_not_share_weights():
    bb = create_backbone("fusion", in_channels=4, width=WIDTH, levels=LEVELS).eval()
    assert len(bb.encoders) == 3
    ptrs = [{p.data_ptr() for p in enc.parameters()} for enc in bb.encoders]
    assert all(ptrs[a].isdisjoint(ptrs[b]) for a, b in itertools.combinations(range(3), 2))

    outs: dict[int, list[torch.Tensor]] = {}
    for v, enc in enumerate(bb.encoders):
        enc.register_forward_hook(lambda m, i, o, v=v: outs.__setitem__(v, [t.detach().clone() for t in o]))
    x = _views(batch=1)
    with torch.no_grad():
        base_out = bb(x)
        base = {v: outs[v] for v in outs}
        for changed in range(3):
            x2 = x.clone()
            x2[:, changed] = -x2[:, changed]
            out2 = bb(x2)
            assert not torch.allclose(out2, base_out), f"view {changed} does not reach the output"
            for v in range(3):
                same = all(torch.equal(a, b) for a, b in zip(outs[v], base[v]))
                assert same == (v != changed), f"changing view {changed} changed encoder {v}: {not same}"


def test_fusion_has_an_attention_gate_per_view_at_every_decoder_level_and_every_skip_reaches_the_output():
    bb = create_backbone("fusion", in_channels=4, width=WIDTH, levels=LEVELS).train()
    gates = [m for m in bb.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == 3 * (LEVELS - 1)
    gated: list[tuple[int, torch.Tensor]] = []

    def keep(module, inputs, output):
        output.retain_grad()
        gated.append((output.shape[-1], output))

    for g in gates:
        g.register_forward_hook(keep)
    x = _views().requires_grad_(True)
    out = bb(x)
    # one call per gate, three per decoder level, at each skip resolution 64, 32, 16
    assert sorted(s for s, _ in gated) == sorted([SIZE >> i for i in range(LEVELS - 1)] * 3)
    out.square().mean().backward()
    for size, t in gated:
        assert t.grad is not None and t.grad.abs().sum() > 0, f"gated skip at {size} px does not reach the output"
    for v in range(3):
        assert x.grad[:, v].abs().sum() > 0, f"view {v} gets no gradient"


@pytest.mark.parametrize("backbone", list_backbones())
def test_every_view_reaches_the_output_of_every_backbone(backbone):
    bb = create_backbone(backbone, in_channels=4, width=WIDTH, levels=LEVELS)
    x = _views().requires_grad_(True)
    bb(x).square().mean().backward()
    assert all(x.grad[:, v].abs().sum() > 0 for v in range(3))


@pytest.mark.parametrize("regressor", list_regressors())
@pytest.mark.parametrize("yaw", [(-45.0, 0.0, 45.0), (-30.0, 5.0, 60.0)])
def test_untrained_head_outputs_the_mean_face_at_each_views_yaw_exactly(regressor, yaw):
    _, reg = _pair("cnn", regressor, yaw=yaw)
    coeffs = reg(torch.randn(3, reg.in_channels, 8, 8))
    parts = LAYOUT.split(coeffs)
    for name in ("id", "exp", "tex", "gamma", "trans"):
        assert torch.equal(getattr(parts, name), torch.zeros_like(getattr(parts, name))), name
    expected_angles = torch.tensor([[0.0, math.radians(a), 0.0] for a in yaw]).expand(3, 3, 3)
    assert torch.equal(parts.angles, expected_angles)
    assert torch.equal(coeffs, initial_coefficients(LAYOUT, yaw).expand(3, -1))


def test_config_default_yaw_matches_view_order_and_wrong_count_is_rejected():
    init = LAYOUT.split(initial_coefficients(LAYOUT, ModelConfig().view_yaw_deg)[None])
    assert init.angles[0, :, 1].tolist() == pytest.approx([-math.pi / 4, 0.0, math.pi / 4])
    with pytest.raises(ValueError, match=r"expected 3 angles.*\(0.0, 45.0\)"):
        create_regressor("rednet50", in_channels=8, width=REG_WIDTH, layout=LAYOUT, view_yaw_deg=(0.0, 45.0))


@pytest.mark.parametrize("regressor", list_regressors())
def test_zero_initialised_head_weight_still_gets_a_gradient(regressor):
    _, reg = _pair("fusion", regressor)
    coeffs = reg(torch.randn(2, WIDTH, SIZE, SIZE))
    target = torch.randn_like(coeffs)
    (coeffs - target).square().sum().backward()
    assert reg.head.weight.grad.abs().sum() > 0 and reg.head.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone,regressor", PAIRS)
def test_untrained_model_in_eval_mode_is_finite_and_outputs_the_mean_face(backbone, regressor):
    bb, reg = _pair(backbone, regressor)
    bb.eval(), reg.eval()
    with torch.no_grad():
        feat = reg.features(bb(_views(batch=1)))
        coeffs = reg.head(feat)
    assert torch.isfinite(feat).all() and feat.abs().max() < 1e3
    assert torch.equal(coeffs, initial_coefficients(LAYOUT, (-45.0, 0.0, 45.0))[None])


@pytest.mark.parametrize("backbone,regressor", PAIRS)
def test_gradients_reach_every_parameter_after_the_first_steps(backbone, regressor):
    bb, reg = _pair(backbone, regressor)
    params = list(bb.parameters()) + list(reg.parameters())
    opt = torch.optim.SGD(params, lr=1e-2)
    x = _views(batch=2, size=32)  # coverage does not depend on the size; 32 px keeps it quick
    target = torch.randn(2, LAYOUT.size, generator=torch.Generator().manual_seed(1))
    # step 1 moves the zero head weight, step 2 the zero-init residual scales; from step 3 on
    # every parameter has a gradient
    for _ in range(3):
        opt.zero_grad()
        (reg(bb(x)) - target).square().mean().backward()
        opt.step()
    names = [n for n, _ in bb.named_parameters()] + [f"reg.{n}" for n, _ in reg.named_parameters()]
    dead = [n for n, p in zip(names, params) if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient: {dead}"


@pytest.mark.parametrize("regressor", list_regressors())
@pytest.mark.parametrize("hw", [(8, 8), (5, 7), (1, 1)])
def test_regressor_accepts_small_and_odd_maps(regressor, hw):
    _, reg = _pair("fusion", regressor)
    assert reg(torch.randn(2, WIDTH, *hw)).shape == (2, LAYOUT.size)


@pytest.mark.parametrize("backbone", list_backbones())
def test_channels_last_gives_the_same_result(backbone):
    # float64: with every block switched on, train-mode BatchNorm over a few values and the
    # quadratic involution amplify float32 rounding differences block after block
    bb, reg = _pair(backbone, "rednet50")
    bb.double(), reg.double()
    x = _views(batch=2).double()
    with torch.no_grad():
        for block in reg.layers:  # make every block count
            block.expand[1].weight.fill_(1.0)
        feat = bb(x)
        reg.head.weight.normal_()  # make the output depend on the features
        ref = reg(feat)
        bb.to(memory_format=torch.channels_last), reg.to(memory_format=torch.channels_last)
        feat_cl = bb(x)
        out = reg(feat_cl.contiguous(memory_format=torch.channels_last))
    assert feat_cl.is_contiguous(memory_format=torch.channels_last) or feat_cl.shape[-1] == 1
    torch.testing.assert_close(feat_cl, feat)
    torch.testing.assert_close(out, ref)


# ---- involution


def _brute_force_involution(x: torch.Tensor, kernels: torch.Tensor, k: int, stride: int, dilation: int, group_channels: int):
    """y[b, c, i, j] = sum_{u,v} K[b, c // gc, u*k+v, i, j] * x[b, c, i*s + (u - k//2)*d, j*s + (v - k//2)*d]."""
    b_, c_, h_, w_ = x.shape
    ho, wo = kernels.shape[-2:]
    y = torch.zeros(b_, c_, ho, wo, dtype=x.dtype)
    for b, c, i, j in itertools.product(range(b_), range(c_), range(ho), range(wo)):
        acc = 0.0
        for u, v in itertools.product(range(k), range(k)):
            r, s = i * stride + (u - k // 2) * dilation, j * stride + (v - k // 2) * dilation
            if 0 <= r < h_ and 0 <= s < w_:
                acc += float(kernels[b, c // group_channels, u * k + v, i, j]) * float(x[b, c, r, s])
        y[b, c, i, j] = acc
    return y


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_involution_matches_a_brute_force_loop(stride, dilation):
    torch.manual_seed(0)
    inv = Involution2d(4, kernel_size=3, stride=stride, group_channels=2, reduction=2, dilation=dilation).eval()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    inv.double()
    with torch.no_grad():
        kernels = inv.kernels(x)
        out = inv(x)
    assert out.shape == (2, 4, math.ceil(5 / stride), math.ceil(6 / stride))
    assert kernels.shape == (2, 2, 9, *out.shape[-2:])
    torch.testing.assert_close(out, _brute_force_involution(x, kernels, 3, stride, dilation, 2))


def test_involution_kernel_generation_follows_the_paper():
    torch.manual_seed(0)
    inv = Involution2d(32, kernel_size=7, stride=2, norm="batch").eval()
    assert (inv.groups, inv.group_channels) == (2, 16)
    bn = inv.reduce[1]
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 32, 9, 9)
    pooled = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    hidden = torch.einsum("oc,bchw->bohw", inv.reduce[0].weight[:, :, 0, 0], pooled)
    hidden = (hidden - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    hidden = torch.relu(hidden * bn.weight[:, None, None] + bn.bias[:, None, None])
    expected = torch.einsum("oc,bchw->bohw", inv.span.weight[:, :, 0, 0], hidden) + inv.span.bias[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(inv.kernels(x), expected.reshape(1, 2, 49, 5, 5))


def test_group_normed_involution_is_linear_in_the_input_scale():
    """The default kernel generator normalises per sample: scaling x scales y by the same factor
    (a BatchNorm generator in eval mode makes y grow with the square of it)."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 9)
    grouped = Involution2d(32, kernel_size=7, stride=1).eval()
    batched = Involution2d(32, kernel_size=7, stride=1, norm="batch").eval()
    with torch.no_grad():
        y, y100 = grouped(x), grouped(100 * x)
        assert ((y100 - 100 * y).norm() / (100 * y).norm()).item() < 1e-3  # GroupNorm eps only
        ratio = (batched(100 * x).norm() / batched(x).norm()).item()
    assert ratio > 1000, ratio


def test_involution_norm_is_checked():
    with pytest.raises(ValueError, match="'group' or 'batch'"):
        Involution2d(32, norm="layer")


def test_involution_with_one_hot_kernels_is_a_per_group_shift():
    inv = Involution2d(4, kernel_size=3, stride=1, group_channels=2).eval()
    with torch.no_grad():
        inv.span.weight.zero_()
        inv.span.bias.zero_()
        inv.span.bias[0 * 9 + 4] = 1.0  # group 0: centre tap -> identity
        inv.span.bias[1 * 9 + 5] = 2.0  # group 1: tap (row 1, col 2) -> 2 * x[i, j + 1], zero past the edge
        x = torch.arange(2 * 4 * 4 * 5, dtype=torch.float32).reshape(2, 4, 4, 5)
        out = inv(x)
        strided = Involution2d(4, kernel_size=3, stride=2, group_channels=2).eval()
        strided.load_state_dict(inv.state_dict())
        out2 = strided(x)
    assert torch.equal(out[:, :2], x[:, :2])
    shifted = torch.zeros_like(x[:, 2:])
    shifted[..., :-1] = 2 * x[:, 2:, :, 1:]
    assert torch.equal(out[:, 2:], shifted)
    assert torch.equal(out2[:, :2], x[:, :2, ::2, ::2])
    assert out2.shape == (2, 4, 2, 3)


# ---- parse nets


def test_bisenet_shapes_in_training_and_eval():
    torch.manual_seed(0)
    net = BiSeNet(n_classes=10, width=8).train()
    x = torch.randn(2, 3, 64, 48)
    main, aux16, aux32 = net(x, return_aux=True)
    assert main.shape == aux16.shape == aux32.shape == (2, 10, 64, 48)
    assert isinstance(net(x), torch.Tensor)
    net.eval()
    out = net(torch.randn(1, 3, 50, 70), return_aux=True)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 10, 50, 70)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\); got \(1, 4, 64, 64\)"):
        net(torch.randn(1, 4, 64, 64))


def test_parsenet_registry_holds_the_papers_net_and_rejects_unknown_names():
    assert {"bisenet", "unet"} <= set(list_parsenets())
    assert isinstance(create_parsenet("bisenet", width=8), BiSeNet)
    with pytest.raises(ValueError, match=r"parsenet.arch: unknown parse net 'segformer'; registered: \["):
        create_parsenet("segformer")


@pytest.mark.parametrize("arch", list_parsenets())
def test_every_parsenet_gives_logits_at_input_size_and_trains_a_step(arch):
    torch.manual_seed(0)
    net = create_parsenet(arch, n_classes=10, width=8).train()
    assert net.arch == arch and net.n_classes == 10 and net.width == 8
    x = torch.randn(2, 3, 64, 64)
    heads = net(x, return_aux=True)
    assert isinstance(heads, tuple) and all(h.shape == (2, 10, 64, 64) for h in heads)
    target = torch.randint(0, 10, (2, 64, 64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in net.parameters()]
    loss, _ = parse_loss(heads, target, class_weights=torch.linspace(0.5, 2, 10), dice_weight=1.0)
    loss.backward()
    opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(before, net.parameters())) == len(before)
    net.eval()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 10, 64, 64)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\); got \(1, 4, 64, 64\)"):
        net(torch.randn(1, 4, 64, 64))


def _trained_parsenet(arch: str = "bisenet"):
    torch.manual_seed(0)
    net = create_parsenet(arch, n_classes=10, width=8).train()
    with torch.no_grad():  # move BatchNorm statistics away from their defaults so buffers matter
        for _ in range(2):
            net(torch.randn(2, 3, 64, 64))
    return net.eval()


@pytest.mark.parametrize("arch", list_parsenets())
def test_parsenet_save_load_is_frozen_and_bit_exact(tmp_path, arch):
    net = _trained_parsenet(arch)
    path = save_parsenet(tmp_path / "parse" / "net.pt", net, {"image_size": 64, "steps": 2})
    raw = torch.load(path, weights_only=True)
    assert raw["meta"] == {"image_size": 64, "steps": 2, "arch": arch, "n_classes": 10, "width": 8,
                           "in_channels": 3}
    loaded = load_parsenet(path, "cpu")
    assert type(loaded) is type(net) and loaded.arch == arch
    assert loaded.meta["image_size"] == 64 and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    assert parsenet_digest(raw) == parsenet_digest(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    parent = nn.ModuleDict({"parse": loaded, "other": nn.BatchNorm2d(3)}).train()
    assert parent["other"].training and not loaded.training, "a parent's .train() must not unfreeze the parse net"
    img = x.clone().requires_grad_(True)
    F.cross_entropy(loaded(img), torch.randint(0, 10, (2, 64, 64))).backward()
    assert img.grad.abs().sum() > 0, "the mask loss needs gradients through the frozen net to its input"
    assert all(p.grad is None for p in loaded.parameters())


def test_parsenet_digest_names_the_weights(tmp_path):
    a = save_parsenet(tmp_path / "a.pt", _trained_parsenet(), {"image_size": 64, "steps": 2})
    b = save_parsenet(tmp_path / "b.pt", _trained_parsenet(), {"image_size": 64, "steps": 99})
    ckpt_a, ckpt_b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert parsenet_digest(ckpt_a) == parsenet_digest(ckpt_b)  # other metadata, same net
    ckpt_b["state_dict"]["head.1.weight"][0, 0] += 1e-3
    assert parsenet_digest(ckpt_a) != parsenet_digest(ckpt_b)


def test_checkpoints_written_before_the_registry_load_as_bisenet(tmp_path):
    path = save_parsenet(tmp_path / "old.pt", _trained_parsenet(), {"image_size": 64})
    ckpt = torch.load(path, weights_only=True)
    del ckpt["meta"]["arch"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert isinstance(load_parsenet(tmp_path / "old.pt"), BiSeNet)
    ckpt["meta"]["arch"] = "segformer"
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=r"future\.pt: architecture 'segformer' is not registered here"):
        load_parsenet(tmp_path / "future.pt")


def test_parsenet_checkpoint_errors_name_the_file(tmp_path):
    net = _trained_parsenet()
    with pytest.raises(ValueError, match="must hold 'image_size'"):
        save_parsenet(tmp_path / "x.pt", net, {})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_parsenet(tmp_path / "nope.pt")

    good = save_parsenet(tmp_path / "good.pt", net, {"image_size": 64})
    ckpt = torch.load(good, weights_only=True)
    del ckpt["state_dict"]["head.1.weight"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing\.pt.*missing weights \['head\.1\.weight'\]"):
        load_parsenet(tmp_path / "missing.pt")

    five = save_parsenet(tmp_path / "five.pt", BiSeNet(n_classes=5, width=8), {"image_size": 64})
    with pytest.raises(ValueError, match=r"five\.pt: has 5 classes, expected 10"):
        load_parsenet(five)
    assert load_parsenet(five, n_classes=None).n_classes == 5

    ckpt = torch.load(five, weights_only=True)
    ckpt["meta"]["n_classes"] = 10
    torch.save(ckpt, tmp_path / "lying.pt")
    with pytest.raises(ValueError, match=r"lying\.pt: weight 'head\.1\.weight' has shape \(5, 32, 1, 1\)"):
        load_parsenet(tmp_path / "lying.pt")

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable torch checkpoint"):
        load_parsenet(tmp_path / "junk.pt")


def test_the_builtin_parse_net_ships_with_the_package_and_follows_the_tiny_recipe():
    from dfmvr.nets import BUILTIN, builtin_parsenet_path, read_parsenet_file
    from dfmvr.presets import tiny

    cfg = tiny()
    assert cfg.model.parse_net == BUILTIN
    path = builtin_parsenet_path()
    assert path.is_file() and path.stat().st_size < 3 << 20  # small enough to live in the repository
    raw = read_parsenet_file(BUILTIN)
    meta = raw["meta"]
    assert (meta["arch"], meta["width"], meta["image_size"]) == (cfg.parsenet.arch, cfg.parsenet.width,
                                                                  cfg.data.image_size)
    # trained by jobs/train_parsenet.py with the tiny preset's recipe (more steps) on the embedded
    # synthetic shards (seed 0, 2000 subjects): the command in docs/parsenet.md
    recipe = meta["config"]["parsenet"]
    for key in ("arch", "width", "dice_weight", "lr", "batch_size", "hflip", "aux_weight"):
        assert recipe[key] == getattr(cfg.parsenet, key), key
    assert tuple(recipe["class_weights"]) == cfg.parsenet.class_weights
    assert (meta["config"]["seed"], meta["config"]["data"]["synth_subjects"]) == (0, 2000)
    assert meta["miou"] >= 0.75 and min(v for v in meta["iou"].values() if v is not None) >= 0.55
    net = load_parsenet(BUILTIN)
    assert net.arch == "unet" and not net.training
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 10, 64, 64)
