"""Read-only access to a catalog in Kaggle layout: a folder, a nested folder, or the .zip.

All three look the same to the rest of the code: ``styles.csv`` bytes, the set of image
ids, and the bytes of one image. A zip is read in place (no extraction); each process
opens its own handle, so dataloader workers and multiprocessing pools can share a source.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path, PurePosixPath

from fashion_lightning.utils.bounded import DEFAULT_CSV_LIMITS, CsvLimits

STYLES_NAME = "styles.csv"
_IMAGE_RE = re.compile(r"^(\d+)\.(jpe?g|png)$", re.IGNORECASE)
_MAX_DEPTH = 4


class CatalogNotFoundError(FileNotFoundError):
    """The given root holds no Kaggle-layout catalog (styles.csv + images/)."""


class CatalogFormatError(CatalogNotFoundError, ValueError):
    """The catalog's styles.csv is there but is not a readable Kaggle styles file within the limits.

    A :class:`CatalogNotFoundError` so every app's one-line handler (exit 2) already catches it, and a
    ``ValueError`` for code that catches bad values.
    """


class CatalogSource:
    """One catalog location; see module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.exists():
            raise CatalogNotFoundError(f"catalog root does not exist: {self.root}")
        self.is_zip = self.root.is_file()
        if self.is_zip and not zipfile.is_zipfile(self.root):
            raise CatalogNotFoundError(f"{self.root} is a file but not a zip archive")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        self.styles_path, self.image_paths = self._locate()

    # -- discovery --------------------------------------------------------------------
    def _names(self) -> list[str]:
        if self.is_zip:
            return [n for n in self._zipfile().namelist() if not n.endswith("/")]
        names: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            depth = len(Path(dirpath).relative_to(self.root).parts)
            if depth >= _MAX_DEPTH:
                dirnames.clear()
            rel = Path(dirpath).relative_to(self.root)
            if rel.name == "images":
                dirnames.clear()  # images/ holds only files; do not descend further
            names.extend(str(PurePosixPath(*rel.parts, f)) for f in filenames)
        return names

    def _locate(self) -> tuple[str, dict[int, str]]:
        names = self._names()
        styles = sorted((n for n in names if n.rpartition("/")[2] == STYLES_NAME), key=lambda n: (n.count("/"), n))
        if not styles:
            raise CatalogNotFoundError(
                f"no {STYLES_NAME} found in {self.root} (looked {_MAX_DEPTH} folders deep); "
                "expected the Kaggle layout: styles.csv next to an images/ folder"
            )
        styles_path = styles[0]
        base = str(PurePosixPath(styles_path).parent)
        prefix = "images/" if base == "." else f"{base}/images/"
        images: dict[int, str] = {}
        for n in names:  # plain string tests: PurePosixPath per name cost ~1 s on the 44k-file zip
            if n.startswith(prefix) and "/" not in (name := n[len(prefix) :]) and (m := _IMAGE_RE.match(name)):
                images[int(m.group(1))] = n
        return styles_path, images

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.root)
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None  # zip handles do not survive pickling/forking
        return state

    # -- reading ----------------------------------------------------------------------
    def read(self, name: str) -> bytes:
        if self.is_zip:
            return self._zipfile().read(name)
        return (self.root / name).read_bytes()

    def read_styles(self, limits: CsvLimits = DEFAULT_CSV_LIMITS) -> bytes:
        """styles.csv's bytes, its size checked against ``limits.max_bytes`` before reading (for a zip,
        the size the archive declares, which is also the most ``ZipFile.read`` will inflate)."""
        if self.is_zip:
            size = self._zipfile().getinfo(self.styles_path).file_size
        else:
            size = (self.root / self.styles_path).stat().st_size
        if size > limits.max_bytes:
            raise CatalogFormatError(f"{self.styles_where} is {size} bytes (limit max_bytes = {limits.max_bytes})")
        return self.read(self.styles_path)

    @property
    def styles_where(self) -> str:
        """styles.csv's location for messages: ``<folder>/styles.csv`` or ``<zip>:<member>``."""
        return f"{self.root}:{self.styles_path}" if self.is_zip else str(self.root / self.styles_path)

    def image_bytes(self, item_id: int) -> bytes | None:
        name = self.image_paths.get(int(item_id))
        return None if name is None else self.read(name)

    @property
    def image_ids(self) -> set[int]:
        return set(self.image_paths)

    def fingerprint(self) -> str:
        """Identity of the source's content for cache keys: path, and size + mtime of the zip, or of
        styles.csv and every image file of a folder (a replaced image gives a new key)."""
        h = hashlib.sha1(str(self.root).encode())
        if self.is_zip:
            st = self.root.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            st = (self.root / self.styles_path).stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        for item_id in sorted(self.image_paths):
            name = self.image_paths[item_id]
            h.update(f"{item_id}:{name};".encode())
            if not self.is_zip:
                st = (self.root / name).stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        kind = "zip" if self.is_zip else "folder"
        return f"CatalogSource({kind}={self.root}, styles={self.styles_path}, images={len(self.image_paths)})"
