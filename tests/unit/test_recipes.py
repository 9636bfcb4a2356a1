"""Every shipped experiment composes; the GPU recipes say what they promise (offline, unlocked towers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hydra_helpers import make_cfg

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment: str, tmp_path: Path) -> None:
    cfg = make_cfg("train", tmp_path / "run", tmp_path / "cache", [f"experiment={experiment}", "data.root=/data/x.zip"])
    assert cfg.model._target_ and cfg.trainer.max_epochs >= 1
    assert cfg.model.optimizer._target_ and cfg.model.optimizer._partial_ is True


def test_gpu_recipes(tmp_path: Path) -> None:
    gpu = make_cfg("train", tmp_path / "a", tmp_path / "c", ["experiment=kaggle_gpu", "data.root=/x.zip"])
    assert gpu.model.net.pretrained == "offline" and gpu.trainer.accelerator == "gpu"  # runs with no network
    assert gpu.model.freeze_backbone_epochs == 0 and gpu.model.param_groups.backbone_lr_ratio == 0.5
    assert gpu.trainer.max_epochs == 18 and gpu.callbacks.get("early_stopping") is None
    clip = make_cfg("train", tmp_path / "b", tmp_path / "c", ["experiment=clip_gpu", "data.root=/x.zip"])
    assert clip.model.net.pretrained == "offline" and clip.model.net.unlock_last_n > 0
    assert clip.model.net.lock_image and clip.model.net.lock_text  # locked bodies, last blocks re-opened
    hub = make_cfg("train", tmp_path / "d", tmp_path / "c", ["experiment=kaggle_convnext_tiny", "data.root=/x.zip"])
    assert hub.model.net.pretrained is True and hub.model.param_groups.layer_decay
