"""What both model families share: the LightningModule plumbing, the encoder protocol, loading.

:class:`FashionModule` holds what a family would otherwise write again: hyperparameters kept as plain
values with the vocabulary and the net config, the net built through the registry, the optimiser and
scheduler (``models/optim.py``, defaults from the family's ``conf/model`` file), ``torch.compile`` in
``configure_model``, the EMA callback and the validation / test step plumbing. A family adds its loss,
its steps and the encoder protocol.

A checkpoint written by any :class:`FashionModule` carries what inference needs
(vocabulary, net config, input size, normalisation) plus the module's class path, so
``load_module(ckpt)`` restores either family without the training config. Nothing in a file chooses
code: the class path is a key of ``models/registry.py`` and the hyperparameters are validated against
``models/spec.py`` before the module is built from them (see README "Safety").
"""

from __future__ import annotations

import inspect
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import nn

from fashion_lightning.data.vocab import LabelVocabs
from fashion_lightning.models import registry
from fashion_lightning.models.finetune import ema_callbacks
from fashion_lightning.models.optim import OptimSetup, configure
from fashion_lightning.models.registry import UnknownTargetError
from fashion_lightning.utils.bounded import LimitError, Limits, check

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig

CLASS_KEY = "fashion_module_class"
FAMILY_KEY = "fashion_family"  # set by read_checkpoint after validation (never trusted from the file)


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python, so checkpoints load with ``weights_only=True``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def as_vocabs(vocabs: LabelVocabs | Mapping[str, Iterable[str]]) -> LabelVocabs:
    return vocabs if isinstance(vocabs, LabelVocabs) else LabelVocabs.from_dict(vocabs)


