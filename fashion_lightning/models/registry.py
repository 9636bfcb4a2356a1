"""The only classes a saved file may name: exact-name tables, never an import or attribute walk.

A checkpoint or model artefact records *which* net, LightningModule, optimiser and LR scheduler it was
trained with as strings. Those strings are keys into the tables below and nothing else: no
``importlib``, no Hydra ``_target_`` resolution, no prefix test (``fashion_lightning.x.os.system`` starts
with the package name and used to reach ``os.system`` through a module attribute).

Like timm's ``register_model``, your own nets and optimisers join with :func:`register_net` /
:func:`register_optimizer` (in your code, before training), after which configs may name them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fashion_lightning.models.base import FashionModule

WARMUP_COSINE = "fashion_lightning.models.optim.warmup_cosine"


class UnknownTargetError(ValueError):
    """A config or file names a class that is not in the registry."""


def _torch_classes(module: Any, base: type) -> dict[str, type]:
    """Public classes of a torch namespace that subclass ``base``, by their documented dotted name."""
    found = {}
    for name in getattr(module, "__all__", dir(module)):
        obj = getattr(module, name, None)
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and not inspect.isabstract(obj):
            found[f"{module.__name__}.{name}"] = obj
    return found


_NETS: dict[str, type[nn.Module]] = {}
_MODULES: dict[str, type[FashionModule]] = {}  # family name -> class
_MODULE_PATHS: dict[str, str] = {}  # class path a .ckpt records -> family name
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = _torch_classes(torch.optim, torch.optim.Optimizer)
_SCHEDULERS: dict[str, Callable[..., Any]] = dict(
    _torch_classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
)
_builtins_loaded = False


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _ensure_builtins() -> None:
    """Register the project's own classes (imported here, lazily: the modules import this file)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from fashion_lightning.models.clip import ClipFusionNet
    from fashion_lightning.models.clip_module import ClipFusionModule
    from fashion_lightning.models.multitask import MultiTaskNet
    from fashion_lightning.models.multitask_module import MultiTaskModule
    from fashion_lightning.models.optim import warmup_cosine

    register_net(MultiTaskNet)
    register_net(ClipFusionNet)
    register_module("multitask", MultiTaskModule)
    register_module("clip", ClipFusionModule)
    _SCHEDULERS[WARMUP_COSINE] = warmup_cosine


def register_net(cls: type[nn.Module], name: str | None = None) -> type[nn.Module]:
    """Allow configs and saved files to name this ``nn.Module`` (by its class path, or ``name``)."""
    _NETS[name or _path(cls)] = cls
    return cls


def register_module(family: str, cls: type[FashionModule]) -> type[FashionModule]:
    _MODULES[family] = cls
    _MODULE_PATHS[_path(cls)] = family
    return cls


def register_optimizer(cls: type[torch.optim.Optimizer], name: str | None = None) -> type[torch.optim.Optimizer]:
    _OPTIMIZERS[name or _path(cls)] = cls
    return cls


def _lookup(table: Mapping[str, Any], name: object, kind: str) -> Any:
    _ensure_builtins()
    if isinstance(name, str) and name in table:
        return table[name]
    shown = repr(name)[:120]
    known = ", ".join(sorted(table)[:12])
    raise UnknownTargetError(f"{kind} {shown} is not registered (known: {known}{', ...' if len(table) > 12 else ''})")


def net_class(name: object) -> type[nn.Module]:
    return _lookup(_NETS, name, "net")


def optimizer_class(name: object) -> type[torch.optim.Optimizer]:
    return _lookup(_OPTIMIZERS, name, "optimizer")


def scheduler_factory(name: object) -> Callable[..., Any]:
    return _lookup(_SCHEDULERS, name, "LR scheduler")


def module_class(family_or_path: object) -> type[FashionModule]:
    """A LightningModule by family (``multitask``, ``clip``) or by the class path a .ckpt records."""
    _ensure_builtins()
    family = _MODULE_PATHS.get(family_or_path, family_or_path) if isinstance(family_or_path, str) else None
    return _lookup(_MODULES, family, "module class" if family is None else "model family")


def family_of_class(cls: type) -> str:
    _ensure_builtins()
    family = _MODULE_PATHS.get(_path(cls))
    if family is None or _MODULES.get(family) is not cls:
        raise UnknownTargetError(f"{_path(cls)} is not a registered model family")
    return family


def family_of(module: object) -> str:
    return family_of_class(type(module))


def families() -> list[str]:
    _ensure_builtins()
    return sorted(_MODULES)


def is_registered_net(name: object) -> bool:
    _ensure_builtins()
    return isinstance(name, str) and name in _NETS


def is_registered_optimizer(name: object) -> bool:
    _ensure_builtins()
    return isinstance(name, str) and name in _OPTIMIZERS


def is_registered_scheduler(name: object) -> bool:
    _ensure_builtins()
    return isinstance(name, str) and name in _SCHEDULERS


def build_net(cfg: Mapping[str, Any], **extra: Any) -> nn.Module:
    """A net from its config (``_target_`` + kwargs): the target is looked up, never imported."""
    kwargs = {k: v for k, v in cfg.items() if not (k.startswith("_") and k.endswith("_"))}
    return net_class(cfg.get("_target_"))(**kwargs, **extra)
