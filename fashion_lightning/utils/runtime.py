"""Process-wide settings, in one place: the ``runtime`` config group, applied once per app by the task wrapper.

Each of these is a global of the whole process (glibc's allocator, torch's float32 matmul precision and
thread pool, an environment variable the HF tokenizers read, warning filters, FAISS's BLAS switch-over), so
only the app that owns the process sets them, from its config (``conf/runtime/``), never a library module
as a side effect of being imported or called. README "Runtime settings" lists them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib.resources import files
from typing import Any

from fashion_lightning.utils.config_check import ConfigError
from fashion_lightning.utils.malloc import keep_freed_memory

MALLOC = ("keep", "default")
MATMUL_PRECISION = ("highest", "high", "medium")
ENGINES = ("torch", "onnx")


@dataclass(frozen=True)
class Runtime:
    """One app's process settings (their defaults and what each is for: ``conf/runtime/default.yaml``)."""

    malloc: str
    matmul_precision: str | None
    torch_threads: int | None
    tokenizers_parallelism: bool
    ignore_warnings: tuple[str, ...]
    faiss_blas_threshold: int | str | None
    engine: str = "torch"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Runtime:
        """Checked settings from a ``runtime`` node over the shipped ``conf/runtime/default.yaml``."""
        raw = {**_shipped_default(), **(cfg or {})}
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"runtime: unknown setting(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        runtime = cls(**{**raw, "ignore_warnings": tuple(raw.get("ignore_warnings") or ())})
        if runtime.malloc not in MALLOC:
            raise ConfigError(f"runtime.malloc must be one of {MALLOC}, got {runtime.malloc!r}")
        if runtime.matmul_precision not in (None, *MATMUL_PRECISION):
            raise ConfigError(f"runtime.matmul_precision must be null or one of {MATMUL_PRECISION}")
        if runtime.torch_threads is not None and (
            not isinstance(runtime.torch_threads, int) or runtime.torch_threads < 1
        ):
            raise ConfigError(f"runtime.torch_threads must be null or a positive int, got {runtime.torch_threads!r}")
        if runtime.engine not in ENGINES:
            raise ConfigError(f"runtime.engine must be one of {ENGINES}, got {runtime.engine!r}")
        blas = runtime.faiss_blas_threshold
        if not (blas is None or blas == "auto" or (isinstance(blas, int) and not isinstance(blas, bool) and blas >= 0)):
            raise ConfigError(f"runtime.faiss_blas_threshold must be null, 'auto' or an int >= 0, got {blas!r}")
        return runtime


def _shipped_default() -> dict[str, Any]:
    from omegaconf import OmegaConf

    text = (files("fashion_lightning.conf") / "runtime" / "default.yaml").read_text(encoding="utf-8")
    return dict(OmegaConf.to_container(OmegaConf.create(text)))  # type: ignore[arg-type]


_current: Runtime | None = None


def current() -> Runtime:
    """The settings the app applied (the shipped defaults where none did: a library caller, a test)."""
    return _current or Runtime.from_config(None)


def apply_runtime(cfg: Mapping[str, Any] | None) -> Runtime:
    """Apply a ``runtime`` node to this process (see the module docstring); returns the checked settings.

    torch's settings import torch only when set (apps whose queries may never need a model, recommend and
    serve, leave them null so an id query stays light); FAISS's threshold is read from :func:`current` by
    :func:`fashion_lightning.retrieval.search.configure_threads`, the one place that writes it.
    """
    global _current
    runtime = Runtime.from_config(cfg)
    if runtime.malloc == "keep":
        keep_freed_memory()  # CPU runs: no mmap/munmap page-fault churn per batch (see utils/malloc.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", str(runtime.tokenizers_parallelism).lower())
    for pattern in runtime.ignore_warnings:
        warnings.filterwarnings("ignore", pattern)
    if runtime.matmul_precision is not None or runtime.torch_threads is not None:
        import torch

        if runtime.matmul_precision is not None:
            torch.set_float32_matmul_precision(runtime.matmul_precision)
        if runtime.torch_threads is not None:
            torch.set_num_threads(runtime.torch_threads)
    _current = runtime
    return runtime


def engine_of(cfg: Mapping[str, Any]) -> str:
    """Which engine an app's config asks to run the model with (``runtime.engine``: torch or onnx)."""
    node = cfg.get("runtime") or {}
    return str(node.get("engine", "torch")) if isinstance(node, Mapping) else "torch"
