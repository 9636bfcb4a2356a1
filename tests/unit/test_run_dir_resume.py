"""One run per run dir, and exact resume (issue 8, items 9 and 10)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from fashion_lightning.apps.train import train
from fashion_lightning.utils.run_dir import RunDirError, claim_run_dir, run_dir_of
from hydra_helpers import QUIET, TINY_MODEL, make_cfg

TINY = [
    *TINY_MODEL,
    "data.num_items=200",
    "data.min_count=5",
    "callbacks.evaluation.plot_every_n_val_epochs=100",
    "callbacks.evaluation.retrieval_ks=[1]",
    "trainer.max_epochs=3",
    *QUIET,
]


class Crash(L.Callback):
    """Raises in the middle of epoch 2 (a kill at that point, as far as the run dir is concerned)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 1:
            raise RuntimeError("simulated kill mid-epoch 2")


def _run(run_dir: Path, cache_dir: Path, extra: list[str] = (), crash: bool = False) -> dict:
    cfg = make_cfg("train", run_dir, cache_dir, [*TINY, *extra])
    if crash:
        with open_dict(cfg):
            cfg.callbacks.crash = {"_target_": f"{__name__}.Crash"}
    return train(cfg)


def test_second_run_into_a_used_run_dir_is_refused(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".hydra").mkdir()  # Hydra's own files are not artefacts
    (run / "train.log").write_text("")
    claim_run_dir(run)
    (run / "vocab.json").write_text("{}")
    (run / "checkpoints").mkdir()
    with pytest.raises(RunDirError, match=r"already holds another run's artefacts \(vocab.json, checkpoints\)"):
        claim_run_dir(run)
    ckpt = run / "checkpoints" / "last.ckpt"
    claim_run_dir(run, resume_from=ckpt)  # resuming from a checkpoint inside it is fine
    with pytest.raises(RunDirError):
        claim_run_dir(run, resume_from=tmp_path / "elsewhere" / "last.ckpt")
    assert run_dir_of(ckpt) == run.resolve() and run_dir_of(tmp_path / "x.ckpt") is None


def test_train_app_refuses_a_run_dir_with_another_runs_files(tmp_path, cache_dir) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"test/acc/articleType": 0.9}')
    with pytest.raises(RunDirError, match="metrics.json"):
        _run(run, cache_dir)
    assert json.loads((run / "metrics.json").read_text()) == {"test/acc/articleType": 0.9}
    assert [p.name for p in run.iterdir()] == ["metrics.json"]  # refused before writing anything into it


@pytest.mark.slow
def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, cache_dir) -> None:
    whole = _run(tmp_path / "whole", cache_dir)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _run(tmp_path / "crashed", cache_dir, crash=True)
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    best_before = torch.load(last, weights_only=True)["callbacks"]
    resumed = _run(tmp_path / "relaunch", cache_dir, [f"ckpt_path={last}"])
    # continued in the original run dir, not in the new launch's folder
    assert not (tmp_path / "relaunch" / "metrics.json").exists()
    written = json.loads((tmp_path / "crashed" / "metrics.json").read_text())
    want = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    keys = sorted(k for k in want if k.startswith(("test/", "val/")))
    assert keys and {k: written[k] for k in keys} == {k: want[k] for k in keys}
    assert Path(written["best_checkpoint"]).name == Path(want["best_checkpoint"]).name
    assert Path(written["best_checkpoint"]).parent == tmp_path / "crashed" / "checkpoints"
    assert resumed["test/acc/articleType"] == whole["test/acc/articleType"]
    assert any("ModelCheckpoint" in k for k in best_before)
