"""The full DF-MVR model: shapes, mean-face start, gradients through every loss, frozen parse net."""

from __future__ import annotations

import math

import pytest
import torch

from dfmvr.config import apply_overrides
from dfmvr.data.batch import TripletItem, collate
from dfmvr.data.transforms import weight_map
from dfmvr.facemodel import build_face_model
from dfmvr.model import DFMVR, autocast_dtype, build_model, input_channels, mask_channels, parsed_masks
from dfmvr.nets import BiSeNet
from dfmvr.presets import tiny
from dfmvr.train.objective import reconstruction_losses


@pytest.fixture(scope="module")
def setup():
    cfg = apply_overrides(tiny(), {"facemodel.n_vertices": 800, "render.backend": "torch"})
    return cfg, build_face_model(cfg.facemodel)


def _batch(face_model, size=64, b=2):
    torch.manual_seed(0)
    images = torch.rand(b, 3, 3, size, size) * 2 - 1
    masks = torch.zeros(b, 3, size, size, dtype=torch.long)
    masks[..., 16:48, 20:44] = 1
    masks[..., 24:28, 24:30] = 4
    masks[..., 36:40, 28:36] = 8
    items = [
        TripletItem(
            key=f"s{i}-0", subject=f"s{i}", images=images[i].numpy(), masks=masks[i].numpy().astype("uint8"),
            weights=weight_map(masks[i].numpy().astype("uint8"))[:, None],
            lmk2d=(torch.rand(3, 68, 2) * size).numpy(), yaw_deg=torch.tensor([-45.0, 0.0, 45.0]).numpy(),
            lmk3d=(face_model.mean_shape[face_model.lm3d_index] + 0.01).numpy(),
        )
        for i in range(b)
    ]
    return collate(items)


def test_forward_shapes_and_mean_face_start(setup):
    cfg, fm = setup
    model = DFMVR(cfg.model, cfg.render, fm).eval()
    batch = _batch(fm)
    out = model(batch.images, batch.masks)
    b, n = 2, fm.n_vertices
    assert out.coeffs.shape == (b, 269)
    assert out.shape.shape == (b, n, 3) and out.posed.shape == (b, 3, n, 3)
    assert out.image.shape == (b, 3, 3, 64, 64) and out.render_mask.shape == (b, 3, 1, 64, 64)
    assert out.lm2d.shape == (b, 3, 68, 2) and out.lm3d.shape == (b, fm.lm3d_index.numel(), 3)
    # an untrained model starts at the mean face, facing each view's nominal yaw
    assert torch.allclose(out.shape[0], fm.mean_shape, atol=1e-6)
    assert torch.allclose(out.parts.angles[0, :, 1], torch.tensor([-math.pi / 4, 0.0, math.pi / 4]), atol=1e-6)
    # and the face is in view in every image
    assert (out.render_mask.flatten(2).mean(-1) > 0.1).all()


