"""Users' own configs: ``hydra.searchpath=[file://my_configs]`` adds e.g. ``experiment/mine.yaml``
to the packaged groups without editing the package (README: "Your own configs")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hydra_helpers import make_cfg

MINE = """\
# @package _global_
defaults:
  - override /data: synthetic
  - override /callbacks: none

tags: [mine]
seed: 7
data:
  num_items: 200
model:
  net:
    backbone: test_resnet
    image_size: [40, 32]
trainer:
  max_epochs: 1
"""


def _my_configs(tmp_path: Path) -> Path:
    folder = tmp_path / "my_configs"
    (folder / "experiment").mkdir(parents=True)
    (folder / "experiment" / "mine.yaml").write_text(MINE)
    (folder / "logger").mkdir()  # a new option in a packaged group
    (folder / "logger" / "quiet_csv.yaml").write_text(
        "csv:\n  _target_: lightning.pytorch.loggers.CSVLogger\n  save_dir: ${paths.output_dir}\n  name: mine\n"
    )
    return folder


def test_searchpath_adds_an_experiment_and_a_group_option(tmp_path, cache_dir):
    folder = _my_configs(tmp_path)
    cfg = make_cfg("train", tmp_path / "run", cache_dir,
                   [f"hydra.searchpath=[file://{folder}]", "experiment=mine", "logger=quiet_csv"])  # fmt: skip
    assert list(cfg.tags) == ["mine"] and cfg.seed == 7 and cfg.model.net.backbone == "test_resnet"
    assert cfg.logger.csv.name == "mine" and not cfg.callbacks
    assert cfg.data._target_.endswith("FashionDataModule") and cfg.data.num_items == 200


@pytest.mark.slow
def test_searchpath_through_the_console_entry_point(tmp_path):
    folder = _my_configs(tmp_path)
    env = {**os.environ, "FASHION_LIGHTNING_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "fashion_lightning.apps.train", f"hydra.searchpath=[file://{folder}]",
           "experiment=mine", "--cfg", "job"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "- mine" in result.stdout and "backbone: test_resnet" in result.stdout
    missing = subprocess.run(cmd[:-3] + ["experiment=theirs", "--cfg", "job"], capture_output=True, text=True,
                             env=env, timeout=300)  # fmt: skip
    assert missing.returncode != 0 and "theirs" in missing.stderr and "mine" in missing.stderr  # Hydra lists options