class FashionModule(L.LightningModule):
    """Base LightningModule of both families (see module doc); a subclass's ``__init__`` calls
    :meth:`init_shared` with its ``net`` and ``vocabs``, then builds its loss and extras."""

    vocabs: LabelVocabs
    hparams: AttributeDict  # what save_hyperparameters() stores (Lightning types the property as a MutableMapping)
    net: nn.Module
    optim: OptimSetup
    conf_name: ClassVar[str]  # conf/model/<conf_name>.yaml: where the optimiser, scheduler and group defaults live
    offline_net: ClassVar[dict[str, Any]] = {}  # net keys that make loading offline (no pretrained weights)
    optimise_frozen: ClassVar[bool] = False  # keep frozen parameters in the optimiser (unfrozen later)

    # --- set-up --------------------------------------------------------------------------
    def init_shared(self, net: Mapping[str, Any] | nn.Module, vocabs: LabelVocabs | Mapping[str, Any]) -> None:
        """Save the caller's ``__init__`` arguments as plain hyperparameters (``net`` as its config,
        ``vocabs`` as lists: what a checkpoint needs to rebuild the module), build the net, resolve the
        optimiser set-up. Call it from the subclass's ``__init__`` (its arguments are read from that frame)."""
        self.vocabs = as_vocabs(vocabs)
        net_cfg = plain(net)
        caller = inspect.currentframe()
        self.save_hyperparameters(ignore=["net", "class_weights", "vocabs"], frame=caller.f_back if caller else None)
        for key, value in list(self.hparams.items()):  # plain containers: weights_only checkpoint loading
            self.hparams[key] = plain(value)
        self.hparams["net"] = None if isinstance(net, nn.Module) else net_cfg
        self.hparams["vocabs"] = self.vocabs.to_dict()
        self.net = net if isinstance(net, nn.Module) else registry.build_net(net_cfg, **self.net_build_kwargs())
        self.optim = OptimSetup.resolve(
            self.hparams.get("optimizer"), self.hparams.get("scheduler"), self.hparams.get("param_groups"),
            self.conf_name,
        )  # fmt: skip

    def net_build_kwargs(self) -> dict[str, Any]:
        """Arguments the net gets besides its config (the multi-task heads' sizes)."""
        return {}

    @classmethod
    def inference_overrides(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Hyperparameter overrides that make loading offline and cheap: no pretrained weights (the state dict
        fills the net), no compile (eval / index compile only when asked)."""
        net = hparams.get("net")
        overrides: dict[str, Any] = {"compile": False}
        if net:
            overrides["net"] = {**net, **cls.offline_net}
        return overrides

    def compiled_parts(self) -> list[nn.Module]:
        """The submodules ``compile: true`` compiles (in place, so state-dict keys are unchanged)."""
        return []

    def configure_model(self) -> None:
        """Compile :meth:`compiled_parts` once a Trainer runs (building for eval / index never compiles)."""
        if self.hparams.compile and not getattr(self, "_compiled", False):
            options = self.hparams.compile if isinstance(self.hparams.compile, Mapping) else {}
            for part in self.compiled_parts():
                part.compile(**options)
            self._compiled = True

    def configure_callbacks(self) -> list:
        return ema_callbacks(self.hparams.ema)

    # --- optimisation --------------------------------------------------------------------
    def optimised_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The named parameters the optimiser gets (all by default; frozen ones drop out unless
        ``optimise_frozen``)."""
        return list(self.named_parameters())

    def lr_rule(self) -> Callable[[str], float]:
        """Parameter name -> LR multiplier, from the group rules (``self.optim.rules``); 1 for all by default."""
        return lambda name: 1.0

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """Groups by :meth:`lr_rule` (no weight decay where ``ndim <= 1``), the configured optimiser and
        scheduler, stepped per batch (see ``models/optim.py``)."""
        return configure(
            self.optimised_parameters(), self.optim.optimizer, self.optim.scheduler,
            self.trainer.estimated_stepping_batches, self.device, self.lr_rule(),
            trainable_only=not self.optimise_frozen,
        )  # fmt: skip

    # --- evaluation ----------------------------------------------------------------------
    def eval_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        """One validation / test batch -> the evaluation protocol's outputs (labels, id, logits, embedding)."""
        raise NotImplementedError

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.eval_step(batch, "test")

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, not ours, or unsafe."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would need code to load: a pickled object, or a class/target outside the package."""


PACKAGE = "fashion_lightning"
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
# a checkpoint's hyperparameters are small: a few hundred values and a vocabulary of a few thousand labels
HPARAMS_LIMITS = Limits(max_depth=12, max_nodes=200_000, max_string=4096)


def _torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, so no ``__reduce__`` runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as err:  # torch raises many types for damaged files
        found = _GLOBAL_RE.search(str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if found:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {path}: it holds a {found.group(1)} object, which a "
                "fashion-lightning checkpoint never contains (only tensors and plain values are loaded)"
            ) from None
        first = (str(err).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {first[:300]}") from None


def checked_hparams(family: str, hparams: Any, where: str | Path) -> dict[str, Any]:
    """Hyperparameters from a file, bounded (depth, size) then validated against the family's typed spec."""
    from fashion_lightning.models.spec import SpecError, validate_hparams

    try:
        check(hparams, HPARAMS_LIMITS, "its hyperparameters")
        return validate_hparams(family, hparams)
    except (LimitError, SpecError, UnknownTargetError) as err:
        raise UnsafeCheckpointError(f"refusing to load {where}: {err}") from None


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, loaded without running code from the file and validated before use.

    The module class it records must be a registered family (exact name, see ``models/registry.py``) and
    its hyperparameters must fit that family's typed spec (``models/spec.py``); the returned checkpoint's
    ``hyper_parameters`` are the validated ones and ``fashion_family`` names the family.
    """
    checkpoint = _torch_load(ckpt_path)
    if not isinstance(checkpoint, dict) or CLASS_KEY not in checkpoint:
        raise CheckpointError(f"{ckpt_path} is not a fashion-lightning checkpoint (no '{CLASS_KEY}' entry)")
    cls_path = checkpoint[CLASS_KEY]
    try:
        cls = registry.module_class(cls_path)
    except UnknownTargetError:
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint {ckpt_path}: its module class {str(cls_path)[:200]!r} is not a "
            f"registered model family ({', '.join(registry.families())})"
        ) from None
    family = registry.family_of_class(cls)
    checkpoint["hyper_parameters"] = checked_hparams(family, checkpoint.get("hyper_parameters"), ckpt_path)
    checkpoint[FAMILY_KEY] = family
    return checkpoint


def build_module(family: str, hparams: Mapping[str, Any], where: str | Path = "the file") -> FashionModule:
    """A module of a registered family from validated hyperparameters, built for inference: no pretrained
    weights are fetched (what a file names as weights is never read), nothing is compiled."""
    cls = registry.module_class(family)
    try:
        return cls(**{**hparams, **cls.inference_overrides(hparams)})
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as err:  # e.g. an unknown timm name
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{where}: cannot build the {family} model it describes: {first}") from None


def module_class(checkpoint: Mapping[str, Any], ckpt_path: str | Path = "checkpoint") -> type[FashionModule]:
    """The FashionModule subclass a checkpoint read by :func:`read_checkpoint` names (registry lookup)."""
    return registry.module_class(checkpoint[FAMILY_KEY])


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> FashionModule:
    """Restore any FashionModule, in eval mode, from a model artefact folder (``model/``), its
    ``model.json``, or a Lightning ``.ckpt`` (see :func:`read_checkpoint`). Never runs code from the file."""
    from fashion_lightning.models.artifact import is_artifact, load_artifact

    if is_artifact(path):
        return load_artifact(path, map_location)
    checkpoint = read_checkpoint(path)
    module = build_module(checkpoint[FAMILY_KEY], checkpoint["hyper_parameters"], path)
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} has no state_dict of tensors")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit its own config: {str(err).splitlines()[0][:300]}") from None
    return module.to(map_location).eval()
