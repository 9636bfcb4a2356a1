"""Atomic file output: the one place that writes a file under a temporary name and renames it.

A crash, a full disk or a kill while writing leaves either the old file or nothing under the final
name, never a truncated file that looks valid. Every artefact the package writes (checkpoints,
metrics.json, vocab.json, splits.csv, index files, caches) goes through here.

A ``kill -9`` still leaves the temporary file. Its name says who wrote it
(``.tmp-<name>.<host>-<pid>.<random><suffix>``), so the next write into the same folder removes the
temporaries of writers on this host whose process is gone (:func:`remove_dead_temps`), and never a live
process's, another host's, or any file not named that way.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_swept: set[Path] = set()
_swept_lock = threading.Lock()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # exists, owned by someone else / not a pid this OS has
        return True
    return True


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporary files and scratch folders for ``name``: removable once it dies."""
    return f"{TMP_PREFIX}{name}.{HOST}-{os.getpid()}."


def remove_dead_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files (and scratch folders) in ``directory`` that writers on this host left when they
    died."""
    pattern = re.compile(rf"{re.escape(TMP_PREFIX)}.+\.{re.escape(HOST)}-(\d+)\.[a-z0-9_]+")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or entry.is_symlink() or pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process removed it first
            if entry.is_dir(follow_symlinks=False):  # scratch folders (tempfile.TemporaryDirectory(prefix=...))
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _sweep_once(directory: Path) -> None:
    """:func:`remove_dead_temps` the first time this process writes into ``directory``."""
    key = directory.resolve()
    with _swept_lock:
        if key in _swept:
            return
        _swept.add(key)
    remove_dead_temps(key)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed and renamed onto ``path``.

    For writers that take a path (``torch.save``, ``faiss.write_index``, ``DataFrame.to_csv``).
    ``suffix`` keeps an extension some writers insist on (``np.savez`` appends ``.npz`` otherwise).
    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(final.parent)
    prefix = temp_prefix(final.name)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix or final.suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, prefix: str = ".building-", mode: int = 0o755) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on success it is renamed onto ``path``.

    For artefacts that are folders (image caches, generated catalogs, downloads). The rename only
    succeeds onto an absent name or an empty folder, so nothing that exists is ever overwritten:
    when ``path`` meanwhile holds files (another process finished first), :class:`FileExistsError`
    is raised and our copy discarded. On any exception the temporary folder is removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        tmp.chmod(mode)  # mkdtemp makes it owner-only; caches may be shared
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError as err:
            if final.exists():
                raise FileExistsError(f"{final} exists and is not empty; not replacing it") from err
            raise
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
