"""Optimiser, parameter groups and LR schedule shared by both model families.

The optimiser and the scheduler are Hydra objects with ``_partial_: true``, so any
``torch.optim`` class works from the command line::

    fashion-train model.optimizer._target_=torch.optim.SGD +model.optimizer.momentum=0.9

The *group rules* live beside them in ``model.param_groups``, because the optimiser class never
sees them: ``backbone_lr_ratio`` and ``layer_decay`` (multi-task family), ``new_lr`` (CLIP
family). One builder, :func:`param_groups`, makes the groups for both: an LR scale per
parameter and no weight decay where ``param.ndim <= 1`` (norm gains, biases, the CLIP temperature).

Defaults live in one place, the family's shipped ``conf/model/*.yaml``: a module built in Python
reads its missing nodes from there (:func:`shipped_defaults`), so it trains exactly as a Hydra run
of that config with the same keys overridden would.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fashion_lightning.models import registry

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import LRSchedulerConfigType, OptimizerLRSchedulerConfig

GROUP_RULE_KEYS = ("backbone_lr_ratio", "layer_decay", "new_lr")  # the keys of model.param_groups
OPTIM_NODES = ("optimizer", "scheduler", "param_groups")  # what shipped_defaults reads from a conf/model file


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


@functools.cache
def _shipped_nodes(conf_name: str) -> dict[str, dict[str, Any]]:
    from omegaconf import OmegaConf

    text = (files("fashion_lightning.conf") / "model" / f"{conf_name}.yaml").read_text(encoding="utf-8")
    conf = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    assert isinstance(conf, dict)
    return {node: dict(conf.get(node) or {}) for node in OPTIM_NODES}


def shipped_defaults(conf_name: str) -> dict[str, dict[str, Any]]:
    """The ``optimizer`` / ``scheduler`` / ``param_groups`` nodes of ``conf/model/<conf_name>.yaml`` (a copy)."""
    return copy.deepcopy(_shipped_nodes(conf_name))


@dataclass(frozen=True)
class OptimSetup:
    """What ``configure_optimizers`` needs: the optimiser and scheduler partials and the group rules."""

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rules: dict[str, Any]  # model.param_groups without its null (switched-off) rules

    @classmethod
    def resolve(
        cls,
        optimizer: Mapping[str, Any] | None,
        scheduler: Mapping[str, Any] | None,
        param_groups: Mapping[str, Any] | None,
        conf_name: str,
    ) -> OptimSetup:
        """Each node over its shipped default (key by key, as a Hydra override would), checked."""
        defaults = shipped_defaults(conf_name)
        opt = {**defaults["optimizer"], **dict(optimizer or {}), "_partial_": True}
        misplaced = sorted(set(opt) & set(GROUP_RULE_KEYS))
        if misplaced:
            raise ValueError(
                f"optimizer.{misplaced[0]} is a parameter-group rule, not an optimiser argument: "
                f"set it in param_groups (model.param_groups.{misplaced[0]})"
            )
        if "lr" not in opt:
            raise ValueError("model.optimizer needs an lr")
        rules = {**defaults["param_groups"], **dict(param_groups or {})}
        unknown = sorted(set(rules) - set(GROUP_RULE_KEYS))
        if unknown:
            raise ValueError(f"unknown param_groups rule {unknown[0]!r}; known: {', '.join(GROUP_RULE_KEYS)}")
        sched = {**defaults["scheduler"], **dict(scheduler or {})}
        return cls(opt, sched, {k: v for k, v in rules.items() if v is not None})


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
    cfg: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer, total_steps: int | float
) -> LRSchedulerConfigType:
    """The Lightning ``lr_scheduler`` entry: a partial taking ``(optimizer, total_steps=...)``, stepped per batch.

    A config without ``_target_`` (or none) means :func:`warmup_cosine` with its own defaults."""
    cfg = {"_target_": registry.WARMUP_COSINE, **dict(cfg or {}), "_partial_": True}
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
        "lr_scheduler": build_scheduler(scheduler_cfg, optimizer, total_steps),
    }
