"""ClipFusionModule: the thin LightningModule around :class:`ClipFusionNet`.

Two modes (the study's "CLIP recommender", made trainable):

* ``frozen``: the pretrained dual encoder as is. Without attribute heads there is nothing
  to fit (``requires_training`` is False: the train app only tests); with heads it is a
  linear probe on the frozen image embedding.
* ``finetune``: open_clip's contrastive ``ClipLoss`` between each image and its
  productDisplayName (learnable temperature, lock / unlock options on the net), plus,
  with ``heads=True``, the class-weighted multi-task loss on linear heads over the image
  embedding (the study's "CLIP multi-task model").

Evaluation returns the shared protocol dict. Items are embedded as
``fuse(image, text, alpha)``; per-task logits come from the heads or, without heads, from
zero-shot prompts (one text embedding per class, cached per epoch). ``extra_metrics``
adds zero-shot accuracy per task and Marqo's KAGL retrieval benchmark.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning.data.duplicates import normalise_title
from fashion_lightning.data.vocab import LabelVocabs
from fashion_lightning.models import clip_caches
from fashion_lightning.models.base import FashionModule
from fashion_lightning.models.clip import MAX_LOGIT_SCALE, ClipFusionNet, fuse
from fashion_lightning.models.fusion import FUSIONS, FusionGate
from fashion_lightning.models.losses import (
    IGNORE_INDEX,
    MultiTaskLoss,
    SigmoidContrastive,
    fill_class_weights,
    multi_positive_infonce,
    positive_mask,
    supervised_contrastive,
)
from fashion_lightning.models.preprocess import DeviceInput
from fashion_lightning.models.trunk import TRUNK_CACHE_DEFAULTS

MODES = ("frozen", "finetune")
LOSSES = ("infonce", "siglip")
TEXT_BATCH = 256
NEW_PREFIXES = ("heads.", "gate.", "sigmoid_loss.")  # the recipe's parameters without pretrained weights


class ClipFusionModule(FashionModule):
    """See module doc. ``net`` is a config (``_target_`` + kwargs, kept in the checkpoint) or a module."""

    net: ClipFusionNet
    conf_name = "clip_lite0_minilm"
    offline_net = {"pretrained": None}  # the checkpoint's state dict fills the net

    def __init__(
        self,
        net: Mapping[str, Any] | ClipFusionNet,
        vocabs: LabelVocabs | Mapping[str, list[str]],
        class_weights: Mapping[str, torch.Tensor] | None = None,
        mode: str = "finetune",
        alpha: float = 0.7,
        heads: bool = False,
        task_weights: Mapping[str, float] | None = None,
        label_smoothing: float = 0.0,
        contrastive_weight: float = 1.0,
        loss: str = "infonce",
        siglip_init_bias: float = -5.0,
        multi_positive: bool = False,
        fusion: str = "fixed",
        fusion_weight: float = 0.0,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        param_groups: Mapping[str, Any] | None = None,
        zero_shot_prompt: str | Sequence[str] | Mapping[str, str | Sequence[str]] = "a photo of a {label}",
        kagl: bool = True,
        kagl_max_queries: int | None = 2000,
        channels_last: bool = False,
        ema: Mapping[str, Any] | float | None = None,
        compile: bool | Mapping[str, Any] = False,
        cache_text: Mapping[str, Any] | None = None,
        cache_trunk: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        check_recipe(loss, fusion, fusion_weight, zero_shot_prompt)
        self.init_shared(net, vocabs)
        self.preprocess = DeviceInput(
            image_size=self.net.image_size,
            mean=self.net.image_mean,
            std=self.net.image_std,
            channels_last=channels_last,
        )
        if channels_last:  # the tower's weights too: a channels_last input alone makes the convolutions reorder them
            self.net.visual.to(memory_format=torch.channels_last)
        if mode == "frozen":
            self.net.requires_grad_(False)
            self.net.eval()
        self.heads = nn.ModuleDict(
            {t: nn.Linear(self.net.embed_dim, n) for t, n in self.vocabs.num_classes.items()} if heads else {}
        )
        weights = fill_class_weights(self.vocabs.num_classes, class_weights)
        self.task_loss = (
            MultiTaskLoss(self.vocabs.tasks, self.hparams.task_weights, weights, label_smoothing) if heads else None
        )
        self.clip_loss: nn.Module | None = None
        # the recipe's trainable extras (new parameters: trained at new_lr, saved in the state dict)
        self.sigmoid_loss = SigmoidContrastive(siglip_init_bias) if loss == "siglip" else None
        self.gate = FusionGate(self.net.embed_dim, alpha) if fusion == "gated" else None
        self._class_text: dict[str, torch.Tensor] | None = None
        self._text_cache: dict[str, torch.Tensor] = {}  # locked text tower only (see _train_text_embedding)
        self._new_param_names = self._parameters_without_pretraining()
        # model.cache_text / cache_trunk: frozen lower layers of either tower, served from caches (clip_caches.py)
        self.hparams["cache_text"] = clip_caches.cache_options(cache_text, {"dtype": "float16"})
        self.hparams["cache_trunk"] = clip_caches.cache_options(cache_trunk, TRUNK_CACHE_DEFAULTS)
        self.text_split = clip_caches.text_split(self.net, cache_text)
        self.trunk = clip_caches.image_split(self.net, cache_trunk)

    # --- configuration -----------------------------------------------------------------------
    @classmethod
    def inference_overrides(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        # the cuts are training details: the artefact holds the whole network
        return {**super().inference_overrides(hparams), "cache_text": None, "cache_trunk": None}

    def compiled_parts(self) -> list[nn.Module]:
        """Both towers."""
        return [t for t in (self.net.visual, getattr(self.net.model, "text", None)) if t is not None]

    @property
    def requires_training(self) -> bool:
        """False for a frozen net without heads or gate: nothing to fit, the train app only tests."""
        return self.hparams.mode == "finetune" or bool(self.hparams.heads) or self.gate is not None

    @property
    def embedding_name(self) -> str:  # type: ignore[override]
        if self.gate is not None:
            return f"clip_fused(gated, start alpha={self.hparams.alpha:g})"
        return f"clip_fused(alpha={self.hparams.alpha:g})"

    def prompt_templates(self, task: str) -> list[str]:
        """The task's zero-shot templates: one, or an ensemble whose class embeddings are averaged."""
        prompts = self.hparams.zero_shot_prompt
        if isinstance(prompts, Mapping):
            prompts = prompts.get(task, prompts.get("default", "a photo of a {label}"))
        return [str(prompts)] if isinstance(prompts, str) else [str(p) for p in prompts]

    def _parameters_without_pretraining(self) -> set[str]:
        """Names of net parameters that start random (the image projection a timm tower gets, ...)."""
        names = set()
        visual_head = getattr(self.net.visual, "head", None)
        if self.net.shipped and visual_head is not None and hasattr(self.net.visual, "trunk"):
            names |= {f"net.model.visual.head.{n}" for n, _ in visual_head.named_parameters()}
        text_proj = getattr(getattr(self.net.model, "text", None), "proj", None)
        if self.net.shipped and text_proj is not None and hasattr(self.net.model.text, "transformer"):
            names |= {f"net.model.text.proj.{n}" for n, _ in text_proj.named_parameters()}
        return names

    def setup(self, stage: str) -> None:
        self.clip_loss = None  # rebuilt for this trainer's world size
        clip_caches.attach_caches(self)  # cache_text / cache_trunk: the datamodule serves the cached layers

    def _contrastive(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, batch: Mapping[str, Any]
    ) -> torch.Tensor:
        """The configured image-text loss; under DDP every rank's negatives are gathered (with grad).

        ``infonce`` without ``multi_positive`` is open_clip's ``ClipLoss``; otherwise the
        positives are the diagonal plus, with ``multi_positive``, every pair with the same
        title or photo (:func:`contrastive_keys`).
        """
        if self.hparams.loss == "infonce" and not self.hparams.multi_positive:
            return self._clip_loss(image, text, scale)
        keys = contrastive_keys(batch, len(image), self.hparams.multi_positive, image.device)
        image, text, keys = self._gather(image, text, keys)
        positives = positive_mask(keys[:, 0]) | positive_mask(keys[:, 1]) | positive_mask(keys[:, 2])
        if self.sigmoid_loss is not None:
            return self.sigmoid_loss(image, text, scale, positives)
        return multi_positive_infonce(image, text, scale, positives)

    def _gather(
        self, image: torch.Tensor, text: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
            return image, text, keys
        world = trainer.world_size
        from open_clip.loss import gather_features

        image, text = gather_features(image, text, gather_with_grad=True, rank=trainer.global_rank, world_size=world)
        parts = [torch.empty_like(keys) for _ in range(world)]
        torch.distributed.all_gather(parts, keys)
        keys = torch.cat(parts)
        keys[:, 0] = torch.arange(len(keys), device=keys.device)  # positions are per rank: renumber globally
        return image, text, keys

    def _clip_loss(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """open_clip's symmetric InfoNCE; under DDP it gathers every rank's negatives (with grad)."""
        if self.clip_loss is None:
            from open_clip.loss import ClipLoss

            trainer = getattr(self, "_trainer", None)
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            self.clip_loss = ClipLoss(gather_with_grad=world > 1, cache_labels=True, rank=rank, world_size=world)
        return self.clip_loss(image, text, scale)

    # --- encoders ----------------------------------------------------------------------------
    def _image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.encode_image(self.preprocess(images.to(self.device)))

    def _text_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        return self.net.encode_text(self.net.tokenize(texts).to(self.device))

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B,3,h,w]`` -> image-only L2-normalised embeddings (photo queries, KAGL documents)."""
        return self._image_embedding(images).float()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalised embeddings in the same space (batched)."""
        texts = [str(t) for t in texts]
        parts = [self._text_embedding(texts[i : i + TEXT_BATCH]).float() for i in range(0, len(texts), TEXT_BATCH)]
        return torch.cat(parts) if parts else torch.empty(0, self.net.embed_dim, device=self.device)

    @torch.no_grad()
    def embed_items(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Catalog items: fused embedding plus both parts (image only when a batch has no text)."""
        image = self.embed_images(batch["image"])
        if "text" not in batch:
            return {"embedding": image, "image_embedding": image}
        text = self.embed_texts(batch["text"])
        return {"embedding": self.fuse(image, text), "image_embedding": image, "text_embedding": text}

    def fuse(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """The item embedding: the learned per-item gate, or the fixed ``alpha``."""
        return self.gate(image, text) if self.gate is not None else fuse(image, text, self.hparams.alpha)

    def class_text_embeddings(self) -> dict[str, torch.Tensor]:
        """Per task, the normalised prompt embedding of every class (cached until the weights change)."""
        if self._class_text is None:
            self._class_text = {}
            for task, vocab in self.vocabs.items():
                per_template = [
                    self.embed_texts([template.format(label=c) for c in vocab.classes])
                    for template in self.prompt_templates(task)
                ]  # an ensemble averages the normalised embeddings of each class (CLIP's prompt ensembling)
                self._class_text[task] = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        return self._class_text

    def zero_shot_logits(self, image_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = self.net.scale().detach()
        return {
            task: scale * image_embedding.to(emb.device).float() @ emb.T
            for task, emb in self.class_text_embeddings().items()
        }

    @torch.no_grad()
    def image_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Heads when trained with them, else zero-shot prompts."""
        return self.image_outputs(images)[1]

    @torch.no_grad()
    def image_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embedding = self.embed_images(images)
        return embedding, self._head_logits(embedding) if self.heads else self.zero_shot_logits(embedding)

    def _head_logits(self, image_embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        return {task: head(image_embedding) for task, head in self.heads.items()}

    # --- training ------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ClipFusionModule:
        """A frozen net stays in eval mode (no BN statistics updates, no dropout) while heads train."""
        super().train(mode)
        if self.hparams.mode == "frozen":
            self.net.eval()
        return self

    def on_fit_start(self) -> None:
        # locked towers are in eval mode on purpose (see ClipFusionNet.train); Lightning warns about it between
        # this hook and on_train_start: that one message is silenced for that span only, then the filters are
        # restored (in on_train_start, or teardown when fit ends before training starts)
        self._fit_warnings = contextlib.ExitStack()
        self._fit_warnings.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

    def _restore_warnings(self) -> None:
        stack = self.__dict__.pop("_fit_warnings", None)
        if stack is not None:
            stack.close()

    def teardown(self, stage: str) -> None:
        self._restore_warnings()

    def on_train_start(self) -> None:
        self._restore_warnings()
        self.train()  # Lightning keeps modules' modes as found; apply the frozen-part rules above
        self._text_cache.clear()

    def on_train_epoch_start(self) -> None:
        self._class_text = None

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if not self.requires_training:
            raise RuntimeError("a frozen ClipFusionModule without heads or gate has nothing to train; run test only")
        bs = len(batch["id"])
        finetune = self.hparams.mode == "finetune"
        with torch.set_grad_enabled(finetune):
            image = self._batch_image_embedding(batch)
        total = image.new_zeros(())
        if finetune and self.hparams.contrastive_weight > 0:
            text = self._batch_text_embedding(batch)
            scale = self.net.scale()
            contrastive = self._contrastive(image, text, scale, batch)
            total = total + self.hparams.contrastive_weight * contrastive
            self.log("train/loss/contrastive", contrastive, batch_size=bs)
            self.log("train/logit_scale", scale.detach(), batch_size=bs)
        if self.hparams.fusion_weight > 0:
            fusion = self._fusion_loss(image, batch)
            total = total + self.hparams.fusion_weight * fusion
            self.log("train/loss/fusion", fusion, batch_size=bs)
        if self.heads:
            assert self.task_loss is not None  # built whenever heads are
            losses = self.task_loss(self._head_logits(image.detach() if not finetune else image), batch["labels"])
            total = total + losses["loss"]
            self.log_dict({f"train/loss/{t}": losses[t] for t in self.heads}, batch_size=bs)
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        return total

    def _fusion_loss(self, image: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """SupCon on the fused embeddings, same articleType = positive: trains the gate (and the towers)
        for what the fused vector serves, recommending products of the same kind."""
        if "articleType" not in self.vocabs.tasks:
            raise ValueError("fusion_weight > 0 needs the articleType task in the vocabulary")
        text = self._batch_text_embedding(batch)
        groups = batch["labels"][:, self.vocabs.tasks.index("articleType")]
        return supervised_contrastive(self.fuse(image, text), groups, self.net.scale().detach())

    def _batch_image_embedding(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """From the batch's cached trunk activations (``model.cache_trunk``), else from its images."""
        cached = clip_caches.cached_image_embedding(self, batch)
        return cached if cached is not None else self._image_embedding(batch["image"])

    def _batch_text_embedding(self, batch: Mapping[str, Any], train: bool = True) -> torch.Tensor:
        """From the batch's cached token states (``model.cache_text``), else from its titles."""
        cached = clip_caches.cached_text_embedding(self, batch)
        if cached is not None:
            return cached
        return self._train_text_embedding(batch["text"]) if train else self._text_embedding(batch["text"])

    def _train_text_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings for the loss; a fully locked text tower is a fixed function, so its
        outputs are cached per string and every text is encoded once per run (LiT-style)."""
        if not self.net.text_frozen:
            return self._text_embedding(texts)
        missing = sorted({str(t) for t in texts} - self._text_cache.keys())
        if missing:
            with torch.no_grad():
                for text, emb in zip(missing, self._text_embedding(missing)):
                    self._text_cache[text] = emb
        return torch.stack([self._text_cache[str(t)] for t in texts])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():  # open_clip clamps the temperature after each step
            self.net.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # --- evaluation ----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._class_text = None

    def on_test_epoch_start(self) -> None:
        self._class_text = None

    def eval_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        image = self._batch_image_embedding(batch).float()
        text = self._batch_text_embedding(batch, train=False).float()
        bs = len(batch["id"])
        scale = self.net.scale()
        loss = self._contrastive(image, text, scale, batch) if len(image) > 1 else image.new_zeros(())
        logits = self._head_logits(image) if self.heads else self.zero_shot_logits(image)
        if self.heads:
            assert self.task_loss is not None  # built whenever heads are
            loss = loss + self.task_loss(logits, batch["labels"])["loss"]
        if self._inside_loop():
            self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        return {
            "labels": batch["labels"],
            "id": batch["id"],
            "logits": logits,
            "embedding": self.fuse(image, text),
            "image_embedding": image,
            "text_embedding": text,
            "text": list(batch["text"]),
        }

    def _inside_loop(self) -> bool:
        """True while a Trainer loop runs (steps may also be called directly, e.g. by scripts)."""
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and getattr(trainer, "_results", None) is not None

    def extra_metrics(self, stage: str, outputs: Mapping[str, Any]) -> dict[str, float]:
        """Zero-shot accuracy per task (``zeroshot/acc/{task}``) and the KAGL benchmark (``kagl/...``)."""
        from fashion_lightning.evaluation.kagl import kagl_benchmark

        metrics: dict[str, float] = {}
        labels = outputs["labels"].long().cpu()
        image = outputs["image_embedding"].float()
        zero_shot = {t: v.cpu() for t, v in self.zero_shot_logits(image.to(self.device)).items()}
        for column, task in enumerate(self.vocabs.tasks):
            target = labels[:, column]
            known = target != IGNORE_INDEX
            if bool(known.any()):
                hit = zero_shot[task].argmax(dim=1)[known] == target[known]
                metrics[f"zeroshot/acc/{task}"] = float(hit.float().mean())
        if self.hparams.kagl and "text_embedding" in outputs and "text" in outputs:
            attributes = {
                task: [self.vocabs.decode(task, int(i)) for i in labels[:, column].tolist()]
                for column, task in enumerate(self.vocabs.tasks)
            }
            metrics |= kagl_benchmark(
                image,
                outputs["text_embedding"].float(),
                outputs["text"],
                attributes,
                lambda texts: self.embed_texts(texts).cpu(),
                max_queries=self.hparams.kagl_max_queries,
            )
        return metrics

    # --- optimisation --------------------------------------------------------------------------
    def optimised_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if not any(p.requires_grad for p in self.parameters()):
            raise RuntimeError("no trainable parameters: mode='frozen' without heads needs no optimiser")
        return super().optimised_parameters()

    def lr_rule(self) -> Callable[[str], float]:
        """Pretrained tower weights at ``lr``; new parameters (heads, added projections, temperature) at ``new_lr``."""
        lr = float(self.optim.optimizer["lr"])
        new_scale = float(self.optim.rules.get("new_lr", lr)) / lr

        def lr_scale(name: str) -> float:
            new = name.startswith(NEW_PREFIXES) or name in self._new_param_names or "logit_scale" in name
            return new_scale if new else 1.0

        return lr_scale


def check_recipe(loss: str, fusion: str, fusion_weight: float, prompts: Any) -> None:
    """The recipe options' values (one clear message each)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion_weight < 0 or (fusion == "gated" and fusion_weight == 0):
        raise ValueError(
            f"fusion_weight must be >= 0, and > 0 for a gated fusion (its training signal); got {fusion_weight}"
        )
    for templates in prompts.values() if isinstance(prompts, Mapping) else [prompts]:
        if not isinstance(templates, str) and not templates:
            raise ValueError("a zero-shot prompt ensemble needs at least one template")


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def contrastive_keys(batch: Mapping[str, Any], n: int, multi_positive: bool, device: torch.device) -> torch.Tensor:
    """``[n, 3]`` int64 keys; two items are positives iff they share the item key (column 0: the
    position, i.e. only itself) or, with ``multi_positive``, the normalised title (1) or the
    datamodule's same-product group (2, from ``batch["positive_group"]`` when present). -1 = no key."""
    keys = torch.full((n, 3), -1, dtype=torch.long)
    keys[:, 0] = torch.arange(n)
    if multi_positive:
        keys[:, 1] = torch.tensor(
            [_stable_hash(normalise_title(t)) if normalise_title(t) else -1 for t in batch["text"]]
        )
        if "positive_group" in batch:
            keys[:, 2] = torch.as_tensor(batch["positive_group"]).long().cpu()
    return keys.to(device)
