"""The runtime config group: process-wide settings checked, applied once by the task wrapper, and documented."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fashion_lightning.utils import runtime
from fashion_lightning.utils.config_check import ConfigError
from fashion_lightning.utils.task_wrapper import task_wrapper

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture()
def restore_process(monkeypatch):
    """Leave torch's precision and the module's applied settings as the test found them."""
    precision = torch.get_float32_matmul_precision()
    monkeypatch.setattr(runtime, "_current", None)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    with warnings.catch_warnings():
        yield
    torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"malloc": "never"}, "runtime.malloc"),
        ({"matmul_precision": "low"}, "runtime.matmul_precision"),
        ({"torch_threads": 0}, "runtime.torch_threads"),
        ({"faiss_blas_threshold": "fast"}, "runtime.faiss_blas_threshold"),
        ({"threads": 2}, "unknown setting"),
    ],
)
def test_bad_settings_are_one_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        runtime.Runtime.from_config(override)


def test_every_shipped_runtime_config_is_valid_and_light_leaves_torch_alone():
    default = runtime.Runtime.from_config(OmegaConf.load(CONF_DIR / "runtime" / "default.yaml"))
    assert default == runtime.Runtime.from_config(None) and default.matmul_precision == "high"
    light = OmegaConf.load(CONF_DIR / "runtime" / "light.yaml")
    light.pop("defaults")
    settings = runtime.Runtime.from_config(light)
    assert settings.matmul_precision is None and settings.torch_threads is None
    assert settings.ignore_warnings == default.ignore_warnings


def test_the_task_wrapper_applies_the_runtime_once_before_the_task(restore_process, tmp_path):
    torch.set_float32_matmul_precision("highest")
    cfg = OmegaConf.create({
        "task_name": "unit", "tags": ["t"], "paths": {"output_dir": str(tmp_path / "run")},
        "extras": {"print_config": False, "save_config": False},
        "runtime": {"matmul_precision": "medium", "tokenizers_parallelism": True, "ignore_warnings": ["^quiet me$"]},
    })  # fmt: skip
    seen = []

    def task(cfg):
        seen.append((torch.get_float32_matmul_precision(), os.environ.get("TOKENIZERS_PARALLELISM")))
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("quiet me", UserWarning, stacklevel=1)
            warnings.warn("not me", UserWarning, stacklevel=1)
        return [str(w.message) for w in caught]

    assert task_wrapper(task)(cfg) == ["not me"]
    assert seen == [("medium", "true")]
    assert runtime.current().matmul_precision == "medium" and runtime.current().malloc == "keep"  # the rest: shipped


def test_faiss_blas_threshold_comes_from_the_runtime(monkeypatch):
    faiss = pytest.importorskip("faiss")
    from fashion_lightning.retrieval import search

    before = faiss.cvar.distance_compute_blas_threshold
    try:
        for setting, expected in [(123, 123), (None, search.SHIPPED_BLAS_THRESHOLD)]:
            monkeypatch.setattr(runtime, "_current", runtime.Runtime.from_config({"faiss_blas_threshold": setting}))
            search.set_blas_threshold.cache_clear()
            assert search.set_blas_threshold() == expected == faiss.cvar.distance_compute_blas_threshold
    finally:
        search.set_blas_threshold.cache_clear()
        faiss.cvar.distance_compute_blas_threshold = before
