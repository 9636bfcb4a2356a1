"""Fetch the Kaggle dataset with kagglehub and check that it loads as a catalog.

Plain functions; the ``fashion-download`` app (:mod:`fashion_lightning.apps.download`) calls them.

``kagglehub`` downloads into its own cache (``~/.cache/kagglehub``; ``KAGGLEHUB_CACHE`` moves
it). With ``target_dir`` the files are then copied (or symlinked) into a data folder of your
choice. Either way the result is validated with :class:`CatalogSource` (styles.csv next to
images/), and the path to pass as ``data.root`` is returned.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from fashion_lightning.data.source import CatalogNotFoundError, CatalogSource
from fashion_lightning.utils.atomic import atomic_dir

log = logging.getLogger(__name__)

DEFAULT_HANDLE = "paramaggarwal/fashion-product-images-small"
MODES = ("copy", "link")


class DownloadError(RuntimeError):
    """kagglehub could not fetch the dataset (no network, no credentials, unknown handle ...)."""


def _kagglehub_download(handle: str, force: bool) -> Path:
    try:
        import kagglehub
    except ImportError as err:  # pragma: no cover - kagglehub is a dependency
        raise DownloadError("kagglehub is not installed: pip install kagglehub") from err
    try:
        return Path(kagglehub.dataset_download(handle, force_download=force))
    except Exception as err:  # kagglehub raises requests, HTTP and credential errors alike
        raise DownloadError(
            f"kagglehub could not download {handle!r} ({type(err).__name__}: {err}).\n"
            "Check that this machine reaches kaggle.com and that Kaggle credentials are set "
            "(~/.kaggle/kaggle.json, or KAGGLE_USERNAME and KAGGLE_KEY, or kagglehub.login()). "
            f"Alternatively download the archive from https://www.kaggle.com/datasets/{handle} "
            "and use it as is: data=kaggle data.root=/path/to/archive.zip"
        ) from err


def validate_catalog(path: str | Path) -> CatalogSource:
    """The path as a catalog source, or a :class:`CatalogNotFoundError` saying what is wrong."""
    try:
        source = CatalogSource(path)
    except CatalogNotFoundError as err:
        raise CatalogNotFoundError(f"the download at {path} is not a Kaggle-layout catalog: {err}") from err
    if not source.image_ids:
        raise CatalogNotFoundError(f"the download at {path} has {source.styles_path} but no images/<id>.jpg files")
    return source


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def move_aside(target: Path) -> Path:
    """Rename ``target`` to ``<target>.old-<timestamp>`` (never delete what the user owns)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = target.with_name(f"{target.name}.old-{stamp}")
    n = 1
    while aside.exists() or aside.is_symlink():
        aside = target.with_name(f"{target.name}.old-{stamp}-{n}")
        n += 1
    os.rename(target, aside)
    log.warning(
        "moved the existing %s aside to %s (force=true); delete it yourself when no longer needed", target, aside
    )
    return aside


def _place(src: Path, target: Path, mode: str) -> Path:
    """Copy or symlink ``src`` to ``target``; only an absent target or an empty folder is replaced.

    The copy is built in a temporary folder beside the target (same filesystem) and renamed in,
    so an interrupted copy never leaves a partial catalog under the target's name, and a target
    that gained files meanwhile is never overwritten (the rename fails instead).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if (target.exists() or target.is_symlink()) and not _is_empty_dir(target):
        raise FileExistsError(f"{target} exists and is not an empty folder; not replacing it")
    if mode == "link":
        if _is_empty_dir(target):
            target.rmdir()
        target.symlink_to(src.resolve(), target_is_directory=src.is_dir())
        return target
    with atomic_dir(target, prefix=f".{target.name}.tmp-") as tmp:  # renames onto an absent/empty target only
        if src.is_dir():
            shutil.copytree(src, tmp, dirs_exist_ok=True, symlinks=True)
        else:
            shutil.copy2(src, tmp / src.name)
    return target


def download_dataset(
    handle: str = DEFAULT_HANDLE, target_dir: str | Path | None = None, force: bool = False, mode: str = "copy"
) -> Path:
    """Download ``handle`` with kagglehub; optionally copy/link it to ``target_dir``; return the ``data.root``.

    An existing valid catalog in ``target_dir`` is kept (no download) unless ``force``. Nothing the
    user has is deleted: without ``force`` a non-empty target (or a file) is refused; with ``force``
    it is moved aside to ``<target>.old-<timestamp>`` once the new download has been validated.
    Raises :class:`DownloadError` when kagglehub fails, :class:`CatalogNotFoundError` when
    the files are not a Kaggle-layout catalog.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    target = Path(target_dir).expanduser().absolute() if target_dir else None
    occupied = target is not None and (target.exists() or target.is_symlink()) and not _is_empty_dir(target)
    if target is not None and occupied and not force:  # (target is not None: spelled out for mypy)
        try:
            source = validate_catalog(target)
        except CatalogNotFoundError:
            kind = "a file" if target.is_file() else "not empty"
            raise FileExistsError(
                f"{target} exists ({kind}) and holds no catalog; choose another target_dir, or force=true "
                "to move it aside"
            ) from None
        log.info("%s already holds the catalog (%d images); force=true downloads again", target, len(source.image_ids))
        return target
    log.info("downloading %s with kagglehub ...", handle)
    path = _kagglehub_download(handle, force)
    validate_catalog(path)
    if target is not None:
        if occupied:
            move_aside(target)
        log.info("%s %s -> %s", "linking" if mode == "link" else "copying", path, target)
        path = _place(path, target, mode)
    source = validate_catalog(path)
    log.info("catalog ready: %s (%d images, styles at %s)", path, len(source.image_ids), source.styles_path)
    return path


def next_commands(root: str | Path) -> list[str]:
    """What to run with the downloaded catalog."""
    return [f"fashion-eda data=kaggle data.root={root}", f"fashion-train data=kaggle data.root={root}"]
