"""Decode every catalog image once into a memory-mapped uint8 array.

Epochs then read ``[80, 60, 3]`` slices from page cache instead of re-decoding JPEGs.
The cache lives in a shared cache dir, keyed by the source's fingerprint and the image
geometry, so different inputs never collide and concurrent runs reuse one copy. It is
written to a temporary folder and renamed into place, so a crash never leaves a
half-written cache that looks valid.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from fashion_lightning.data.catalog import Catalog
from fashion_lightning.data.images import NATIVE_HW, ImageDecodeError, to_native
from fashion_lightning.data.source import CatalogSource

log = logging.getLogger(__name__)
CACHE_VERSION = 1
_CHUNK = 512


@dataclass
class ImageCache:
    """Handle on a built cache: ``images[row]`` is the HxWx3 uint8 image of ``ids[row]``."""

    path: Path
    ids: np.ndarray  # int64 [N]
    sha1: np.ndarray  # str [N], hex digest of the source file bytes (exact-duplicate detection)
    failures: dict[int, str]  # id -> why it could not be decoded
    size_hw: tuple[int, int]

    @property
    def images_path(self) -> Path:
        return self.path / "images.u8"

    def open_images(self) -> np.memmap:
        h, w = self.size_hw
        return np.memmap(self.images_path, dtype=np.uint8, mode="r", shape=(len(self.ids), h, w, 3))

    def rows_for(self, ids: np.ndarray) -> np.ndarray:
        """Cache rows for product ids (all must be present)."""
        lookup = {int(i): r for r, i in enumerate(self.ids)}
        return np.fromiter((lookup[int(i)] for i in ids), dtype=np.int64, count=len(ids))

    @classmethod
    def load(cls, path: Path) -> ImageCache:
        meta = json.loads((path / "meta.json").read_text())
        return cls(
            path=path,
            ids=np.load(path / "ids.npy"),
            sha1=np.load(path / "sha1.npy"),
            failures={int(k): v for k, v in meta["failures"].items()},
            size_hw=tuple(meta["size_hw"]),
        )


def cache_key(source: CatalogSource, size_hw: tuple[int, int]) -> str:
    raw = f"v{CACHE_VERSION}:{source.fingerprint()}:{size_hw[0]}x{size_hw[1]}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _decode_chunk(args: tuple[CatalogSource, list[int], tuple[int, int]]):
    source, ids, size_hw = args
    h, w = size_hw
    out = np.full((len(ids), h, w, 3), 255, dtype=np.uint8)
    digests, failures = [], {}
    for k, item_id in enumerate(ids):
        data = source.image_bytes(item_id)
        digests.append(hashlib.sha1(data).hexdigest() if data else "")
        try:
            out[k] = to_native(data, size_hw)
        except ImageDecodeError as err:
            failures[item_id] = str(err)
    return out, digests, failures


def build_image_cache(
    source: CatalogSource, cache_dir: str | Path, size_hw: tuple[int, int] = NATIVE_HW, num_workers: int | None = None
) -> ImageCache:
    """Return the cache for ``source``, decoding all its images on first use."""
    root = Path(cache_dir).expanduser() / "images"
    final = root / cache_key(source, size_hw)
    if (final / "meta.json").exists():
        return ImageCache.load(final)
    root.mkdir(parents=True, exist_ok=True)
    ids = sorted(source.image_ids)
    h, w = size_hw
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        images = np.memmap(tmp / "images.u8", mode="w+", dtype=np.uint8, shape=(len(ids), h, w, 3))
        digests: list[str] = []
        failures: dict[int, str] = {}
        chunks = [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]
        workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
        with Progress(transient=True) as progress:
            task = progress.add_task(f"decoding {len(ids)} images into cache", total=len(ids))
            executor = ProcessPoolExecutor(workers) if workers > 1 and len(chunks) > 1 else None
            mapper = executor.map if executor else map
            try:
                for start, (arr, dig, fail) in zip(
                    range(0, len(ids), _CHUNK), mapper(_decode_chunk, [(source, c, size_hw) for c in chunks])
                ):
                    images[start : start + len(arr)] = arr
                    digests.extend(dig)
                    failures.update(fail)
                    progress.advance(task, len(arr))
            finally:
                if executor:
                    executor.shutdown()
        images.flush()
        del images
        np.save(tmp / "ids.npy", np.asarray(ids, dtype=np.int64))
        np.save(tmp / "sha1.npy", np.asarray(digests, dtype="U40"))
        meta = {"version": CACHE_VERSION, "source": str(source.root), "size_hw": [h, w], "count": len(ids),
                "resize": "letterbox (aspect kept, white bars)", "failures": {str(k): v for k, v in failures.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("image cache ready: %s (%d images, %d undecodable)", final, len(ids), len(failures))
    return ImageCache.load(final)


def attach_images(catalog: Catalog, cache: ImageCache) -> Catalog:
    """Drop rows whose image could not be decoded; add ``cache_row`` and ``image_sha1`` columns.

    Returns a new Catalog with its own copy of the report (the input is left as it was).
    """
    frame = catalog.frame
    catalog = Catalog(catalog.source, frame, copy.deepcopy(catalog.report))
    bad = frame["id"].isin(list(cache.failures))
    for item_id in frame.loc[bad, "id"]:
        log.warning("image of id %s cannot be decoded: %s", item_id, cache.failures[int(item_id)])
    catalog.report.drop("corrupt_image (cannot be decoded)", frame.loc[bad, "id"])
    frame = frame[~bad].reset_index(drop=True)
    rows = cache.rows_for(frame["id"].to_numpy())
    frame = frame.assign(cache_row=rows, image_sha1=cache.sha1[rows])
    catalog.report.rows_kept = len(frame)
    return Catalog(catalog.source, frame, catalog.report)
