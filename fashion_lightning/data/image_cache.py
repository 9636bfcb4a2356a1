"""Decode every catalog image once into a memory-mapped uint8 array.

Epochs then read ``[80, 60, 3]`` slices from page cache instead of re-decoding JPEGs.
The cache lives in a shared cache dir, keyed by the source's fingerprint and the image
geometry, so different inputs never collide and concurrent runs reuse one copy. It is
written to a temporary ``.building-*`` folder and renamed into place, so a crash never leaves a
half-written cache that looks valid; decode workers die with the building process, and the next
build removes folders that a killed build left behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.progress import Progress

from fashion_lightning.data.catalog import Catalog
from fashion_lightning.data.images import CORRUPT, NATIVE_HW, ImageDecodeError, to_native
from fashion_lightning.data.source import CatalogSource
from fashion_lightning.utils.atomic import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: failures carry a reason (corrupt / too large / unreadable file)
_CHUNK = 512
UNREADABLE = "unreadable_image_file (bad zip member or read error)"


@dataclass
class ImageCache:
    """Handle on a built cache: ``images[row]`` is the HxWx3 uint8 image of ``ids[row]``."""

    path: Path
    ids: np.ndarray  # int64 [N]
    sha1: np.ndarray  # str [N], hex digest of the source file bytes (exact-duplicate detection)
    failures: dict[int, str]  # id -> why it could not be decoded
    size_hw: tuple[int, int]
    failure_reasons: dict[int, str] = field(default_factory=dict)  # id -> data_report reason

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
            failure_reasons={int(k): v for k, v in meta.get("failure_reasons", {}).items()},
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
        try:
            data = source.image_bytes(item_id)
        except (zipfile.BadZipFile, OSError, EOFError) as err:  # bad CRC in a zip member, unreadable file
            digests.append("")
            failures[item_id] = (UNREADABLE, f"cannot read the image file ({type(err).__name__}: {err})")
            continue
        digests.append(hashlib.sha1(data).hexdigest() if data else "")
        assert data is not None, item_id  # ids come from source.image_ids: every id has a file
        try:
            out[k] = to_native(data, size_hw)
        except ImageDecodeError as err:
            failures[item_id] = (err.reason, str(err))
    return out, digests, failures


BUILDING_PREFIX = ".building-"
OWNER_FILE = "owner.json"
BUILD_TIMEOUT_S = 6 * 3600  # a build folder untouched this long is abandoned, whoever owns it


def _die_with_parent(parent_pid: int) -> None:
    """Decode-worker initializer: exit when the building process dies (even by SIGKILL).

    On Linux the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``); elsewhere a
    daemon thread polls the parent pid. Without this, pool workers of a killed build wait forever.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl failed")
    except (OSError, AttributeError):

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(folder: Path, timeout_s: float) -> bool:
    """A build folder left by a dead process on this host, or untouched for ``timeout_s``."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner["pid"])):
            return True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no or unreadable owner file (e.g. killed right after mkdtemp): judge by age alone
    try:
        newest = max([folder.stat().st_mtime, *(f.stat().st_mtime for f in folder.iterdir())])
    except OSError:
        return False  # vanished meanwhile: its owner finished
    return time.time() - newest > timeout_s


def remove_stale_builds(root: Path, timeout_s: float = BUILD_TIMEOUT_S) -> list[Path]:
    """Delete ``.building-*`` folders that crashed builds left behind (see :func:`_is_stale`)."""
    removed = []
    for folder in root.glob(f"{BUILDING_PREFIX}*"):
        if folder.is_dir() and _is_stale(folder, timeout_s):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s, left by a build that did not finish", folder)
            removed.append(folder)
    return removed


def build_image_cache(
    source: CatalogSource,
    cache_dir: str | Path,
    size_hw: tuple[int, int] = NATIVE_HW,
    num_workers: int | None = None,
    build_timeout_s: float = BUILD_TIMEOUT_S,
) -> ImageCache:
    """Return the cache for ``source``, decoding all its images on first use."""
    root = Path(cache_dir).expanduser() / "images"
    final = root / cache_key(source, size_hw)
    if (final / "meta.json").exists():
        return ImageCache.load(final)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(root, build_timeout_s)
    ids = sorted(source.image_ids)
    h, w = size_hw
    failures: dict[int, str] = {}
    reasons: dict[int, str] = {}
    try:
        with atomic_dir(final, prefix=BUILDING_PREFIX) as tmp:
            atomic_write_text(tmp / OWNER_FILE, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            images = np.memmap(tmp / "images.u8", mode="w+", dtype=np.uint8, shape=(len(ids), h, w, 3))
            digests: list[str] = []
            chunks = [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]
            workers = num_workers if num_workers is not None else min(4, os.cpu_count() or 1)
            with Progress(transient=True) as progress:
                task = progress.add_task(f"decoding {len(ids)} images into cache", total=len(ids))
                executor = (
                    ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(os.getpid(),))
                    if workers > 1 and len(chunks) > 1 else None
                )  # fmt: skip
                mapper = executor.map if executor else map
                try:
                    for start, (arr, dig, fail) in zip(
                        range(0, len(ids), _CHUNK), mapper(_decode_chunk, [(source, c, size_hw) for c in chunks])
                    ):
                        images[start : start + len(arr)] = arr
                        digests.extend(dig)
                        failures.update({i: msg for i, (_, msg) in fail.items()})
                        reasons.update({i: why for i, (why, _) in fail.items()})
                        progress.advance(task, len(arr))
                finally:
                    if executor:
                        executor.shutdown(cancel_futures=True)
            images.flush()
            del images
            np.save(tmp / "ids.npy", np.asarray(ids, dtype=np.int64))
            np.save(tmp / "sha1.npy", np.asarray(digests, dtype="U40"))
            (tmp / OWNER_FILE).unlink()
            meta = {
                "version": CACHE_VERSION,
                "source": str(source.root),
                "size_hw": [h, w],
                "count": len(ids),
                "resize": "letterbox (aspect kept, white bars)",
                "failures": {str(k): v for k, v in failures.items()},
                "failure_reasons": {str(k): v for k, v in reasons.items()},
            }
            atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    except FileExistsError:  # another process finished first: use theirs
        if not (final / "meta.json").exists():
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
    by_reason: dict[str, list[int]] = {}
    for item_id in frame.loc[bad, "id"]:
        log.warning("image of id %s cannot be decoded: %s", item_id, cache.failures[int(item_id)])
        by_reason.setdefault(cache.failure_reasons.get(int(item_id), CORRUPT), []).append(int(item_id))
    for reason, ids in by_reason.items():
        catalog.report.drop(reason, ids)
    frame = frame[~bad].reset_index(drop=True)
    rows = cache.rows_for(frame["id"].to_numpy())
    frame = frame.assign(cache_row=rows, image_sha1=cache.sha1[rows])
    catalog.report.rows_kept = len(frame)
    return Catalog(catalog.source, frame, catalog.report)
