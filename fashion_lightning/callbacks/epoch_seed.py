"""Every train epoch's randomness as a function of (seed, epoch): resumed runs equal uninterrupted ones.

A run resumed from the end of epoch N (``ckpt_path=.../last.ckpt``) then draws exactly what the
uninterrupted run drew from epoch N+1 on: the same shuffle, augmentation and dropout, bit for bit on CPU.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch

from fashion_lightning.data.sampling import epoch_seed


class EpochSeed(L.Callback):
    """Make every train epoch's randomness a function of (seed, epoch): resume is then exact on CPU.

    Sets the epoch the datamodule's :class:`~fashion_lightning.data.sampling.EpochShuffleSampler`
    shuffles by (at fit start too: Lightning creates the first epoch's loader iterator of a launch
    before any epoch hook), and reseeds torch / numpy / random at the first batch of each epoch
    (dropout and anything else drawn from the global generators in the training step).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    @staticmethod
    def _set_epoch(trainer: L.Trainer) -> None:
        datamodule = getattr(trainer, "datamodule", None)  # set by Lightning when fit() attaches one (untyped)
        if datamodule is not None and hasattr(datamodule, "epoch"):
            datamodule.epoch = trainer.current_epoch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_epoch(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_epoch(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == 0:
            value = epoch_seed(self.seed + 1, trainer.current_epoch)
            random.seed(value)
            np.random.seed(value)
            torch.manual_seed(value)
