"""Checkpoints written atomically: a full disk or a kill never leaves a truncated ``.ckpt``.

Lightning's ``TorchCheckpointIO`` writes into the system temp dir and then moves the file onto its
final name; when the temp dir is another filesystem (a tmpfs /tmp) that move is a plain copy, so a
full disk or a kill half way leaves a truncated checkpoint under its final name that later fails to
load (and every checkpoint passes through /tmp). Here the checkpoint is written to a temporary name
beside it, fsynced and renamed on success
(:func:`fashion_lightning.utils.atomic.atomic_path`). The :class:`AtomicCheckpoints` callback installs
it on whatever strategy the trainer uses (``conf/callbacks/atomic_checkpoints.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fashion_lightning.utils.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through a temporary file + rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote filesystems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class AtomicCheckpoints(L.Callback):
    """Install :class:`AtomicCheckpointIO` unless the trainer was given a custom checkpoint IO."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()
