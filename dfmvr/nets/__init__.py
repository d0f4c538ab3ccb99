"""DF-MVR networks: multi-view backbones, coefficient regressors and the face parse nets.

Variants are registered by name (timm style) and built from the config::

    backbone = create_backbone(cfg.model.backbone, in_channels=input_channels(cfg.model),
                               width=cfg.model.width, levels=cfg.model.levels)
    regressor = create_regressor(cfg.model.regressor, in_channels=backbone.out_channels,
                                 width=cfg.model.regressor_width, layout=CoeffLayout(),
                                 view_yaw_deg=cfg.model.view_yaw_deg)
    coeffs = regressor(backbone(views))   # views [B, V, C_in, H, W] -> coeffs [B, 269]

See ``docs/network.md`` for the architectures and their mapping to the paper's ablations.
"""

from __future__ import annotations

from dfmvr.nets import backbones, regressors  # noqa: F401  (registers the variants)
from dfmvr.nets.backbones import FusionBackbone, LateFusionCNNBackbone, LateFusionUNetBackbone
from dfmvr.nets.involution import Involution2d
from dfmvr.nets.parsenet import (
    BUILTIN,
    BiSeNet,
    ParseNet,
    ParseUNet,
    builtin_parsenet_path,
    create_parsenet,
    list_parsenets,
    load_parsenet,
    parsenet_digest,
    parsenet_from_dict,
    read_parsenet_file,
    register_parsenet,
    save_parsenet,
)
from dfmvr.nets.registry import (
    create_backbone,
    create_regressor,
    list_backbones,
    list_regressors,
    register_backbone,
    register_regressor,
)
from dfmvr.nets.regressors import CoefficientRegressor, initial_coefficients

__all__ = [
    "BUILTIN", "BiSeNet", "CoefficientRegressor", "FusionBackbone", "Involution2d", "LateFusionCNNBackbone",
    "LateFusionUNetBackbone", "ParseNet", "ParseUNet", "builtin_parsenet_path", "create_backbone", "create_parsenet", "create_regressor",
    "initial_coefficients", "list_backbones", "list_parsenets", "list_regressors", "load_parsenet",
    "parsenet_digest", "parsenet_from_dict", "read_parsenet_file", "register_backbone", "register_parsenet",
    "register_regressor", "save_parsenet",
]
