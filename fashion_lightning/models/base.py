"""What both model families share: vocab in the checkpoint, the encoder protocol, loading.

A checkpoint written by any :class:`FashionModule` carries what inference needs
(vocabulary, net config, input size, normalisation) plus the module's class path, so
``load_module(ckpt)`` restores either family without the training config.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from fashion_lightning.data.vocab import LabelVocabs

CLASS_KEY = "fashion_module_class"


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so checkpoints load with ``weights_only=True``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def as_vocabs(vocabs: LabelVocabs | Mapping[str, Any]) -> LabelVocabs:
    return vocabs if isinstance(vocabs, LabelVocabs) else LabelVocabs.from_dict(vocabs)


class FashionModule(L.LightningModule):
    """Base LightningModule: subclasses set ``self.vocabs`` and implement the encoder protocol."""

    vocabs: LabelVocabs

    # --- encoder protocol (see README "Architecture") -------------------------------------
    embedding_name: str = "embedding"

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no text encoder; use a CLIP checkpoint for text queries")

    def image_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-task logits for uint8 images; {} for models without attribute heads."""
        return {}

    def image_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Embeddings and per-task logits; subclasses override this to share one forward pass."""
        return self.embed_images(images), self.image_logits(images)

    @torch.no_grad()
    def predict_attributes(self, images: torch.Tensor) -> dict[str, list[str]]:
        return self._decode_logits(self.image_logits(images.to(self.device)))

    @torch.no_grad()
    def embed_and_predict(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[str]]]:
        """Photo queries: embedding and predicted attributes from one pass through the network."""
        embedding, logits = self.image_outputs(images.to(self.device))
        return embedding, self._decode_logits(logits)

    def _decode_logits(self, logits: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
        return {
            task: [self.vocabs.decode(task, int(i)) for i in out.argmax(dim=1).tolist()]
            for task, out in logits.items()
        }

    def embed_items(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"embedding": self.embed_images(batch["image"])}

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        out = {k: v.float().cpu() for k, v in self.embed_items(batch).items()}
        out["id"] = batch["id"].cpu()
        return out

    # --- checkpoints ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    @classmethod
    def inference_overrides(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Hyperparameter overrides that make loading offline and cheap (no pretrained downloads)."""
        return {}


def load_module(ckpt_path: str, map_location: str | torch.device = "cpu") -> FashionModule:
    """Restore any FashionModule from its checkpoint alone, in eval mode."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}") from None
    except Exception as err:  # torch raises many types for damaged files
        raise ValueError(f"cannot read checkpoint {ckpt_path}: {err}") from err
    if CLASS_KEY not in checkpoint:
        raise ValueError(f"{ckpt_path} is not a fashion-lightning checkpoint (no '{CLASS_KEY}' entry)")
    module_path, _, name = checkpoint[CLASS_KEY].rpartition(".")
    cls = getattr(importlib.import_module(module_path), name)
    overrides = cls.inference_overrides(checkpoint.get("hyper_parameters", {}))
    module = cls.load_from_checkpoint(ckpt_path, map_location=map_location, weights_only=False, **overrides)
    return module.eval()
