"""Split a timm trunk at a layer group: a frozen lower part whose activations can be cached, and the rest.

With a pretrained trunk the early layers barely move during fine-tuning, so ``model.cache_trunk`` runs them
once per augmented view (``data/trunk_cache.py``) and trains only what lies above the cut. The split is a
view on the backbone's own submodules (no copies, no new state-dict keys): checkpoints keep the whole
network, and ``upper(lower(x))`` is exactly ``backbone(x)`` (tested per supported architecture).

A trunk is described as ``stem -> groups[0] -> ... -> groups[n-1] -> tail -> forward_head``; ``cut=k``
puts the stem and the first ``k`` groups below the cut. The table below names those parts per timm class
(exact class names, no attribute guessing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

# model.cache_trunk keys a config may leave out, for both families: the views per item and the stored dtype
TRUNK_CACHE_DEFAULTS = {"views": 4, "dtype": "float16"}

if TYPE_CHECKING:
    from fashion_lightning.models.multitask import MultiTaskNet

# timm class name -> (stem attributes, attribute holding the layer groups, tail attributes)
_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "EfficientNet": (("conv_stem", "bn1"), ("blocks",), ("conv_head", "bn2")),
    "MobileNetV3": (("conv_stem", "bn1"), ("blocks",), ()),
    "ResNet": (("conv1", "bn1", "act1", "maxpool"), ("layer1", "layer2", "layer3", "layer4"), ()),
    "ConvNeXt": (("stem",), ("stages",), ("norm_pre",)),
}


def _groups(backbone: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    if len(names) == 1:  # one container of groups (blocks / stages)
        return list(getattr(backbone, names[0]).children())
    return [getattr(backbone, n) for n in names]


def num_groups(backbone: nn.Module) -> int:
    """How many layer groups the trunk has (valid cuts are 0..num_groups)."""
    return len(_groups(backbone, _layout(backbone)[1]))


def _layout(backbone: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    name = type(backbone).__name__
    if name not in _LAYOUTS:
        raise ValueError(f"cache_trunk supports timm {sorted(_LAYOUTS)} trunks, not {name}")
    return _LAYOUTS[name]


@dataclass
class TrunkSplit:
    """The backbone cut after layer group ``cut``: ``lower`` (frozen, cacheable) and ``upper`` (trained)."""

    backbone: nn.Module
    cut: int

    def __post_init__(self) -> None:
        stem, groups, tail = _layout(self.backbone)
        self._stem = [getattr(self.backbone, n) for n in stem]
        self._groups = _groups(self.backbone, groups)
        self._tail = [getattr(self.backbone, n) for n in tail]
        if not 0 <= self.cut <= len(self._groups):
            raise ValueError(
                f"cache_trunk.cut must be in 0..{len(self._groups)} for {type(self.backbone).__name__}, got {self.cut}"
            )

    @property
    def lower_modules(self) -> list[nn.Module]:
        return [*self._stem, *self._groups[: self.cut]]

    def lower_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.lower_modules for p in m.parameters()]

    def freeze_lower(self) -> None:
        """No gradients and fixed BatchNorm statistics below the cut (cached activations stay valid)."""
        for module in self.lower_modules:
            module.requires_grad_(False)
            module.eval()

    def lower(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images -> activations at the cut."""
        for module in self.lower_modules:
            x = module(x)
        return x

    def upper(self, x: torch.Tensor) -> torch.Tensor:
        """Activations at the cut -> the backbone's pooled features (what ``backbone(images)`` returns)."""
        for module in (*self._groups[self.cut :], *self._tail):
            x = module(x)
        return self.backbone.forward_head(x)  # type: ignore[operator]  # timm models define forward_head

    def fingerprint(self, extra: Sequence[object] = ()) -> str:
        """Content hash of everything the cached activations depend on: layout, cut, lower weights and buffers."""
        digest = hashlib.sha1(f"{type(self.backbone).__name__}:{self.cut}:{list(extra)}".encode())
        for module in self.lower_modules:
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


class TrunkEncoder:
    """The model's side of the cache: uint8 images -> activations at the cut (preprocess + lower, no grad).

    ``net`` is whatever owns the input pipeline: a :class:`MultiTaskNet`, or a ``ClipFusionModule`` (its
    ``preprocess`` and parameters). Runs on the device the net is on when the datamodule asks (after Lightning
    moved the model). ``fingerprint`` covers the lower weights and the input pipeline (size, mean, std), which
    are not all in the state dict.
    """

    def __init__(self, net: MultiTaskNet | Any, split: TrunkSplit) -> None:
        self.net, self.split = net, split
        pre = net.preprocess
        extra = [tuple(pre.image_size), pre.mean.flatten().tolist(), pre.std.flatten().tolist(), pre.channels_last]
        self.fingerprint = split.fingerprint(extra)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        self.split.freeze_lower()
        return self.split.lower(self.net.preprocess(images.to(device)))
