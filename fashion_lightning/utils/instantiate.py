"""Build Lightning callbacks and loggers from their config groups (entries may be null)."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None, kind: type, what: str) -> list:
    objects = []
    for key, entry in (cfg or {}).items():
        name = str(key)
        if entry is None:
            continue  # switched off with e.g. callbacks.early_stopping=null
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{what} '{name}' must be a config with _target_, got {entry!r}")
        obj = instantiate(entry)
        if not isinstance(obj, kind):
            raise TypeError(f"{what} '{name}' built a {type(obj).__name__}, not a {kind.__name__}")
        log.debug("instantiated %s %s", what, name)
        objects.append(obj)
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_group(cfg, Callback, "callback")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_group(cfg, Logger, "logger")