def test_mask_input_needs_masks_and_image_size_is_checked(setup):
    cfg, fm = setup
    model = DFMVR(apply_overrides(cfg, {"model.input_masks": "given"}).model, cfg.render, fm)
    with pytest.raises(ValueError, match="mask_input"):
        model(torch.zeros(1, 3, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, 3, 64, 64\); got \(1, 3, 3, 32, 32\)"):
        model(torch.zeros(1, 3, 3, 32, 32), torch.zeros(1, 3, 32, 32, dtype=torch.long))


def _with_head_weights(model):
    """The head starts at zero (the mean face for any input): give every all-zero weight a little."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.01)
    return model


def test_mask_encodings_give_the_class_map_as_one_channel_or_one_per_class(setup):
    cfg, fm = setup
    masks = torch.tensor([[[0, 1], [4, 9]]])  # [1, 2, 2] class ids
    ids = mask_channels(masks, "ids")
    assert ids.shape == (1, 1, 2, 2)
    assert torch.allclose(ids[0, 0], torch.tensor([[-1.0, -1 + 2 / 9], [-1 + 8 / 9, 1.0]]))
    onehot = mask_channels(masks, "onehot")
    assert onehot.shape == (1, 10, 2, 2)
    assert (onehot == 1).sum(1).eq(1).all()  # exactly one class channel is on at every pixel
    assert onehot[0, :, 1, 0].argmax() == 4 and onehot[0, :, 1, 1].argmax() == 9
    assert input_channels(apply_overrides(cfg, {"model.mask_encoding": "ids"}).model) == 4
    onehot_cfg = apply_overrides(cfg, {"model.mask_encoding": "onehot"})
    assert input_channels(onehot_cfg.model) == 13
    assert input_channels(apply_overrides(onehot_cfg, {"model.mask_input": False}).model) == 3
    model = _with_head_weights(DFMVR(onehot_cfg.model, onehot_cfg.render, fm).eval())
    images = torch.zeros(2, 3, 3, 64, 64)
    parts = torch.zeros(2, 3, 64, 64, dtype=torch.long)
    moved = parts.clone()
    moved[..., 20:40, 20:40] = 6  # a nose where the other has skin: the one-hot input sees it
    with torch.no_grad():
        assert not torch.equal(model(images, parts, render=False).coeffs, model(images, moved, render=False).coeffs)
    with pytest.raises(ValueError, match="model.mask_encoding"):
        apply_overrides(cfg, {"model.mask_encoding": "rgb"})


def test_a_parse_net_model_reads_its_parse_nets_masks(setup):
    cfg, fm = setup
    reads = apply_overrides(cfg, {"model.input_masks": "parse_net"})
    assert cfg.model.input_masks == "parse_net"  # every preset's default: the paper's pipeline
    torch.manual_seed(0)
    model = _with_head_weights(DFMVR(reads.model, reads.render, fm).eval())
    images = torch.rand(2, 3, 3, 64, 64) * 2 - 1
    with pytest.raises(ValueError, match="model.input_masks is parse_net but no parse net"):
        model(images, render=False)
    parse_net = BiSeNet(width=8).freeze()
    model.set_input_parse_net(parse_net)
    assert not any(k.startswith("input_parse_net") for k in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in DFMVR(reads.model, reads.render, fm).parameters())
    ones = torch.ones(2, 3, 64, 64, dtype=torch.long)
    with torch.no_grad():
        made = model(images, render=False).coeffs  # no masks: the model's parse net makes them
        # the parse net's masks handed in (the mask cache's, in training) give the same
        assert torch.equal(model(images, parsed_masks(parse_net, images), render=False).coeffs, made)
        assert not torch.allclose(model(images, ones, render=False).coeffs, made)
        given = DFMVR(apply_overrides(cfg, {"model.input_masks": "given"}).model, cfg.render, fm).eval()
        given.load_state_dict(model.state_dict())
        assert torch.allclose(given(images, parsed_masks(parse_net, images), render=False).coeffs, made)


def test_gradients_reach_the_model_and_never_the_frozen_parse_net(setup):
    cfg, fm = setup
    torch.manual_seed(0)
    model = DFMVR(cfg.model, cfg.render, fm).train()
    parse_net = BiSeNet(width=8).freeze()
    batch = _batch(fm)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen = set()
    for step in range(3):  # zero-initialised head and residual scales: gradients arrive in waves
        out = model(batch.images, batch.masks)
        total, terms = reconstruction_losses(model, out, batch, cfg.loss, step, parse_net, lazy=False)
        assert set(terms) == {"photo", "mask", "lm2d", "lm3d", "reg", "gamma", "reflect", "total"}
        opt.zero_grad()
        total.backward()
        seen |= {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        assert all(p.grad is None for p in parse_net.parameters())
    missing = {name for name, p in model.named_parameters() if p.requires_grad} - seen
    assert not missing, sorted(missing)[:5]


def test_mask_loss_gradient_reaches_the_coefficients_through_the_parse_net(setup):
    cfg, fm = setup
    model = DFMVR(cfg.model, cfg.render, fm)
    parse_net = BiSeNet(width=8).freeze()
    batch = _batch(fm)
    coeffs = model.encode(batch.images, batch.masks).detach().requires_grad_(True)
    out = model.decode(coeffs)
    only_mask = apply_overrides(cfg, {"loss.photo": 0, "loss.lm2d": 0, "loss.lm3d": 0, "loss.reg": 0,
                                      "loss.gamma": 0, "loss.reflect": 0}).loss
    total, terms = reconstruction_losses(model, out, batch, only_mask, 0, parse_net)
    assert set(terms) == {"mask", "total"}
    total.backward()
    assert coeffs.grad.abs().sum() > 0


def test_cpu_bf16_autocast_only_where_asked_and_supported(setup):
    cfg, fm = setup
    cpu = torch.device("cpu")
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert autocast_dtype(cpu, amp=True, cpu_amp=False) is None  # train.amp alone is a GPU switch
    assert autocast_dtype(cpu, amp=False, cpu_amp=True) == (torch.bfloat16 if native else None)
    if not native:
        pytest.skip("this CPU has no native bf16")
    model = DFMVR(cfg.model, cfg.render, fm).train()
    model.amp_dtype = autocast_dtype(cpu, amp=False, cpu_amp=True)
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = _batch(fm)
    out = model(batch.images, batch.masks)
    # the network runs in bf16; the coefficients and everything after them are float32
    assert seen == [torch.bfloat16]
    assert out.coeffs.dtype == torch.float32 and out.image.dtype == torch.float32
    total, _ = reconstruction_losses(model, out, batch, cfg.loss, step=0, parse_net=None)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_lazy_picture_terms_render_every_nth_step_at_n_times_the_weight(setup):
    cfg, fm = setup
    model = DFMVR(cfg.model, cfg.render, fm)
    parse_net = BiSeNet(width=8).freeze()
    batch = _batch(fm)
    lazy = apply_overrides(cfg, {"loss.picture_every": 3}).loss
    every = apply_overrides(cfg, {"loss.picture_every": 1}).loss
    rendered = model(batch.images, batch.masks)
    plain = model(batch.images, batch.masks, render=False)
    assert plain.image is None
    # a picture step (0, 3, ...) counts photo and mask at three times their weight
    total, terms = reconstruction_losses(model, rendered, batch, lazy, 3, parse_net)
    assert {"photo", "mask"} <= set(terms)
    _, once = reconstruction_losses(model, rendered, batch, every, 3, parse_net)
    extra = 2 * (lazy.photo * terms["photo"] + lazy.mask * terms["mask"])
    torch.testing.assert_close(total, once["total"] + extra)
    # the steps between need no render and count every other term as usual
    total, terms = reconstruction_losses(model, plain, batch, lazy, 4, parse_net)
    assert set(terms) == {"lm2d", "lm3d", "reg", "gamma", "reflect", "total"}
    # validation (lazy=False) counts every term once on any step
    _, val_terms = reconstruction_losses(model, rendered, batch, lazy, 4, parse_net, lazy=False)
    torch.testing.assert_close(val_terms["total"], once["total"])
    # a picture step without the render is a caller's mistake, named
    with pytest.raises(ValueError, match=r"step 6: the \['photo', 'mask'\] term\(s\) need the render"):
        reconstruction_losses(model, plain, batch, lazy, 6, parse_net)


def test_channels_last_is_the_same_step(setup):
    """``train.channels_last`` changes the memory layout, not the numbers: the same losses and
    gradients (to float rounding) as the NCHW step, for every parameter."""
    cfg, fm = setup
    batch = _batch(fm)
    steps = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = _with_head_weights(build_model(apply_overrides(cfg, {"train.channels_last": channels_last}),
                                               face_model=fm).train())
        if channels_last:
            assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                       and not p.is_contiguous() for p in model.parameters())
        out = model(batch.images, batch.masks)
        total, terms = reconstruction_losses(model, out, batch, cfg.loss, 0, lazy=False)
        total.backward()
        steps.append(({k: float(v) for k, v in terms.items()},
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (terms_a, grads_a), (terms_b, grads_b) = steps
    assert terms_a.keys() == terms_b.keys()
    for k in terms_a:
        assert terms_b[k] == pytest.approx(terms_a[k], rel=1e-5, abs=1e-7), k
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    # the convolutions sum in another order: measured 1.4e-3 relative over every gradient (the
    # attention gates' 1-channel maps amplify it), 1e-5 between 1 and 2 threads in one layout
    diff = sum(float((grads_b[n] - g).double().pow(2).sum()) for n, g in grads_a.items())
    norm = sum(float(g.double().pow(2).sum()) for g in grads_a.values())
    assert (diff / norm) ** 0.5 < 5e-3
