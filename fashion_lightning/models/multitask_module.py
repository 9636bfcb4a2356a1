"""MultiTaskModule: the thin LightningModule around :class:`MultiTaskNet`.

It wires the class-weighted multi-task loss, the backbone's parameter-group rules
(``model.param_groups``: backbone LR ratio, layer decay), an optional frozen backbone (whole
run or first N epochs) and the evaluation protocol; the rest is :class:`FashionModule`'s.
While the backbone is frozen its pooled features are cached per item id, so head-only
epochs skip the backbone entirely (see ``cache_frozen_features``).

Fine-tuning switches (each off by default, each one config key): ``ema`` (weight EMA
through Lightning's ``WeightAveraging``), ``mixup`` (Mixup/CutMix with soft targets per
task), ``model.param_groups.layer_decay`` (layer-wise LR decay over the backbone),
``flip_tta`` (evaluate on the image and its mirror), ``compile`` (``torch.compile`` of the
backbone in ``configure_model``, so loading a checkpoint for eval/index never compiles).

``cache_trunk: {cut, views, dtype}`` freezes the trunk below layer group ``cut`` and trains the rest from
activations the datamodule caches once per augmented view (``data/trunk_cache.py``; batches then carry
``activation`` instead of ``image``). The network and its checkpoints stay whole: loading for
eval/index/serve drops the setting and runs images through every layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fashion_lightning.data.vocab import LabelVocabs
from fashion_lightning.models.base import FashionModule
from fashion_lightning.models.finetune import make_mixup
from fashion_lightning.models.losses import MultiTaskLoss, fill_class_weights
from fashion_lightning.models.multitask import MultiTaskNet
from fashion_lightning.models.optim import layer_scales
from fashion_lightning.models.trunk import TRUNK_CACHE_DEFAULTS, TrunkEncoder, TrunkSplit

log = logging.getLogger(__name__)
BACKBONE = "net.backbone."  # parameter-name prefix of the backbone (the group rules' target)


class MultiTaskModule(FashionModule):
    embedding_name = "multitask"
    net: MultiTaskNet
    conf_name = "multitask"
    offline_net = {"pretrained": False, "checkpoint_path": None}
    optimise_frozen = True  # the backbone joins the optimiser even while frozen for the first epochs

    def __init__(
        self,
        net: Mapping[str, Any] | MultiTaskNet,
        vocabs: LabelVocabs | Mapping[str, list[str]],
        class_weights: Mapping[str, torch.Tensor] | None = None,
        task_weights: Mapping[str, float] | None = None,
        label_smoothing: float = 0.0,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        param_groups: Mapping[str, Any] | None = None,
        freeze_backbone: bool = False,
        freeze_backbone_epochs: int = 0,
        cache_frozen_features: bool = True,
        ema: Mapping[str, Any] | float | None = None,
        mixup: Mapping[str, Any] | None = None,
        flip_tta: bool = False,
        compile: bool | Mapping[str, Any] = False,
        cache_trunk: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if freeze_backbone_epochs < 0:
            raise ValueError(f"freeze_backbone_epochs must be >= 0, got {freeze_backbone_epochs}")
        if cache_trunk and (freeze_backbone or freeze_backbone_epochs or flip_tta):
            raise ValueError(
                "cache_trunk cannot be combined with freeze_backbone / freeze_backbone_epochs (freeze with the cut "
                "instead) or flip_tta (cached activations have no mirror image)"
            )
        self.init_shared(net, vocabs)
        weights = fill_class_weights(self.vocabs.num_classes, class_weights)
        self.loss = MultiTaskLoss(self.vocabs.tasks, self.hparams.task_weights, weights, label_smoothing)
        self.mixup = make_mixup(self.hparams.mixup)
        self._feature_cache: dict[int, torch.Tensor] = {}
        self.trunk: TrunkSplit | None = None
        if cache_trunk:
            options = {**TRUNK_CACHE_DEFAULTS, **dict(cache_trunk)}
            if "cut" not in options:
                raise ValueError("cache_trunk needs a cut (the layer group below which the trunk is frozen)")
            self.hparams["cache_trunk"] = options
            self.trunk = TrunkSplit(self.net.backbone, int(options["cut"]))
            self.trunk.freeze_lower()

    def net_build_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.vocabs.num_classes}

    @classmethod
    def inference_overrides(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        # ... and run the whole network on images (the cut is a training detail)
        return {**super().inference_overrides(hparams), "cache_trunk": None}

    def compiled_parts(self) -> list[nn.Module]:
        return [self.net.backbone]

    # -- cached partial trunk -------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Ask the datamodule to serve cached activations at the cut (it builds them on first use)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.trunk is None or datamodule is None:
            return
        if not hasattr(datamodule, "use_trunk_cache"):
            log.warning("cache_trunk: %s cannot cache activations; computing the lower trunk every step",
                        type(datamodule).__name__)  # fmt: skip
            return
        options = self.hparams.cache_trunk
        datamodule.use_trunk_cache(TrunkEncoder(self.net, self.trunk), int(options["views"]), str(options["dtype"]))

    def train(self, mode: bool = True) -> MultiTaskModule:
        """Lightning switches the whole module to train mode each epoch; the frozen lower trunk stays in eval."""
        super().train(mode)
        if getattr(self, "trunk", None) is not None:
            self.trunk.freeze_lower()  # type: ignore[union-attr]
        return self

    def _trunk_input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Activations at the cut: cached ones from the batch, else computed from the images (frozen, no grad)."""
        assert self.trunk is not None
        if "activation" in batch:
            return self.net.preprocess.layout(batch["activation"].float())
        with torch.no_grad():
            return self.trunk.lower(self.net.preprocess(batch["image"]))

    # -- frozen backbone ------------------------------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        return self.hparams.freeze_backbone or self.current_epoch < self.hparams.freeze_backbone_epochs

    def on_train_epoch_start(self) -> None:
        frozen = self.backbone_frozen
        self.net.backbone.requires_grad_(not frozen)
        if self.trunk is not None:
            self.trunk.freeze_lower()
        if not frozen:
            self._feature_cache.clear()

    def _features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Pooled features; while the backbone is frozen they are computed once per item id
        (train items from their first-epoch view, val/test items unaugmented)."""
        if self.trunk is not None:
            return self.trunk.upper(self._trunk_input(batch))
        if not self.backbone_frozen:
            return self.net.features(batch["image"])
        if not self.hparams.cache_frozen_features:
            return self._frozen_features(batch["image"])
        ids = batch["id"].tolist()
        missing = [k for k, i in enumerate(ids) if i not in self._feature_cache]
        if missing:
            for k, feat in zip(missing, self._frozen_features(batch["image"][missing])):
                self._feature_cache[ids[k]] = feat
        return torch.stack([self._feature_cache[i] for i in ids])

    def _frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone in eval mode without grad: fixed BN statistics keep cached features valid."""
        was_training = self.net.backbone.training
        self.net.backbone.eval()
        with torch.no_grad():
            features = self.net.features(images).float()
        self.net.backbone.train(was_training)
        return features

    # -- steps ----------------------------------------------------------------------------
    def _log_losses(self, losses: Mapping[str, torch.Tensor], stage: str, bs: int) -> None:
        sync = stage != "train"
        self.log(f"{stage}/loss", losses["loss"], prog_bar=True, batch_size=bs, sync_dist=sync)
        self.log_dict({f"{stage}/loss/{t}": v for t, v in losses.items() if t != "loss"}, batch_size=bs, sync_dist=sync)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        mix = None
        if self.mixup is not None and self.trunk is not None:  # mix activations at the cut (manifold mixup)
            x, mix = self.mixup(self._trunk_input(batch))
            features = self.trunk.upper(x)
        elif self.mixup is not None and not self.backbone_frozen:  # cached features cannot be mixed
            x, mix = self.mixup(self.net.preprocess(batch["image"]))
            features = self.net.backbone(x)
        else:
            features = self._features(batch)
        logits, _ = self.net.head_forward(features)
        losses = self.loss(logits, batch["labels"], mix)
        self._log_losses(losses, "train", len(batch["id"]))
        return losses["loss"]

    def eval_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        if self.hparams.flip_tta:
            logits, embedding = self.net(batch["image"], flip_tta=True)
        else:
            logits, embedding = self.net.head_forward(self._features(batch))
        self._log_losses(self.loss(logits, batch["labels"]), stage, len(batch["id"]))
        return {"labels": batch["labels"], "id": batch["id"], "logits": logits, "embedding": embedding}

    # -- encoder protocol -----------------------------------------------------------------
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images.to(self.device), flip_tta=self.hparams.flip_tta)

    def image_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.net(images.to(self.device), flip_tta=self.hparams.flip_tta)[0]

    @torch.no_grad()
    def image_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, embedding = self.net(images.to(self.device))  # heads and embedding share the backbone pass
        return embedding, logits

    # -- optimisation ---------------------------------------------------------------------
    def optimised_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """All but a backbone frozen for the whole run and the trunk below a cache cut (frozen for good)."""
        below_cut = {id(p) for p in self.trunk.lower_parameters()} if self.trunk is not None else set()
        frozen_for_good = self.hparams.freeze_backbone
        return [
            (n, p)
            for n, p in self.named_parameters()
            if not (frozen_for_good and n.startswith(BACKBONE)) and id(p) not in below_cut
        ]

    def lr_rule(self) -> Callable[[str], float]:
        """Heads at ``lr``; backbone at ``lr * backbone_lr_ratio`` (times ``layer_decay ** depth``)."""
        ratio = float(self.optim.rules.get("backbone_lr_ratio", 1.0))
        decay = self.optim.rules.get("layer_decay")
        depth_scale = layer_scales(self.net.backbone, float(decay)) if decay else {}

        def lr_scale(name: str) -> float:
            if not name.startswith(BACKBONE):
                return 1.0
            return ratio * depth_scale.get(name[len(BACKBONE) :].replace("_orig_mod.", ""), 1.0)

        return lr_scale
