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
from collections.abc import Iterator, Sequence
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


class GroupedShuffleSampler(EpochShuffleSampler):
    """Hard-negative order: runs of ``chunk`` items of one group (articleType x gender, ...) back to back.

    The DataLoader cuts consecutive indices into batches, so a batch of ``B`` holds about
    ``B / chunk`` groups with ``chunk`` items each: its in-batch negatives are mostly products of
    the same kind, which a contrastive loss must tell apart by finer detail (colour, brand, cut)
    instead of the easy "shoe vs watch". Each epoch shuffles items within groups, cuts the
    groups into chunks and shuffles the chunks, all from (seed, epoch), so resumes replay it.
    Yields ``(index, epoch_seed)`` like :class:`EpochShuffleSampler`.
    """

    def __init__(self, groups: Sequence[int], chunk: int, seed: int, holder: HasEpoch) -> None:
        super().__init__(len(groups), seed, holder)
        if chunk < 2:
            raise ValueError(f"hard-negative chunk must be >= 2, got {chunk}")
        self.groups = torch.as_tensor(list(groups), dtype=torch.long)
        self.chunk = int(chunk)

    def order(self, value: int) -> list[int]:
        """The epoch's index order for the epoch seed ``value``."""
        gen = torch.Generator().manual_seed(value)
        chunks: list[list[int]] = []
        for group in torch.unique(self.groups).tolist():
            found = torch.nonzero(self.groups == group).squeeze(1)
            members: list[int] = found[torch.randperm(found.numel(), generator=gen)].tolist()
            chunks += [members[i : i + self.chunk] for i in range(0, len(members), self.chunk)]
        return [i for k in torch.randperm(len(chunks), generator=gen).tolist() for i in chunks[k]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = int(getattr(self.holder, "epoch", 0))
        self.holder.epoch = epoch + 1
        value = epoch_seed(self.seed, epoch)
        for index in self.order(value):
            yield index, value
