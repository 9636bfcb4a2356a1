"""Optimiser, parameter groups and LR schedule shared by both model families.

The optimiser and the scheduler are Hydra objects with ``_partial_: true``, so any
``torch.optim`` class works from the command line::

    fashion-train model.optimizer._target_=torch.optim.SGD +model.optimizer.momentum=0.9

Besides the optimiser's own kwargs, ``model.optimizer`` may hold the *group rules* this
module consumes (they never reach the optimiser class): ``backbone_lr_ratio`` and
``layer_decay`` (multi-task family), ``new_lr`` (CLIP family). One builder,
:func:`param_groups`, makes the groups for both: an LR scale per parameter and no weight
decay where ``param.ndim <= 1`` (norm gains, biases, the CLIP temperature).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fashion_lightning.models import registry

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import LRSchedulerConfigType, OptimizerLRSchedulerConfig

DEFAULT_OPTIMIZER_TARGET = "torch.optim.AdamW"
DEFAULT_SCHEDULER_TARGET = "fashion_lightning.models.optim.warmup_cosine"
GROUP_RULE_KEYS = ("backbone_lr_ratio", "layer_decay", "new_lr")
# keys older checkpoints kept in ``optimizer`` that now belong to the scheduler
_LEGACY_SCHEDULER_KEYS = ("warmup_ratio", "min_lr_ratio")


def warmup_cosine_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier: linear 0->1 over ``warmup_steps``, then cosine 1->``min_lr_ratio``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.05, min_lr_ratio: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine to ``min_lr_ratio`` (stepped per batch)."""
    schedule = warmup_cosine_lambda(total_steps, round(warmup_ratio * total_steps), min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Parameters grouped by (LR scale, decay?): no weight decay where ``ndim <= 1``.

    ``trainable_only=False`` keeps parameters that are frozen now but unfrozen later
    (a backbone frozen for the first epochs)."""
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in named_parameters:
        if trainable_only and not param.requires_grad:
            continue
        scale, no_decay = float(lr_scale(name)), param.ndim <= 1
        group = groups.setdefault(
            (scale, no_decay), {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay}
        )
        group["params"].append(param)
    return list(groups.values())


def layer_scales(backbone: nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise LR decay over a timm backbone: ``decay ** (depth from the top)`` per parameter name.

    Uses timm's own layer grouping (``group_matcher``), the one ``param_groups_layer_decay`` uses.
    """
    from timm.models import group_parameters

    if not hasattr(backbone, "group_matcher"):
        raise ValueError(f"layer_decay needs a timm backbone with group_matcher(); {type(backbone).__name__} has none")
    matcher = backbone.group_matcher(coarse=False)  # type: ignore[operator]  # timm method, checked above
    layer_of = group_parameters(backbone, matcher, reverse=True)
    top = max(layer_of.values())
    return {name: decay ** (top - layer_of.get(name, top)) for name, _ in backbone.named_parameters()}


def split_optimizer_config(cfg: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """``model.optimizer`` -> (optimiser config, group rules, legacy scheduler keys).

    Accepts the Hydra form (``_target_`` + ``_partial_``) and the plain dict older
    checkpoints stored (no ``_target_``: AdamW, with warmup/min-LR keys for the scheduler).
    """
    merged = {**defaults, **dict(cfg or {})}
    rules = {k: merged.pop(k) for k in GROUP_RULE_KEYS if k in merged}
    legacy = {k: merged.pop(k) for k in _LEGACY_SCHEDULER_KEYS if k in merged}
    merged.setdefault("_target_", DEFAULT_OPTIMIZER_TARGET)
    merged["_partial_"] = True
    if "lr" not in merged:
        raise ValueError("model.optimizer needs an lr")
    return merged, rules, legacy


def build_optimizer(
    cfg: Mapping[str, Any], groups: list[dict[str, Any]], device: torch.device
) -> torch.optim.Optimizer:
    """The optimiser over ``groups``; fused kernels on CUDA when the class has them.

    The class is looked up by exact name in ``models/registry.py`` (torch.optim's classes and registered
    ones), never imported from the string, so a saved config cannot name other code."""
    kwargs = _kwargs(cfg)
    cls = registry.optimizer_class(cfg["_target_"])
    if device.type == "cuda" and "fused" not in kwargs and "fused" in inspect.signature(cls).parameters:
        kwargs["fused"] = True  # AdamW/Adam/SGD: one kernel per step instead of a loop over tensors
    if not groups:
        raise RuntimeError("no trainable parameters to optimise")
    return cls(groups, **kwargs)


def _kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A Hydra-style node's keyword arguments: everything but ``_target_`` / ``_partial_`` / ``_recursive_``."""
    return {k: v for k, v in cfg.items() if not (k.startswith("_") and k.endswith("_"))}


def build_scheduler(
    cfg: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer, total_steps: int | float, legacy: Mapping
) -> LRSchedulerConfigType:
    """The Lightning ``lr_scheduler`` entry: a partial taking ``(optimizer, total_steps=...)``, stepped per batch."""
    cfg = {"_target_": DEFAULT_SCHEDULER_TARGET, **dict(legacy), **dict(cfg or {}), "_partial_": True}
    make = functools.partial(registry.scheduler_factory(cfg["_target_"]), **_kwargs(cfg))
    params = inspect.signature(make.func).parameters
    if "total_steps" not in params:
        scheduler = make(optimizer)
    elif math.isfinite(total_steps):
        scheduler = make(optimizer, total_steps=int(total_steps))
    else:  # Trainer.estimated_stepping_batches is inf when max_epochs=-1 and max_steps=-1
        raise ValueError(
            f"the scheduler {cfg['_target_']} needs the run's length: set trainer.max_epochs or trainer.max_steps"
        )
    return {"scheduler": scheduler, "interval": "step", "name": "lr"}


def configure(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    optimizer_cfg: Mapping[str, Any],
    scheduler_cfg: Mapping[str, Any] | None,
    legacy_scheduler: Mapping[str, Any],
    total_steps: int | float,
    device: torch.device,
    lr_scale: Callable[[str], float] = lambda name: 1.0,
    trainable_only: bool = True,
) -> OptimizerLRSchedulerConfig:
    """A Lightning ``configure_optimizers`` dict from the two Hydra configs and an LR-scale rule."""
    groups = param_groups(
        named_parameters, optimizer_cfg["lr"], optimizer_cfg.get("weight_decay", 0.0), lr_scale, trainable_only
    )
    optimizer = build_optimizer(optimizer_cfg, groups, device)
    return {
        "optimizer": optimizer,
        "lr_scheduler": build_scheduler(scheduler_cfg, optimizer, total_steps, legacy_scheduler),
    }
