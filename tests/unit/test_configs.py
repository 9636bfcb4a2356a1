"""Every shipped recipe composes and runs: each experiment/, debug/ and hparams_search/ config.

The fast test composes them all and checks that every ``_target_`` imports and every swept
parameter names a key that exists. The slow ones run each with ``trainer.fast_dev_run=true`` (one
train / val / test batch) on the synthetic catalog: Kaggle recipes read it through ``data=kaggle``
(it has the Kaggle layout), GPU recipes run on the CPU, networked weights (timm hub, open_clip
tags) are mocked so nothing is downloaded, and big models see tiny inputs.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_helpers import QUIET, make_cfg

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
#: the recipe each search is documented with (its header comment)
SEARCH_EXPERIMENT = {
    "multitask_optuna": "demo",
    "clip_optuna": "clip_offline_finetune",
    "multitask_cached_optuna": "kaggle_offline_cached",
}

FAST = [
    "++trainer.fast_dev_run=true",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "++data.decode_workers=1",
    "++data.pin_memory=false",
    *QUIET,
]


def _recipe_overrides(group: str, name: str, synthetic_root: Path) -> list[str]:
    """Overrides that turn a recipe into a seconds-long CPU run without changing what it builds."""
    experiment = name if group == "experiment" else SEARCH_EXPERIMENT.get(name, "demo")
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    out = [f"experiment={experiment}"] + ([f"{group}={name}"] if group != "experiment" else [])
    if "override /data: kaggle" in text:
        out.append(f"data.root={synthetic_root}")  # the synthetic catalog is in Kaggle layout
    else:
        out.append("data.num_items=200")  # the session's cached synthetic catalog
    if "clip" in experiment:
        out += ["model.net.image_size=[64,64]", "model.kagl_max_queries=50"]
    elif "resnet50" in experiment:
        out.append("model.net.image_size=[64,64]")
    if "override /trainer: gpu" in text:
        out.append("trainer.precision=32-true")  # bf16 autocast on a CPU only slows the check down
    return out


def _all_cases() -> list[tuple[str, str]]:
    return (
        [("experiment", n) for n in EXPERIMENTS]
        + [("debug", n) for n in DEBUGS]
        + [("hparams_search", n) for n in SEARCHES]
    )


def test_the_case_list_is_complete():
    assert {"demo", "kaggle_offline", "clip_offline_frozen"} <= set(EXPERIMENTS)
    assert {"default", "fdr", "overfit"} <= set(DEBUGS)
    assert set(SEARCHES) == set(SEARCH_EXPERIMENT), "map each new hparams_search config to its recipe"


def _targets(node) -> list[str]:
    found = []
    if isinstance(node, DictConfig):
        for key, value in node.items_ex(resolve=False):
            if key == "_target_":
                found.append(str(value))
            else:
                found += _targets(value)
    elif isinstance(node, ListConfig):
        for value in node:
            found += _targets(value)
    return found


def _swept_value(spec: str) -> str:
    """A value inside an Optuna search space: the first number (or choice) of its expression."""
    inner = re.sub(r"^tag\([^,]*,\s*", "", spec.strip()).rstrip(")")
    match = re.search(r"\(([^,()]+)", inner)
    return match.group(1).strip() if match else inner


@pytest.mark.parametrize(("group", "name"), _all_cases(), ids=lambda v: str(v))
def test_config_composes_with_importable_targets_and_real_swept_keys(group, name, tmp_path, synthetic_root):
    cfg = make_cfg("train", tmp_path / "run", tmp_path / "cache", _recipe_overrides(group, name, synthetic_root))
    for target in _targets(cfg):
        module, _, attr = target.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), f"{group}/{name}: _target_ {target} does not import"
    if group == "hparams_search":
        raw = OmegaConf.load(CONF / "hparams_search" / f"{name}.yaml")
        for key, spec in raw.hydra.sweeper.params.items():
            assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", f"{name} sweeps {key}: no such key"
            assert _swept_value(str(spec)), spec
        assert raw.optimized_metric, f"{name} must name the metric it optimises"


@pytest.fixture
def no_downloads(monkeypatch):
    """Networked weights become a no-op load; returns what was asked for."""
    import open_clip.factory as clip_factory
    import timm.models._builder as timm_builder

    asked: list[str] = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        timm_builder, "load_pretrained", lambda model, **kw: asked.append(f"timm:{type(model).__name__}")
    )
    monkeypatch.setattr(clip_factory, "download_pretrained", lambda cfg, **kw: asked.append("open_clip") or "mocked.pt")
    monkeypatch.setattr(clip_factory, "load_checkpoint", lambda model, path, **kw: asked.append(f"load:{path}") or {})
    return asked


@pytest.mark.slow
@pytest.mark.parametrize(("group", "name"), _all_cases(), ids=lambda v: str(v))
def test_recipe_runs_with_fast_dev_run(group, name, tmp_path, cache_dir, synthetic_root, no_downloads):
    import torch

    from fashion_lightning.apps.train import train

    overrides = _recipe_overrides(group, name, synthetic_root) + FAST
    if group == "hparams_search":  # one trial by hand, at a point of the search space
        raw = OmegaConf.load(CONF / "hparams_search" / f"{name}.yaml")
        overrides += [f"{k}={_swept_value(str(v))}" for k, v in raw.hydra.sweeper.params.items()]
    cfg = make_cfg("train", tmp_path / "run", cache_dir, overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = train(cfg)
    finally:
        torch.set_num_threads(threads)
    stage = "test/" if cfg.test else "val/"  # a search may rank on val alone and skip the test pass
    assert any(k.startswith(stage) for k in metrics), sorted(metrics)[:10]
    assert (tmp_path / "run" / "config_tree.txt").is_file()
    if name in ("kaggle_resnet50", "clip_vitb32_finetune"):
        assert no_downloads, f"{name} should ask for pretrained weights (mocked here)"
    if group == "hparams_search":
        assert cfg.optimized_metric.split("/", 1)[1] in {k.split("/", 1)[1] for k in metrics if "/" in k}
