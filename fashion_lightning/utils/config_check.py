"""Check a composed app config before any data is touched: missing values and wrong types.

Hydra hands strings like ``trainer.max_epochs=abc`` straight to the target, which fails deep
inside Lightning only after the data has been prepared. Here every key given to a ``_target_``
node (data, model, trainer, ...) is checked against the target's own type annotations, so the
run stops first, with one line naming the key, the value and the expected type.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, Union, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """The composed config cannot run: a value is missing or has the wrong type."""


@contextlib.contextmanager
def one_line_errors(*errors: type[BaseException], app: str = "fashion-lightning") -> Iterator[None]:
    """In every app's ``main``: a user error (config, checkpoint, index, catalog, run dir ...) -> one line
    ``<app>: <message>`` on stderr and exit status 2, never a traceback.

    The message is cleaned to one line and its markup escaped (it may quote a file's text: shown, never
    interpreted). The task wrapper has already logged the failure with its run dir into the run's log.
    """
    caught: tuple[type[BaseException], ...] = (ConfigError, *errors)
    try:
        yield
    except caught as err:
        from rich.console import Console

        from fashion_lightning.utils.terminal import escape_markup

        Console(stderr=True, soft_wrap=True).print(f"[bold red]{app}:[/bold red] {escape_markup(err, 2000)}")
        sys.exit(2)


_SIMPLE = (bool, int, float, str, type(None))


def _accepts(annotation: Any, value: Any) -> bool | None:
    """True/False when ``annotation`` is a simple type we can judge, None when we cannot."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        verdicts = [_accepts(arg, value) for arg in typing.get_args(annotation)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if annotation in _SIMPLE:
        if annotation is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if annotation is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, annotation)
    if origin in (list, tuple, typing.get_origin(typing.Sequence)) or annotation in (list, tuple):
        return isinstance(value, (list, tuple)) or None
    if origin in (dict, typing.get_origin(typing.Mapping)) or annotation is dict:
        return isinstance(value, Mapping) or None
    return None


def _hints(target: str) -> dict[str, Any]:
    module_name, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module_name), name)
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations naming types that are not importable here: judge nothing
        return {}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in hints.items() if k in params}


def _describe(annotation: Any) -> str:
    text = annotation.__name__ if annotation in _SIMPLE else str(annotation).replace("typing.", "")
    return text if len(text) <= 120 else text[:117] + "..."


def check_node_types(path: str, node: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` when a key of this ``_target_`` node has a value its target cannot take."""
    hints = _hints(str(node["_target_"]))
    for key, value in node.items():
        if key.startswith("_") or key not in hints:
            continue
        if isinstance(value, Mapping) and "_target_" in value:
            continue  # a nested object: checked on its own
        if _accepts(hints[key], value) is False:
            raise ConfigError(
                f"{path}.{key}={value!r} has the wrong type: {node['_target_'].rpartition('.')[2]} expects "
                f"{_describe(hints[key])}"
            )


def check_config(cfg: DictConfig, nodes: Iterable[str] = ("data", "model", "trainer")) -> None:
    """Fail fast, before any data is loaded, on missing values and wrongly typed target arguments."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)}: set it on the command line, e.g. {missing[0]}=...")
    for name in nodes:
        node = cfg.get(name)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            plain = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{name}: {err}".splitlines()[0]) from None
        check_node_types(name, cast(dict[str, Any], plain))  # a DictConfig node: a dict
