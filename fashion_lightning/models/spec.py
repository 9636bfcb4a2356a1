"""Typed configs of what a saved model may say: every hyperparameter of both families, checked.

A checkpoint's ``hyper_parameters`` and an artefact's ``model.json`` are validated here before anything is
built from them: unknown keys are refused, every value has a type and a range, and the four strings that
name code (net, module, optimiser, scheduler) must be keys of :mod:`~fashion_lightning.models.registry`.
Names that reach timm / open_clip are plain identifiers (no paths, no ``local-dir:``); free-form timm
kwargs may only be numbers or booleans, so no path or name sneaks in through them.

A test keeps each module spec's fields equal to its constructor's parameters: a new hyperparameter must
be declared here to be saved and loaded. Files written before a key was renamed still load: the old names
are mapped in one place, :data:`RENAMED` (applied before validation).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fashion_lightning.models import registry
from fashion_lightning.models.optim import GROUP_RULE_KEYS

MultiTaskNetName = Literal["fashion_lightning.models.multitask.MultiTaskNet"]
ClipNetName = Literal["fashion_lightning.models.clip.ClipFusionNet"]
MULTITASK_NET: MultiTaskNetName = "fashion_lightning.models.multitask.MultiTaskNet"
CLIP_NET: ClipNetName = "fashion_lightning.models.clip.ClipFusionNet"

Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]  # timm / open_clip names, tags
HubName = Annotated[
    str,
    Field(
        pattern=r"^(hf-hub:[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}|[A-Za-z0-9][A-Za-z0-9_.\-]{0,127})$"
    ),
]  # noqa: E501
Label = Annotated[str, Field(max_length=200)]
Text = Annotated[str, Field(max_length=500)]
Side = Annotated[int, Field(ge=1, le=4096)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
Scalar = bool | int | float


def _finite(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be finite")
    return value


def _scalar_extras(model: BaseModel, what: str, allow_lists: bool = False) -> None:
    """Extra keys (timm kwargs, optimiser kwargs) must be identifiers with numeric / boolean values."""
    for key, value in (model.model_extra or {}).items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"{what} has a key {key!r} that is not a plain name")
        values = value if allow_lists and isinstance(value, list) and len(value) <= 8 else [value]
        for v in values:
            if not isinstance(v, (bool, int, float)) and v is not None:
                raise ValueError(f"{what}.{key} must be a number or boolean, got {type(v).__name__}")
            _finite(v, f"{what}.{key}")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class MultiTaskNetSpec(_Spec):
    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)
    target: MultiTaskNetName = Field(MULTITASK_NET, alias="_target_")
    backbone: ModelName = "resnet50"
    pretrained: bool | Literal["offline"] = False
    checkpoint_path: Annotated[str, Field(max_length=4096)] | None = None
    image_size: tuple[Side, Side] = (224, 224)
    embed_dim: Annotated[int, Field(ge=1, le=65536)] | None = None
    dropout: Unit = 0.2
    channels_last: bool = False

    @model_validator(mode="after")
    def _timm_kwargs(self) -> MultiTaskNetSpec:
        _scalar_extras(self, "net")
        return self


class ClipFusionNetSpec(_Spec):
    target: ClipNetName = Field(CLIP_NET, alias="_target_")
    model_name: HubName = "lite0-minilm"
    pretrained: Annotated[str, Field(max_length=4096)] | None = "offline"
    image_size: Side | tuple[Side, Side] | None = None
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    lock_image: bool = False
    lock_text: bool = False
    unlock_last_n: Annotated[int, Field(ge=0, le=1000)] = 0
    init_logit_scale: float | None = None
    cache_dir: Annotated[str, Field(max_length=4096)] | None = None


class OptimizerSpec(_Spec):
    """A ``torch.optim`` class (or a registered one) with numeric kwargs."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)
    target: str = Field("torch.optim.AdamW", alias="_target_")
    partial: bool = Field(True, alias="_partial_")
    lr: Annotated[float, Field(gt=0.0, le=100.0)]
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0

    @field_validator("target")
    @classmethod
    def _registered(cls, value: str) -> str:
        registry.optimizer_class(value)  # raises UnknownTargetError (a ValueError) with the known names
        return value

    @model_validator(mode="after")
    def _kwargs(self) -> OptimizerSpec:
        _scalar_extras(self, "optimizer", allow_lists=True)  # betas: [0.9, 0.999]
        for key in GROUP_RULE_KEYS:
            if key in (self.model_extra or {}):
                raise ValueError(f"optimizer.{key} is a parameter-group rule: it belongs in param_groups")
        return self


class ParamGroupsSpec(_Spec):
    """``model.param_groups``: the rules that scale a parameter's LR (models/optim.py); null = off."""

    backbone_lr_ratio: Annotated[float, Field(ge=0.0)] | None = None
    layer_decay: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    new_lr: Annotated[float, Field(gt=0.0)] | None = None


class SchedulerSpec(_Spec):
    model_config = ConfigDict(extra="allow", populate_by_name=True, allow_inf_nan=False)
    target: str = Field(registry.WARMUP_COSINE, alias="_target_")
    partial: bool = Field(True, alias="_partial_")

    @field_validator("target")
    @classmethod
    def _registered(cls, value: str) -> str:
        registry.scheduler_factory(value)
        return value

    @model_validator(mode="after")
    def _kwargs(self) -> SchedulerSpec:
        _scalar_extras(self, "scheduler", allow_lists=True)
        return self


