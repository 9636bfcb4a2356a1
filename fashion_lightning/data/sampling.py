"""Train-set shuffling that depends on (seed, epoch) only, so a resumed run sees the same batches.

A plain ``shuffle=True`` draws its order from the global RNG when the loader's iterator is made;
Lightning makes the first epoch's iterator of every launch early (before any epoch hook), so a
run resumed at epoch N would shuffle from a different RNG state than the uninterrupted run did.
:class:`EpochShuffleSampler` reads the epoch from a holder the
:class:`~fashion_lightning.callbacks.epoch_seed.EpochSeed` callback sets before that happens, and passes the
epoch's seed along with each index, so the dataset reseeds its augmentation once per epoch and worker
(:meth:`FashionDataset.__getitem__`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed derived from (seed, epoch), hash-mixed so neighbouring seeds do not share streams."""
    digest = hashlib.sha256(f"{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class HasEpoch(Protocol):
    epoch: int


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch_seed)`` in a permutation fixed by (seed, ``holder.epoch``).

    ``holder.epoch`` is the epoch the next pass shuffles by; each pass advances it, and Lightning
    (``set_epoch``) and the EpochSeed callback set it before the passes they start.
    """

    def __init__(self, size: int, seed: int, holder: HasEpoch) -> None:
        self.size, self.seed, self.holder = int(size), int(seed), holder

    def __len__(self) -> int:
        return self.size

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (after the launch's first iterator exists)."""
        self.holder.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(getattr(self.holder, "epoch", 0))
        self.holder.epoch = epoch + 1  # plain loops over the loader (no trainer) get a new order each pass
        value = epoch_seed(self.seed, epoch)
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(value))
        for index in order.tolist():
            yield index, value
