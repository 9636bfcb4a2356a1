"""Shared fixtures: a tiny synthetic catalog + cache (unit tests) and the shared dev zip (integration).

Session-scoped so the synthetic catalog is generated, and the real image cache decoded,
once per test session. The real cache lives under pytest's tmp dir unless
``FASHION_LIGHTNING_TEST_CACHE`` (or the apps' ``FASHION_LIGHTNING_CACHE``) names a folder to reuse
across sessions (it is keyed by the zip's path, size and mtime, like every image cache, so a
stale one is never reused).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fashion_lightning.data.schema import STYLES_HEADER

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
SHARED_ZIP = SHARED_DIR / "data" / "fashion-product-images-small-dev.zip"
SYNTHETIC_ITEMS = 200  # enough for every article type plus the quirk rows, generated in < 1 s


# -- synthetic (unit tests) ------------------------------------------------------------------
@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir shared by the session's unit tests (synthetic catalog + its image cache)."""
    return tmp_path_factory.mktemp("flcache")


@pytest.fixture(scope="session")
def synthetic_root(cache_dir: Path) -> Path:
    """The embedded synthetic catalog (Kaggle layout, with its deliberate quirks), small."""
    from fashion_lightning.data.synthetic import ensure_synthetic_catalog

    return ensure_synthetic_catalog(cache_dir, SYNTHETIC_ITEMS, seed=0)


@pytest.fixture(scope="session")
def synthetic_report(synthetic_root: Path):
    from fashion_lightning.data.synthetic import SyntheticReport

    return SyntheticReport.load(synthetic_root)


@pytest.fixture(scope="session")
def synthetic_dm_kwargs(cache_dir: Path, synthetic_root: Path) -> dict:
    """FashionDataModule kwargs for the synthetic catalog: in-process loaders, no augmentation."""
    return {
        "root": None,
        "num_items": SYNTHETIC_ITEMS,
        "cache_dir": str(cache_dir),
        "min_count": 5,
        "batch_size": 16,
        "eval_batch_size": 32,
        "num_workers": 0,
        "decode_workers": 1,
    }


def jpeg_bytes(size_wh: tuple[int, int] = (60, 80), colour: tuple[int, ...] | int = (200, 30, 40), mode: str = "RGB",
               seed: int = 0, fmt: str = "JPEG") -> bytes:  # fmt: skip
    """A small image with some structure (noise on a flat colour), encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size_wh
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    base = np.broadcast_to(np.asarray(colour, dtype=np.int16).reshape(-1)[:channels], (h, w, channels))
    arr = np.clip(base + rng.integers(-20, 21, size=(h, w, channels)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_catalog(root: Path, styles_text: str, images: Mapping[int, bytes]) -> Path:
    """Write a Kaggle-layout folder: ``styles.csv`` (exact text) + ``images/<id>.jpg``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "styles.csv").write_bytes(styles_text.encode("utf-8"))
    for item_id, data in images.items():
        (root / "images" / f"{item_id}.jpg").write_bytes(data)
    return root


def zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    """Zip ``folder``'s files (stored, like the shared zip), optionally under a top-level ``prefix/``."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"{prefix}{path.relative_to(folder).as_posix()}")
    return zip_path


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """Helpers for writing small Kaggle-layout catalogs: ``kit.header``, ``kit.jpeg(...)``,
    ``kit.write(root, styles_text, images)``, ``kit.zip(folder, zip_path, prefix="")``."""
    return SimpleNamespace(header=STYLES_HEADER, jpeg=jpeg_bytes, write=write_catalog, zip=zip_folder)


# -- shared dev zip (integration tests) -------------------------------------------------------
@pytest.fixture(scope="session")
def shared_zip() -> Path:
    if not SHARED_ZIP.is_file():
        pytest.skip(f"shared dev data not available: {SHARED_ZIP} is absent (integration tests need ../shared)")
    return SHARED_ZIP


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache dir for the real data's image cache (~0.5 GB).

    ``FASHION_LIGHTNING_TEST_CACHE``, else ``FASHION_LIGHTNING_CACHE`` (the apps' cache: the entry is
    the one ``fashion-train data=kaggle data.root=<zip>`` uses), else a fresh dir under pytest's tmp.
    """
    env = os.environ.get("FASHION_LIGHTNING_TEST_CACHE") or os.environ.get("FASHION_LIGHTNING_CACHE")
    if env:
        path = Path(env).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("flcache-real")


@pytest.fixture(scope="session")
def real_catalog(shared_zip: Path):
    """The shared dev zip read, repaired and cleaned (no image decoding yet)."""
    from fashion_lightning.data.catalog import load_catalog

    return load_catalog(shared_zip)


@pytest.fixture(scope="session")
def real_image_cache(real_catalog, real_cache_dir: Path):
    """The decoded image cache of the whole dev zip (~40 s on 2 cores the first time)."""
    from fashion_lightning.data.image_cache import build_image_cache

    return build_image_cache(real_catalog.source, real_cache_dir)


@pytest.fixture(autouse=True)
def _no_hydra_state_between_tests():
    """Hydra keeps the last app's HydraConfig in a process-wide singleton: a test that ran a multirun
    would otherwise make later tests' task_wrapper believe they are multirun jobs too."""
    yield
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
