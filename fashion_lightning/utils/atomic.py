"""Atomic file output: the one place that writes a file under a temporary name and renames it.

A crash, a full disk or a kill while writing leaves either the old file or nothing under the final
name, never a truncated file that looks valid. Every artefact the package writes (checkpoints,
metrics.json, vocab.json, splits.csv, index files, caches) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


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
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{final.name}.", suffix=suffix or final.suffix, dir=final.parent)
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
