"""What both model families share: vocab in the checkpoint, the encoder protocol, loading.

A checkpoint written by any :class:`FashionModule` carries what inference needs
(vocabulary, net config, input size, normalisation) plus the module's class path, so
``load_module(ckpt)`` restores either family without the training config.
"""

from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict

from fashion_lightning.data.vocab import LabelVocabs

CLASS_KEY = "fashion_module_class"


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so checkpoints load with ``weights_only=True``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def as_vocabs(vocabs: LabelVocabs | Mapping[str, Iterable[str]]) -> LabelVocabs:
    return vocabs if isinstance(vocabs, LabelVocabs) else LabelVocabs.from_dict(vocabs)


class FashionModule(L.LightningModule):
    """Base LightningModule: subclasses set ``self.vocabs`` and implement the encoder protocol."""

    vocabs: LabelVocabs
    hparams: AttributeDict  # what save_hyperparameters() stores (Lightning types the property as a MutableMapping)

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
            task: [self.vocabs.decode(task, int(i)) for i in out.argmax(dim=1).tolist()] for task, out in logits.items()
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, not ours, or unsafe."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need code to load: a pickled object, or a class/target outside the package."""


PACKAGE = "fashion_lightning"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _inside_package(path: object) -> bool:
    return isinstance(path, str) and (path == PACKAGE or path.startswith(PACKAGE + "."))


def _allowed_target(path: object) -> bool:
    """A hparams ``_target_`` Hydra may build: ours, or a torch optimizer / LR scheduler class
    (``model.optimizer._target_=torch.optim.SGD``); resolved by attribute, nothing else imported."""
    if _inside_package(path):
        return True
    if not isinstance(path, str):
        return False
    module_path, _, name = path.rpartition(".")
    if module_path not in ("torch.optim", "torch.optim.lr_scheduler"):
        return False
    obj = getattr(importlib.import_module(module_path), name, None)
    return isinstance(obj, type) and issubclass(obj, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler))


def _targets(value: Any) -> Iterator[Any]:
    """Every ``_target_`` value in a nested hparams structure (Hydra instantiates these)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "_target_":
                yield item
            else:
                yield from _targets(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _targets(item)


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded without running code from the file; validated before use.

    ``torch.load(weights_only=True)`` unpickles only tensors and plain containers, so a crafted
    ``__reduce__`` never runs. The module class and every ``_target_`` in the saved hparams must
    live in ``fashion_lightning`` (checked here, before anything is imported); timm / open_clip
    model names are plain strings and are not affected; torch.optim optimizer and LR scheduler classes
    are the one outside family a ``_target_`` may name.
    """
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}") from None
    except Exception as err:  # torch raises many types for damaged files
        found = _GLOBAL_RE.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if found:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {ckpt_path}: it holds a {found.group(1)} object, which a "
                "fashion-lightning checkpoint never contains (only tensors and plain values are loaded)"
            ) from None
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {ckpt_path}: {type(err).__name__}: {first}") from None
    if not isinstance(checkpoint, dict) or CLASS_KEY not in checkpoint:
        raise CheckpointError(f"{ckpt_path} is not a fashion-lightning checkpoint (no '{CLASS_KEY}' entry)")
    cls_path = checkpoint[CLASS_KEY]
    if not _inside_package(cls_path):
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {ckpt_path}: its module class {cls_path!r} is not inside {PACKAGE}"
        )
    for target in _targets(checkpoint.get("hyper_parameters", {})):
        if not _allowed_target(target):
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {ckpt_path}: its hparams name _target_ {target!r}, "
                f"not inside {PACKAGE} (nor a torch.optim optimizer / LR scheduler)"
            )
    return checkpoint


def module_class(checkpoint: Mapping[str, Any], ckpt_path: str | Path = "checkpoint") -> type[FashionModule]:
    """The FashionModule subclass a validated checkpoint names (imported only from inside the package)."""
    module_path, _, name = str(checkpoint[CLASS_KEY]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(
            f"{ckpt_path} names module class {checkpoint[CLASS_KEY]!r}, which does not exist"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, FashionModule)):
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {ckpt_path}: {checkpoint[CLASS_KEY]!r} is not a FashionModule"
        )
    return cls


def load_module(ckpt_path: str, map_location: str | torch.device = "cpu") -> FashionModule:
    """Restore any FashionModule from its checkpoint alone, in eval mode (see :func:`read_checkpoint`)."""
    checkpoint = read_checkpoint(ckpt_path)
    cls = module_class(checkpoint, ckpt_path)
    overrides = cls.inference_overrides(checkpoint.get("hyper_parameters", {}))
    module = cls.load_from_checkpoint(ckpt_path, map_location=map_location, weights_only=True, **overrides)
    return module.eval()