class EmaSpec(_Spec):
    decay: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.999
    warmup: Annotated[int, Field(ge=0)] = 10


class MixupSpec(_Spec):
    mixup_alpha: Annotated[float, Field(ge=0.0)] = 0.8
    cutmix_alpha: Annotated[float, Field(ge=0.0)] = 1.0
    prob: Unit = 1.0
    switch_prob: Unit = 0.5


class CacheTrunkSpec(_Spec):
    """``model.cache_trunk``: freeze the trunk below layer group ``cut``, cache ``views`` augmented activations."""

    cut: Annotated[int, Field(ge=0, le=64)]
    views: Annotated[int, Field(ge=1, le=64)] = 4
    dtype: Literal["float16", "float32"] = "float16"


class CacheTextSpec(_Spec):
    """``model.cache_text`` (CLIP): freeze the text tower below transformer layer ``layer``, cache its token states."""

    layer: Annotated[int, Field(ge=0, le=64)]
    dtype: Literal["float16", "float32"] = "float16"


Vocabs = dict[Identifier, Annotated[list[Label], Field(min_length=1, max_length=100_000)]]
TaskWeights = dict[Identifier, Annotated[float, Field(ge=0.0)]]
Prompts = Annotated[list[Text], Field(min_length=1, max_length=32)]  # a zero-shot prompt ensemble
CompileOptions = bool | dict[Identifier, Scalar | Annotated[str, Field(pattern=r"^[A-Za-z0-9_\-]{0,64}$")] | None]


# (node, old key) -> (node, new key): names files written before a rename still use
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("net", "input_size"): ("net", "image_size"),  # one name for the input geometry in both families
    **{("optimizer", key): ("param_groups", key) for key in GROUP_RULE_KEYS},  # group rules left model.optimizer
}


def renamed_keys(hparams: Any) -> Any:
    """A copy of saved hyperparameters with the old key names of :data:`RENAMED` moved to the new ones.

    A node that is not a mapping is left for validation to refuse; a key given under both names is refused
    (the file would say two things)."""
    if not isinstance(hparams, dict):
        return hparams
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in hparams.items()}
    for (node, old), (new_node, new) in RENAMED.items():
        source = out.get(node)
        if not isinstance(source, dict) or old not in source:
            continue
        if out.get(new_node) is None:
            out[new_node] = {}
        target = out[new_node]
        if not isinstance(target, dict):
            continue
        if new in target:
            raise ValueError(f"{node}.{old} (an old name) and {new_node}.{new} are both given")
        target[new] = source.pop(old)
    return out


class _ModuleSpec(_Spec):
    vocabs: Vocabs
    task_weights: TaskWeights | None = None
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    optimizer: OptimizerSpec | None = None
    scheduler: SchedulerSpec | None = None
    param_groups: ParamGroupsSpec | None = None
    ema: Annotated[float, Field(gt=0.0, lt=1.0)] | EmaSpec | None = None
    compile: CompileOptions = False

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        return renamed_keys(data)


class MultiTaskModuleSpec(_ModuleSpec):
    net: MultiTaskNetSpec
    freeze_backbone: bool = False
    freeze_backbone_epochs: Annotated[int, Field(ge=0)] = 0
    cache_frozen_features: bool = True
    mixup: MixupSpec | None = None
    flip_tta: bool = False
    cache_trunk: CacheTrunkSpec | None = None


class ClipFusionModuleSpec(_ModuleSpec):
    net: ClipFusionNetSpec
    mode: Literal["frozen", "finetune"] = "finetune"
    alpha: Unit = 0.7
    heads: bool = False
    contrastive_weight: Annotated[float, Field(ge=0.0)] = 1.0
    loss: Literal["infonce", "siglip"] = "infonce"
    siglip_init_bias: Annotated[float, Field(ge=-50.0, le=50.0)] = -5.0
    multi_positive: bool = False
    fusion: Literal["fixed", "gated"] = "fixed"
    fusion_weight: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    zero_shot_prompt: Text | Prompts | dict[Identifier, Text | Prompts] = "a photo of a {label}"
    kagl: bool = True
    kagl_max_queries: Annotated[int, Field(ge=1)] | None = 2000
    channels_last: bool = False
    cache_text: CacheTextSpec | None = None
    cache_trunk: CacheTrunkSpec | None = None


SPECS: dict[str, type[_ModuleSpec]] = {"multitask": MultiTaskModuleSpec, "clip": ClipFusionModuleSpec}


class SpecError(ValueError):
    """Saved hyperparameters that do not fit the family's typed config (message: first problem, one line)."""


def validate_hparams(family: str, hparams: Any) -> dict[str, Any]:
    """The family's hyperparameters checked and normalised (aliases ``_target_`` / ``_partial_`` kept)."""
    spec = SPECS.get(family)
    if spec is None:
        raise SpecError(f"unknown model family {family!r} (known: {sorted(SPECS)})")
    if not isinstance(hparams, dict):
        raise SpecError(f"hyperparameters must be a mapping, got {type(hparams).__name__}")
    try:
        parsed = spec.model_validate(hparams)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        message = str(first["msg"]).splitlines()[0][:300]
        raise SpecError(f"hyperparameter {where}: {message}") from None
    return parsed.model_dump(by_alias=True, exclude_unset=True, mode="python")
