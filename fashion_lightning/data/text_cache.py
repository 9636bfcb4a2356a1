"""Cached lower text layers: token states of every unique title after layer ``L`` of the CLIP text tower, on disk.

``model.cache_text: {layer: L}`` trains the text tower only from layer ``L`` up; the frozen embeddings and
layers below ``L`` are run here once per unique title of the train/val/test splits (titles are short and
repeat: one row per distinct string) and stored as two memory-mapped arrays in
``<cache_dir>/text/<key>/``: ``states [titles, ctx, width]`` (fp16 by default) and ``mask [titles, ctx]``
(uint8). The key hashes the token ids of the titles (so the text template and the tokenizer are covered),
the frozen weights and the cut (the encoder's fingerprint) and the dtype; a later run or a sweep reuses it.

Built with the trunk cache's machinery (:func:`~fashion_lightning.data.trunk_cache.ensure_chunked`):
checksummed chunks, resumed after a kill, a damaged chunk recomputed on the next open, ``meta.json`` last.
Text is never augmented by the datamodule (titles are fixed strings), so one state per title is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from fashion_lightning.data import trunk_cache
from fashion_lightning.data.trunk_cache import DTYPES, Layout, ensure_chunked, open_array

TEXT_CACHE_VERSION = 1


class TextEncoder(Protocol):
    """What the model hands the datamodule: titles -> token ids; token ids -> (states, mask) at the cut."""

    fingerprint: str

    def tokenize(self, texts: list[str]) -> torch.Tensor: ...

    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class TextCache:
    """A complete, verified cache: row ``rows[title]`` of ``open("states")`` / ``open("mask")``."""

    path: Path
    layout: Layout
    titles: tuple[str, ...]

    @property
    def rows(self) -> dict[str, int]:
        return {title: row for row, title in enumerate(self.titles)}

    def open(self, name: str) -> np.memmap:
        return open_array(self.path, name, self.layout)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.layout.values())


def _fill(encoder: TextEncoder, tokens: torch.Tensor, rows: range, batch_size: int) -> dict[str, np.ndarray]:
    states, masks = [], []
    for lo in range(rows.start, rows.stop, batch_size):
        with torch.no_grad():
            state, mask = encoder(tokens[lo : min(lo + batch_size, rows.stop)])
        states.append(state.float().cpu().numpy())
        masks.append(mask.cpu().numpy().astype(np.uint8))
    return {"states": np.concatenate(states), "mask": np.concatenate(masks)}


def ensure_text_cache(
    texts: Sequence[str],
    encoder: TextEncoder,
    cache_dir: str | Path,
    dtype: str = "float16",
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> TextCache:
    """Token states of the unique ``texts``: built on first use, resumed after a kill, damaged chunks rebuilt."""
    if dtype not in DTYPES:
        raise ValueError(f"cache_text.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    titles = tuple(sorted({str(t) for t in texts}))
    if not titles:
        raise ValueError("cannot cache the token states of no titles")
    tokens = encoder.tokenize(list(titles)).long().cpu()
    digest = hashlib.sha1(f"v{TEXT_CACHE_VERSION}:{encoder.fingerprint}:{dtype}:{tuple(tokens.shape)}".encode())
    digest.update(tokens.numpy().tobytes())
    root = Path(cache_dir).expanduser() / "text"
    key = digest.hexdigest()[:16]
    folder = root / key

    def layout() -> Layout:
        with torch.no_grad():
            state, mask = encoder(tokens[:1])
        return {"states": ((len(titles), *state.shape[1:]), dtype), "mask": ((len(titles), *mask.shape[1:]), "uint8")}

    meta = {"version": TEXT_CACHE_VERSION, "dtype": dtype, "items": len(titles),
            "chunk_items": trunk_cache.CHUNK_ITEMS, "encoder": encoder.fingerprint}  # fmt: skip
    with trunk_cache.locked(root / f"{key}.lock"):
        shapes = ensure_chunked(folder, len(titles), layout, lambda rows: _fill(encoder, tokens, rows, batch_size),
                                meta, "text token states", progress)  # fmt: skip
    return TextCache(folder, shapes, titles)


class CachedTextDataset(Dataset):
    """Any batch-contract dataset plus ``text_states`` / ``text_mask``: its item's title at the text cut.

    Indices pass through unchanged (plain, or ``(index, epoch seed)`` from the training samplers), so the
    wrapped dataset keeps its images, augmentation or cached trunk activations. The memmaps open lazily per
    worker process.
    """

    def __init__(self, items: Any, cache: TextCache, texts: Sequence[str]) -> None:
        if len(texts) != len(items):
            raise ValueError(f"{len(texts)} titles for {len(items)} items")
        rows = cache.rows
        missing = [t for t in texts if str(t) not in rows]
        if missing:
            raise ValueError(f"{len(missing)} title(s) are not in the text cache, e.g. {missing[0][:80]!r}")
        self.items, self.cache = items, cache
        self.title_rows = np.asarray([rows[str(t)] for t in texts], dtype=np.int64)
        self._arrays: tuple[np.memmap, np.memmap] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        item = self.items[index]
        row = self.title_rows[index[0] if isinstance(index, tuple) else index]
        if self._arrays is None:
            self._arrays = (self.cache.open("states"), self.cache.open("mask"))
        states, mask = self._arrays
        item["text_states"] = torch.from_numpy(np.array(states[row]))
        item["text_mask"] = torch.from_numpy(np.array(mask[row]))
        return item
