"""Missing and wrongly typed config values fail before any data is loaded (issue 8, items 3 and 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fashion_lightning.utils.config_check import ConfigError, check_config
from hydra_helpers import make_cfg

APPS = {"train": [], "eval": ["ckpt_path=x.ckpt"], "index": ["ckpt_path=x.ckpt"], "eda": []}


@pytest.mark.parametrize("app", sorted(APPS))
def test_kaggle_data_without_root_is_a_missing_value_in_every_app(app, tmp_path) -> None:
    cfg = make_cfg(app, tmp_path / "run", tmp_path / "cache", ["data=kaggle", *APPS[app]])
    with pytest.raises(ConfigError, match=r"missing value for data\.root"):
        check_config(cfg)
    check_config(make_cfg(app, tmp_path / "run", tmp_path / "cache", ["data=kaggle", "data.root=/x", *APPS[app]]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", r"trainer\.max_epochs='abc' has the wrong type: Trainer expects Optional\[int\]"),
        ("data.batch_size=2.5", r"data\.batch_size=2\.5 .*FashionDataModule expects int"),
        ("model.label_smoothing=high", r"model\.label_smoothing='high' .*expects float"),
        ("trainer.precision=33", r"trainer\.precision=33 has the wrong type"),
    ],
)
def test_wrong_types_are_config_errors(override, message, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        check_config(make_cfg("train", tmp_path / "run", tmp_path / "cache", [override]))


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["experiment=demo"],
        ["model=clip_lite0_minilm"],
        ["trainer=gpu"],
        ["data.max_items=null", "trainer.max_epochs=3", "model.label_smoothing=0"],
    ],
)
def test_valid_configs_pass(extra, tmp_path) -> None:
    check_config(make_cfg("train", tmp_path / "run", tmp_path / "cache", extra))


def test_train_fails_on_a_type_error_before_touching_data(tmp_path) -> None:
    from fashion_lightning.apps.train import train

    cfg = make_cfg("train", tmp_path / "run", tmp_path / "cache", ["trainer.max_epochs=abc"])
    with pytest.raises(ConfigError, match="max_epochs"):
        train(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_app_exits_2_with_one_line_naming_data_root(tmp_path) -> None:
    env = {**os.environ, "FASHION_LIGHTNING_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "fashion_lightning.apps.train", "data=kaggle", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).parent,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "data.root" in line]
    assert errors and "missing value for data.root" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()
