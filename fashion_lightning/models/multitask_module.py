"""MultiTaskModule: the thin LightningModule around :class:`MultiTaskNet`.

It wires the class-weighted multi-task loss, AdamW + warmup/cosine, an optional frozen
backbone (whole run or first N epochs) and the evaluation protocol. While the backbone
is frozen its pooled features are cached per item id, so head-only epochs skip the
backbone entirely (see ``cache_frozen_features``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from fashion_lightning.data.vocab import LabelVocabs
from fashion_lightning.models.base import FashionModule, as_vocabs, plain
from fashion_lightning.models.losses import MultiTaskLoss
from fashion_lightning.models.multitask import MultiTaskNet
from fashion_lightning.models.optim import adamw_warmup_cosine

DEFAULT_OPTIMIZER = {"lr": 1e-3, "backbone_lr_ratio": 0.1, "weight_decay": 0.01, "warmup_ratio": 0.05, "min_lr_ratio": 0.01}


class MultiTaskModule(FashionModule):
    embedding_name = "multitask"

    def __init__(
        self,
        net: Mapping[str, Any] | nn.Module,
        vocabs: LabelVocabs | Mapping[str, list[str]],
        class_weights: Mapping[str, torch.Tensor] | None = None,
        task_weights: Mapping[str, float] | None = None,
        label_smoothing: float = 0.0,
        optimizer: Mapping[str, float] | None = None,
        freeze_backbone: bool = False,
        freeze_backbone_epochs: int = 0,
        cache_frozen_features: bool = True,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.vocabs = as_vocabs(vocabs)
        net_cfg = plain(net)
        task_weights, optimizer = plain(task_weights), plain(optimizer)
        self.save_hyperparameters(ignore=["net", "class_weights", "vocabs"])
        # what a checkpoint needs to rebuild the net without the training config
        self.hparams["net"] = None if isinstance(net, nn.Module) else net_cfg
        self.hparams["vocabs"] = self.vocabs.to_dict()
        self.net: MultiTaskNet = net if isinstance(net, nn.Module) else instantiate(net_cfg, num_classes=self.vocabs.num_classes)
        weights = dict(class_weights or {})
        for task, n in self.vocabs.num_classes.items():
            weights.setdefault(task, torch.ones(n))  # buffers always exist, so checkpoints load strictly
        self.loss = MultiTaskLoss(self.vocabs.tasks, task_weights, weights, label_smoothing)
        self.optimizer_cfg = {**DEFAULT_OPTIMIZER, **dict(optimizer or {})}
        if freeze_backbone_epochs < 0:
            raise ValueError(f"freeze_backbone_epochs must be >= 0, got {freeze_backbone_epochs}")
        self._feature_cache: dict[int, torch.Tensor] = {}
        if compile:
            self.net.backbone = torch.compile(self.net.backbone)

    @classmethod
    def inference_overrides(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        net = hparams.get("net")
        return {"net": {**net, "pretrained": False, "checkpoint_path": None}} if net else {}

    # -- frozen backbone ------------------------------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        return self.hparams.freeze_backbone or self.current_epoch < self.hparams.freeze_backbone_epochs

    def on_train_epoch_start(self) -> None:
        frozen = self.backbone_frozen
        self.net.backbone.requires_grad_(not frozen)
        if not frozen:
            self._feature_cache.clear()

    def _features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Pooled features; while the backbone is frozen they are computed once per item id
        (train items from their first-epoch view, val/test items unaugmented)."""
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
    def _shared_step(self, batch: Mapping[str, Any], stage: str) -> tuple[torch.Tensor, dict, torch.Tensor]:
        logits, embedding = self.net.head_forward(self._features(batch))
        losses = self.loss(logits, batch["labels"])
        bs = len(batch["id"])
        self.log(f"{stage}/loss", losses["loss"], prog_bar=True, batch_size=bs, sync_dist=stage != "train")
        self.log_dict({f"{stage}/loss/{t}": losses[t] for t in logits}, batch_size=bs, sync_dist=stage != "train")
        return losses["loss"], logits, embedding

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")[0]

    def _eval_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        _, logits, embedding = self._shared_step(batch, stage)
        return {"labels": batch["labels"], "id": batch["id"], "logits": logits, "embedding": embedding}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    # -- encoder protocol -----------------------------------------------------------------
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.embed(images.to(self.device))

    def image_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.net(images.to(self.device))[0]

    @torch.no_grad()
    def image_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, embedding = self.net(images.to(self.device))  # heads and embedding share the backbone pass
        return embedding, logits

    # -- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        cfg = self.optimizer_cfg
        backbone = list(self.net.backbone.parameters())
        backbone_ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if id(p) not in backbone_ids]
        groups = [{"params": rest, "lr": cfg["lr"]}]
        if not self.hparams.freeze_backbone:
            groups.append({"params": backbone, "lr": cfg["lr"] * cfg["backbone_lr_ratio"]})
        return adamw_warmup_cosine(
            groups, total_steps=self.trainer.estimated_stepping_batches, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
            warmup_ratio=cfg["warmup_ratio"], min_lr_ratio=cfg["min_lr_ratio"],
        )  # fmt: skip
