"""A full disk never leaves a truncated artefact under its final name (issue 8, item 7)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from fashion_lightning.callbacks.checkpoint_io import AtomicCheckpointIO, AtomicCheckpoints
from fashion_lightning.data.catalog import DataReport
from fashion_lightning.data.splits import save_splits
from fashion_lightning.data.vocab import LabelVocabs
from fashion_lightning.utils import atomic
from fashion_lightning.utils.reporting import update_json


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def full_disk_after_half(monkeypatch):
    """Every checkpoint write puts half of its bytes on disk, then the disk is full.

    Covers both ways a checkpoint reaches the disk: ``torch.save`` to a path (the atomic writer), and
    Lightning's stock writer, which writes into the system temp dir and then moves the file; with the
    temp dir on another filesystem (tmpfs /tmp) that move is a plain copy onto the final name.
    """
    import os
    import shutil

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, Path)):
            path = Path(f)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            enospc()

    def cross_device(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def copy_half(src, dst, *args, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        enospc()

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(shutil, "copyfile", copy_half)


def test_checkpoint_io_on_a_full_disk_leaves_no_file(tmp_path, full_disk_after_half) -> None:
    target = tmp_path / "checkpoints" / "epoch_000.ckpt"
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, target)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_checkpoint_io_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (real(obj, f, *a, **k), enospc()))
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_trainer_checkpoints_go_through_the_atomic_writer(tmp_path, full_disk_after_half) -> None:
    model = L.LightningModule()
    model.layer = torch.nn.Linear(2, 2)
    trainer = L.Trainer(callbacks=[AtomicCheckpoints()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.strategy.connect(model)
    for callback in trainer.callbacks:
        callback.setup(trainer, model, "fit")
    target = tmp_path / "epoch_000.ckpt"
    with pytest.raises(OSError, match="No space"):
        trainer.save_checkpoint(target)
    assert not target.exists() and not list(tmp_path.glob("*.ckpt*"))  # Lightning's own writer leaves half a file
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_run_artefacts_on_a_full_disk_keep_their_old_content(tmp_path, monkeypatch) -> None:
    metrics, vocab, splits, report = (tmp_path / n for n in ("metrics.json", "vocab.json", "splits.csv", "report.json"))
    update_json(metrics, {"a": 1})
    LabelVocabs.from_dict({"gender": ["Men", "Women"]}).save(vocab)
    frame = pd.DataFrame({"id": [1, 2]})
    save_splits(frame, pd.Series(["train", "test"]), splits)
    DataReport(rows_read=2).save(report)
    before = {p: p.read_bytes() for p in (metrics, vocab, splits, report)}

    real_fsync = atomic.os.fsync
    monkeypatch.setattr(atomic.os, "fsync", enospc)
    with pytest.raises(OSError):
        update_json(metrics, {"a": 2})
    with pytest.raises(OSError):
        LabelVocabs.from_dict({"gender": ["Men"]}).save(vocab)
    with pytest.raises(OSError):
        save_splits(frame, pd.Series(["test", "test"]), splits)
    with pytest.raises(OSError):
        DataReport(rows_read=3).save(report)
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in before)  # no temp files
    assert json.loads(metrics.read_text()) == {"a": 1}
