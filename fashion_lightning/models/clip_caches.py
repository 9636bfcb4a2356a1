"""ClipFusionModule's cached partial towers: ``model.cache_text`` (text) and ``model.cache_trunk`` (image).

The CPU CLIP recipe locks both towers and re-opens only their top, yet an uncached step runs both towers
whole on every item. With ``cache_text: {layer: L}`` the MiniLM layers below ``L`` run once per unique title
(:mod:`~fashion_lightning.models.text_trunk`, ``data/text_cache.py``); with ``cache_trunk: {cut, views}`` the
timm image trunk below layer group ``cut`` runs once per augmented view (:mod:`~fashion_lightning.models.trunk`,
``data/trunk_cache.py``, the multi-task family's machinery). Either cut freezes what lies below it. The
LightningModule calls the three hooks here (build the splits, ask the datamodule in ``setup``, embed a batch
from what it carries); the network and checkpoints stay whole, and ``inference_overrides`` drops both settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning.models.text_trunk import TextEncoder, TextSplit
from fashion_lightning.models.trunk import TrunkEncoder, TrunkSplit

if TYPE_CHECKING:
    from fashion_lightning.models.clip import ClipFusionNet

log = logging.getLogger(__name__)


def _freeze(lower: list[nn.Module], what: str) -> None:
    opened = sum(p.numel() for m in lower for p in m.parameters() if p.requires_grad)
    if opened:  # e.g. unlock_last_n re-opened a layer below the cut: the cut wins, say so
        log.warning("%s freezes %d weights that the lock settings would train", what, opened)
    for module in lower:
        module.requires_grad_(False)
        module.eval()


def text_split(net: ClipFusionNet, options: Mapping[str, Any] | None) -> TextSplit | None:
    """The split ``model.cache_text`` asks for (frozen below the cut), or None when it is off."""
    if not options:
        return None
    if "layer" not in options:
        raise ValueError("cache_text needs a layer (the text transformer layer below which the tower is frozen)")
    split = TextSplit(getattr(net.model, "text", None) or net.model, int(options["layer"]))
    _freeze(split.lower_modules, f"cache_text.layer={split.layer}")
    return split


def image_split(net: ClipFusionNet, options: Mapping[str, Any] | None) -> TrunkSplit | None:
    """The split ``model.cache_trunk`` asks for on the image tower's timm trunk, or None when it is off."""
    if not options:
        return None
    if "cut" not in options:
        raise ValueError("cache_trunk needs a cut (the layer group below which the image trunk is frozen)")
    trunk = getattr(net.visual, "trunk", None)
    if trunk is None:
        raise ValueError(f"cache_trunk supports timm image towers (lite0-minilm), not {type(net.visual).__name__}")
    split = TrunkSplit(trunk, int(options["cut"]))
    _freeze(split.lower_modules, f"cache_trunk.cut={split.cut}")
    return split


def cache_options(options: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any] | None:
    """A cache setting with its defaults filled in (None when off), as saved in the hyperparameters."""
    return {**defaults, **dict(options)} if options else None


def attach_caches(module: Any) -> None:
    """LightningModule.setup hook: ask the datamodule for token states / activations at the cuts."""
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return
    for split, method, what in ((module.text_split, "use_text_cache", "cache_text"),
                                (module.trunk, "use_trunk_cache", "cache_trunk")):  # fmt: skip
        if split is not None and not hasattr(datamodule, method):
            log.warning("%s: %s cannot cache it; running the whole tower every step", what, type(datamodule).__name__)
    options = module.hparams
    if module.text_split is not None and hasattr(datamodule, "use_text_cache"):
        datamodule.use_text_cache(TextEncoder(module.net, module.text_split), str(options.cache_text["dtype"]))
    if module.trunk is not None and hasattr(datamodule, "use_trunk_cache"):
        trunk = options.cache_trunk
        datamodule.use_trunk_cache(TrunkEncoder(module, module.trunk), int(trunk["views"]), str(trunk["dtype"]))


def cached_text_embedding(module: Any, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """Normalised text embeddings from the batch's cached token states; None when the batch has none."""
    split: TextSplit | None = module.text_split
    if split is None or "text_states" not in batch:
        return None
    states = batch["text_states"].to(module.device).float()
    return F.normalize(split.upper(states, batch["text_mask"].to(module.device)), dim=-1)


def cached_image_embedding(module: Any, batch: Mapping[str, Any]) -> torch.Tensor | None:
    """Normalised image embeddings from the batch's cached trunk activations; None when the batch has none."""
    split: TrunkSplit | None = module.trunk
    if split is None or "activation" not in batch:
        return None
    features = split.upper(module.preprocess.layout(batch["activation"].to(module.device).float()))
    return F.normalize(module.net.visual.head(features), dim=-1)
