"""Compose the apps' Hydra configs inside tests, as the console scripts would."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

# quiet, single-process training settings for tests
QUIET = [
    "data.num_workers=0",
    "logger=csv",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.early_stopping=null",
    "+trainer.enable_progress_bar=false",
]

# a tiny multi-task model that learns the synthetic catalog in seconds on a CPU
TINY_MODEL = [
    "model.net.backbone=test_resnet",
    "model.net.image_size=[40,32]",
    "model.optimizer.lr=0.01",
    "model.param_groups.backbone_lr_ratio=1.0",
    "data.batch_size=32",
]


def make_cfg(config_name: str, run_dir: Path, cache_dir: Path, overrides: list[str]) -> DictConfig:
    """The job config of ``config_name`` with overrides, writing into ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_module("fashion_lightning.conf", version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.cache_dir = str(cache_dir)
        del cfg.hydra  # as inside a Hydra app: the job config has no hydra node
    return cfg


def train_and_index(root: Path, num_items: int, epochs: int) -> Path:
    """A tiny model trained on the synthetic catalog, then its index folder (what the app tests query),
    built from the run's model artefact (``<run>/model``) as README's commands do."""
    from fashion_lightning.apps.index import build
    from fashion_lightning.apps.train import train

    train(make_cfg("train", root / "train", root / "cache", [
        "model.net.backbone=test_resnet", "model.net.image_size=[40,32]", "model.optimizer.lr=0.01",
        f"data.num_items={num_items}", "data.train_transform=null", f"trainer.max_epochs={epochs}", "test=false",
        *QUIET,
    ]))  # fmt: skip
    return build(make_cfg("index", root / "index_run", root / "cache", [
        f"ckpt_path={root / 'train' / 'model'}", f"data.num_items={num_items}",
        "data.num_workers=0", "+trainer.enable_progress_bar=false",
    ]))  # fmt: skip
