"""Hydra multirun through the real console entry point: one folder per job plus a summary."""

import csv
import json
import os
import subprocess
import sys

import pytest

TINY = [
    "model.net.backbone=test_resnet",
    "model.net.image_size=[40,32]",
    "data.num_items=200",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "callbacks.rich_progress_bar=null",
    "+trainer.enable_progress_bar=false",
]


def _run(tmp_path, args):
    env = {**os.environ, "FASHION_LIGHTNING_CACHE": str(tmp_path / "cache")}
    cmd = [
        sys.executable,
        "-m",
        "fashion_lightning.apps.train",
        "-m",
        *args,
        *TINY,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "sweep"


@pytest.mark.slow
def test_two_job_grid_gets_separate_dirs_and_a_summary(tmp_path):
    sweep = _run(tmp_path, ["seed=1,2"])
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert "val/acc/articleType" in metrics
        assert (job / "checkpoints" / "last.ckpt").exists()
        assert "seed: " in (job / "config_tree.txt").read_text()  # task_wrapper's extras, per job
        assert not (job / "FAILED.txt").exists()
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert sorted(r["job"] for r in rows) == ["0", "1"]
    assert {r["overrides"].split()[0] for r in rows} == {"seed=1", "seed=2"}


@pytest.mark.slow
def test_optuna_sweep_runs_and_records_best(tmp_path):
    sweep = _run(tmp_path, ["hparams_search=multitask_optuna", "hydra.sweeper.n_trials=2"])
    assert (sweep / "optimization_results.yaml").exists()
    assert len(list(csv.DictReader((sweep / "sweep_summary.csv").open()))) == 2
