"""A map-style dataset over the memory-mapped image cache (one row per product)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def seed_worker_transform(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's augmentation its own random stream.

    Albumentations 2 transforms carry their own generators, which forked workers would
    otherwise inherit in the same state (every worker drawing identical augmentations).
    """
    info = torch.utils.data.get_worker_info()
    if info is None:  # called outside a DataLoader worker
        return
    reseed = getattr(getattr(info.dataset, "transform", None), "set_random_seed", None)
    if reseed is not None:
        reseed(info.seed % 2**32)


class FashionDataset(Dataset):
    """Yields the batch-contract dict: uint8 CHW image, label row, id, text (+ ``positive_group`` when given).

    The memmap is opened lazily in each worker process (an open memmap would be pickled
    by value into every worker).
    """

    def __init__(
        self,
        images_path: str | Path,
        cache_shape: tuple[int, int, int, int],
        cache_rows: np.ndarray,
        labels: np.ndarray,
        ids: np.ndarray,
        texts: list[str],
        transform: Callable | None = None,
        positive_groups: np.ndarray | None = None,
    ) -> None:
        if not len(cache_rows) == len(labels) == len(ids) == len(texts):
            raise ValueError("cache_rows, labels, ids and texts must have equal length")
        self.images_path = str(images_path)
        self.cache_shape = tuple(cache_shape)
        self.cache_rows = np.asarray(cache_rows, dtype=np.int64)
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.int64)  # copies: pandas 3 arrays are read-only
        self.ids = torch.tensor(np.asarray(ids), dtype=torch.int64)
        self.texts = list(texts)
        self.transform = transform
        # same-product group per item (same title / identical photo), for multi-positive contrastive losses
        self.positive_groups = None if positive_groups is None else torch.as_tensor(positive_groups, dtype=torch.int64)
        if self.positive_groups is not None and len(self.positive_groups) != len(self.ids):
            raise ValueError("positive_groups must have one entry per item")
        self._images: np.memmap | None = None
        self._stream_seed: int | None = None  # the epoch seed the augmentation was last reseeded with

    def __len__(self) -> int:
        return len(self.cache_rows)

    @property
    def images(self) -> np.memmap:
        if self._images is None:
            self._images = np.memmap(self.images_path, dtype=np.uint8, mode="r", shape=self.cache_shape)
        return self._images

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    def image(self, index: int) -> np.ndarray:
        """The native HxWx3 uint8 image (no augmentation)."""
        return np.array(self.images[self.cache_rows[index]])  # a copy: memmap pages are read-only

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        if isinstance(index, tuple):  # (index, epoch seed) from EpochShuffleSampler: reseed once per epoch + worker
            index, seed = index
            reseed = getattr(self.transform, "set_random_seed", None) if seed != self._stream_seed else None
            if reseed is not None:
                info = torch.utils.data.get_worker_info()
                reseed((seed + 7919 * (info.id if info else 0)) % 2**32)
                self._stream_seed = seed
        img = self.image(index)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        return item_fields(self, index, image=torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))))


def item_fields(split: Any, index: int, **inputs: Any) -> dict[str, Any]:
    """``inputs`` plus what every item of ``split`` carries beside its input (labels, id, title, duplicate
    group): one place for the datasets that serve images and those that serve cached activations."""
    item = {**inputs, "labels": split.labels[index], "id": split.ids[index], "text": split.texts[index]}
    if split.positive_groups is not None:
        item["positive_group"] = split.positive_groups[index]
    return item
