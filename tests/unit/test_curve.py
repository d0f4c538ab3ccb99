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
    cfg = apply_overrides(tiny(), {"data.url": str(root), "data.num_workers": 0, "data.batch_size": 2})
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
