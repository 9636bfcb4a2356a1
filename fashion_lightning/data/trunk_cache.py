"""Cached partial trunks: activations of the frozen lower layers, V augmented views per item, on disk.

``model.cache_trunk: {cut, views}`` trains only the layers above the cut; the layers below are run here once
per view and item (un-augmented, one view, for val/test) and stored as one memory-mapped array
``[items, views, C, H, W]`` (fp16 by default) in ``<cache_dir>/trunk/<key>/``. The key hashes everything the
activations depend on (the split's item ids and image cache, the lower weights, cut, input size,
normalisation, augmentation and its seed, views, dtype), so a changed input never reuses a stale cache and
another run (or a sweep of 20 trials) with the same inputs reuses it.

Durability: the array is filled chunk by chunk (``CHUNK_ITEMS`` items x all views); after a chunk's bytes
are flushed its SHA-1 is written (atomically) to ``chunks/<i>.sha1``, and ``meta.json`` is written last.
A killed build resumes at the first chunk without a valid checksum; every open re-hashes the chunks, and
a damaged one (bit rot, a torn write) is recomputed from the images (views are seeded per chunk, so the
rebuilt chunk is the same). One build per key at a time (``fcntl`` lock); readers only trust a key folder
whose ``meta.json`` exists. That machinery (:func:`ensure_chunked`: named arrays, one row per item) is shared
with the CLIP text cache (``data/text_cache.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from rich.progress import Progress
from torch.utils.data import Dataset

from fashion_lightning.data.dataset import FashionDataset, item_fields
from fashion_lightning.data.sampling import epoch_seed
from fashion_lightning.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)
TRUNK_CACHE_VERSION = 1
CHUNK_ITEMS = 256
DTYPES = ("float16", "float32")


class TrunkEncoder(Protocol):
    """What the model hands the datamodule: uint8 images ``[B,3,h,w]`` -> activations at the cut."""

    fingerprint: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrunkCache:
    """A complete, verified cache: ``open()[row, view]`` is the activation of the split's ``row``-th item."""

    path: Path
    shape: tuple[int, ...]  # (items, views, C, H, W)
    dtype: str

    @property
    def data_path(self) -> Path:
        return self.path / "activations.bin"

    @property
    def views(self) -> int:
        return self.shape[1]

    def open(self, mode: Literal["r", "r+"] = "r") -> np.memmap:
        return np.memmap(self.data_path, dtype=self.dtype, mode=mode, shape=self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def trunk_cache_key(dataset: FashionDataset, encoder: TrunkEncoder, views: int, dtype: str, transform: Any,
                    seed: int) -> str:  # fmt: skip
    """Content key: the split's images (image cache file + rows + ids), the encoder, the views and dtype."""
    digest = hashlib.sha1(f"v{TRUNK_CACHE_VERSION}:{encoder.fingerprint}:{views}:{dtype}:{seed}".encode())
    digest.update(str(Path(dataset.images_path).resolve()).encode())  # the image cache folder is content-keyed
    digest.update(np.ascontiguousarray(dataset.cache_rows).tobytes())
    digest.update(dataset.ids.numpy().tobytes())
    digest.update(repr(transform).encode() if transform is not None else b"none")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock file (one builder per key; a second waits and then finds the cache built)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: builds of one key must not overlap
            pass
        yield


# --- the chunked, checksummed memmap machinery (shared with the text cache, data/text_cache.py) -------------
Layout = dict[str, tuple[tuple[int, ...], str]]  # array name -> (full shape, dtype); axis 0 = items


def open_array(folder: Path, name: str, layout: Layout, mode: Literal["r", "r+", "w+"] = "r") -> np.memmap:
    shape, dtype = layout[name]
    return np.memmap(folder / f"{name}.bin", dtype=dtype, mode=mode, shape=shape)


def _chunk_digest(arrays: Mapping[str, np.memmap], chunk: int) -> str:
    """SHA-1 of the chunk's rows of every array (in name order; one array: the hash of its rows)."""
    digest = hashlib.sha1()
    for name in sorted(arrays):
        rows = arrays[name][chunk * CHUNK_ITEMS : (chunk + 1) * CHUNK_ITEMS]
        digest.update(np.ascontiguousarray(rows).tobytes())
    return digest.hexdigest()


def _chunk_ok(folder: Path, arrays: Mapping[str, np.memmap], chunk: int) -> bool:
    recorded = folder / "chunks" / f"{chunk:05d}.sha1"
    try:
        expected = recorded.read_text().strip()
    except OSError:
        return False
    return expected == _chunk_digest(arrays, chunk)


def _read_layout(folder: Path, items: int) -> Layout | None:
    """The folder's ``layout.json`` if its arrays exist with the sizes it names (``None``: start over).

    ``{"arrays": {name: {shape, dtype}}}``; a single-array layout also carries ``shape``/``dtype`` at the top
    (what a trunk cache of version 1 wrote, read as the array ``activations``).
    """
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        raw = json.loads((folder / "layout.json").read_text())
        described = raw.get("arrays") or {"activations": {"shape": raw["shape"], "dtype": raw["dtype"]}}
        layout = {str(n): (tuple(int(v) for v in a["shape"]), str(a["dtype"])) for n, a in described.items()}
        for name, (shape, dtype) in layout.items():
            if dtype not in DTYPES + ("uint8",) or not shape or shape[0] != items:
                return None
            if (folder / f"{name}.bin").stat().st_size != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                return None
        return layout
    return None


def _start_over(folder: Path, layout: Layout) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # nothing usable: start over
    (folder / "chunks").mkdir(parents=True)
    for name in layout:
        open_array(folder, name, layout, "w+").flush()  # allocates the file at its full size
    arrays = {n: {"shape": list(s), "dtype": d} for n, (s, d) in layout.items()}
    first_shape, first_dtype = next(iter(layout.values()))  # readable by a version-1 trunk cache reader too
    atomic_write_text(folder / "layout.json", json.dumps({"shape": list(first_shape), "dtype": first_dtype,
                                                          "arrays": arrays}))  # fmt: skip


def ensure_chunked(
    folder: Path,
    items: int,
    layout: Callable[[], Layout],
    fill: Callable[[range], Mapping[str, np.ndarray]],
    meta: Mapping[str, Any],
    what: str,
    progress: Callable[[int, int], None] | None = None,
) -> Layout:
    """Build, resume or repair the chunked arrays in ``folder`` (the caller holds the key's lock).

    ``layout()`` gives the arrays' shapes (called only when there is nothing to resume); ``fill(rows)``
    computes the rows of every array for one chunk (deterministically: a rebuilt chunk must equal the
    original). ``meta`` is written, last, to ``meta.json``: the mark of a complete cache.
    """
    shapes = _read_layout(folder, items)
    if shapes is None:
        shapes = layout()
        _start_over(folder, shapes)
    arrays = {name: open_array(folder, name, shapes, "r+") for name in shapes}
    chunks = -(-items // CHUNK_ITEMS)
    complete = (folder / "meta.json").exists()
    todo = [c for c in range(chunks) if not _chunk_ok(folder, arrays, c)]
    if todo and complete:
        log.warning("%s %s: %d damaged chunk(s) %s, rebuilding them", what, folder, len(todo), todo[:8])
    elif todo and len(todo) < chunks:
        log.info("%s %s: resuming a build (%d of %d chunks left)", what, folder, len(todo), chunks)
    if todo:
        with Progress(transient=True) as bar:
            task = bar.add_task(f"caching {what} ({items} items)", total=len(todo))
            for done, chunk in enumerate(todo, 1):
                (folder / "chunks" / f"{chunk:05d}.sha1").unlink(missing_ok=True)
                rows = range(chunk * CHUNK_ITEMS, min((chunk + 1) * CHUNK_ITEMS, items))
                values = fill(rows)
                for name, array in arrays.items():
                    array[rows.start : rows.stop] = values[name].astype(array.dtype, copy=False)
                    array.flush()
                atomic_write_text(folder / "chunks" / f"{chunk:05d}.sha1", _chunk_digest(arrays, chunk))
                bar.advance(task)
                if progress is not None:
                    progress(done, len(todo))
    del arrays
    if not complete or todo:
        arrays_meta = {n: {"shape": list(s), "dtype": d} for n, (s, d) in shapes.items()}
        first = next(iter(shapes.values()))[0]
        record = {**meta, "shape": list(first), "arrays": arrays_meta}
        atomic_write_text(folder / "meta.json", json.dumps(record, indent=1))
    return shapes


# --- the trunk cache -------------------------------------------------------------------------------------
def _views_of(dataset: FashionDataset, rows: range, view: int, transform: Any, seed: int) -> torch.Tensor:
    """uint8 ``[B,3,h,w]`` images of ``rows``: native for view 0 without a transform, else augmented (seeded)."""
    reseed = getattr(transform, "set_random_seed", None)
    images = []
    for row in rows:
        img = dataset.image(row)
        if transform is not None:
            if reseed is not None:  # per item and view: a rebuilt chunk draws the same views
                reseed(epoch_seed(seed, row * 131 + view))
            img = transform(image=img)["image"]
        images.append(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return torch.from_numpy(np.stack(images))


def _fill_views(dataset: FashionDataset, encoder: TrunkEncoder, rows: range, views: int, transform: Any,
                seed: int, batch_size: int) -> dict[str, np.ndarray]:  # fmt: skip
    out: np.ndarray | None = None
    for view in range(views):
        for lo in range(rows.start, rows.stop, batch_size):
            batch = range(lo, min(lo + batch_size, rows.stop))
            with torch.no_grad():
                acts = encoder(_views_of(dataset, batch, view, transform, seed)).float().cpu().numpy()
            if out is None:
                out = np.empty((len(rows), views, *acts.shape[1:]), dtype=np.float32)
            out[lo - rows.start : batch.stop - rows.start, view] = acts
    assert out is not None  # rows is never empty
    return {"activations": out}


def ensure_trunk_cache(
    dataset: FashionDataset,
    encoder: TrunkEncoder,
    cache_dir: str | Path,
    views: int = 1,
    dtype: str = "float16",
    transform: Any = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> TrunkCache:
    """The split's cached activations: built on first use, resumed after a kill, damaged chunks rebuilt."""
    if dtype not in DTYPES:
        raise ValueError(f"cache_trunk.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if views < 1:
        raise ValueError(f"cache_trunk.views must be >= 1, got {views}")
    if transform is None:
        views = 1  # un-augmented views would all be identical
    if len(dataset) == 0:
        raise ValueError("cannot cache the trunk activations of an empty split")
    root = Path(cache_dir).expanduser() / "trunk"
    key = trunk_cache_key(dataset, encoder, views, dtype, transform, seed)
    folder = root / key

    def layout() -> Layout:
        with torch.no_grad():
            probe = encoder(_views_of(dataset, range(1), 0, None, 0))
        return {"activations": ((len(dataset), views, *(int(v) for v in probe.shape[1:])), dtype)}

    def fill(rows: range) -> dict[str, np.ndarray]:
        return _fill_views(dataset, encoder, rows, views, transform, seed, batch_size)

    meta = {"version": TRUNK_CACHE_VERSION, "dtype": dtype, "items": len(dataset), "chunk_items": CHUNK_ITEMS,
            "encoder": encoder.fingerprint, "augmented": transform is not None}  # fmt: skip
    with locked(root / f"{key}.lock"):
        shapes = ensure_chunked(folder, len(dataset), layout, fill, meta, "trunk activations", progress)
    shape = shapes["activations"][0]
    return TrunkCache(folder, shape, dtype)


def view_for(seed: int, index: int, views: int) -> int:
    """The view an item shows in the epoch with ``seed`` (a cheap integer hash; uniform over views)."""
    x = (seed * 0x9E3779B1 + index * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    return x % views


class CachedTrunkDataset(Dataset):
    """The batch contract with ``activation`` (the cut's activations) in place of ``image``.

    Training indices come as ``(index, epoch seed)`` from :class:`EpochShuffleSampler`: each epoch shows one
    view per item, chosen by (seed, index). Plain indices (val/test) show view 0. The memmap opens lazily
    per worker process.
    """

    def __init__(self, cache: TrunkCache, items: FashionDataset) -> None:
        if cache.shape[0] != len(items):
            raise ValueError(f"trunk cache has {cache.shape[0]} items, the split {len(items)}")
        self.cache, self.labels, self.ids, self.texts = cache, items.labels, items.ids, items.texts
        self.positive_groups = items.positive_groups  # same-product groups (multi-positive losses) travel too
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        view = 0
        if isinstance(index, tuple):
            index, seed = index
            view = view_for(seed, index, self.cache.views)
        if self._array is None:
            self._array = self.cache.open()
        return item_fields(self, index, activation=torch.from_numpy(np.array(self._array[index, view])))
