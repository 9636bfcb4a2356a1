"""The decoded-image cache: byte-exact pixels, 80x60 letterboxing, greyscale, corrupt files, keys, reuse."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_lightning.data import image_cache as image_cache_module
from fashion_lightning.data.catalog import load_catalog
from fashion_lightning.data.image_cache import ImageCache, attach_images, build_image_cache, cache_key
from fashion_lightning.data.images import NATIVE_HW, PAD_VALUE, ImageDecodeError, to_native
from fashion_lightning.data.source import CatalogSource

CORRUPT = 5006
MISSING = 5007


@pytest.fixture
def catalog_root(tmp_path: Path, kit) -> Path:
    images = {
        5001: kit.jpeg((60, 80), (200, 30, 40), seed=1),
        5002: kit.jpeg((53, 80), (30, 200, 40), seed=2),  # odd sizes that occur in the real data
        5003: kit.jpeg((60, 60), (30, 40, 200), seed=3),
        5004: kit.jpeg((60, 80), 128, mode="L", seed=4),  # greyscale
        5005: kit.jpeg((120, 160), (90, 90, 20), seed=5),  # larger than native, same aspect
        5008: kit.jpeg((60, 80), (10, 120, 120, 128), mode="RGBA", seed=8, fmt="PNG"),
    }
    images[CORRUPT] = kit.jpeg(seed=6)[:200]  # cut inside the headers
    rows = [f"{i},Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Item {i}" for i in [*images, MISSING]]
    root = kit.write(tmp_path / "cat", kit.header + "\n" + "\n".join(rows) + "\n", {})
    for item_id, data in images.items():  # 5008 is a PNG under a .jpg-less name: images/<id>.png
        (root / "images" / f"{item_id}.{'png' if item_id == 5008 else 'jpg'}").write_bytes(data)
    return root


def test_cached_pixels_equal_decoded_files_byte_exact(catalog_root: Path, tmp_path: Path):
    source = CatalogSource(catalog_root)
    cache = build_image_cache(source, tmp_path / "cache", num_workers=1)
    images = cache.open_images()
    assert images.shape == (len(source.image_ids), *NATIVE_HW, 3) and images.dtype == np.uint8
    assert cache.ids.tolist() == sorted(source.image_ids)
    assert MISSING not in cache.ids
    for row, item_id in enumerate(cache.ids.tolist()):
        data = source.image_bytes(item_id)
        assert cache.sha1[row] == hashlib.sha1(data).hexdigest()
        if item_id == CORRUPT:
            continue
        expected = to_native(data)
        assert np.array_equal(images[row], expected), item_id
        # to_native of the file path and of the opened PIL image agree with the bytes path
        assert np.array_equal(to_native(catalog_root / source.image_paths[item_id]), expected)


def test_odd_sizes_are_letterboxed_on_white_and_greyscale_becomes_rgb(catalog_root: Path, tmp_path: Path):
    cache = build_image_cache(CatalogSource(catalog_root), tmp_path / "cache", num_workers=1)
    images = cache.open_images()
    img = {int(i): np.asarray(images[r]) for r, i in enumerate(cache.ids)}
    square = img[5003]  # 60x60 (w x h) -> 60 wide, 60 high, 10-row white bars above and below
    assert (square[:10] == PAD_VALUE).all() and (square[-10:] == PAD_VALUE).all()
    assert not (square[10:70] == PAD_VALUE).all()
    narrow = img[5002]  # 53x80 -> pasted 53 wide, centred: 3 px bar left, 4 px right
    assert (narrow[:, :3] == PAD_VALUE).all() and (narrow[:, -4:] == PAD_VALUE).all()
    grey = img[5004]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    big = img[5005]  # downscaled, no bars
    assert not (big[:, :2] == PAD_VALUE).all()
    rgba = img[5008]  # PNG with ~50% alpha: composited on white (not black), 3 channels
    assert rgba.shape == (*NATIVE_HW, 3)
    assert abs(float(rgba[..., 0].mean()) - (10 + 255) / 2) < 8


def test_to_native_handles_pil_input_and_rejects_garbage():
    pil = Image.new("L", (30, 40), 77)
    out = to_native(pil)
    assert out.shape == (*NATIVE_HW, 3) and out.dtype == np.uint8 and (out == 77).all()  # same aspect: no bars
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        to_native(b"definitely not an image")
    buf = io.BytesIO()
    Image.new("RGB", (60, 80), (1, 2, 3)).save(buf, format="PNG")
    assert (to_native(buf.getvalue()) == np.array([1, 2, 3], dtype=np.uint8)).all()


def test_corrupt_file_is_reported_and_dropped_with_its_reason(catalog_root: Path, tmp_path: Path):
    catalog = load_catalog(catalog_root)
    assert catalog.report.dropped == {"missing_image": 1}
    cache = build_image_cache(catalog.source, tmp_path / "cache", num_workers=1)
    assert set(cache.failures) == {CORRUPT}
    assert "not a decodable image" in cache.failures[CORRUPT]
    attached = attach_images(catalog, cache)
    assert CORRUPT not in set(attached.frame["id"])
    reason = "corrupt_image (cannot be decoded)"
    assert attached.report.dropped[reason] == 1 and attached.report.dropped_ids[reason] == [CORRUPT]
    assert attached.report.rows_kept == len(attached.frame) == 6
    # every kept row points at its own cache row
    images = cache.open_images()
    for item_id, row, sha in attached.frame[["id", "cache_row", "image_sha1"]].itertuples(index=False):
        assert cache.ids[row] == item_id and cache.sha1[row] == sha
        assert np.array_equal(images[row], to_native(catalog.source.image_bytes(item_id)))


def test_cache_key_depends_on_source_and_geometry(catalog_root: Path, tmp_path: Path, kit):
    other = kit.write(tmp_path / "other", (catalog_root / "styles.csv").read_text(), {5001: kit.jpeg(seed=9)})
    a, b = CatalogSource(catalog_root), CatalogSource(other)
    assert cache_key(a, NATIVE_HW) != cache_key(b, NATIVE_HW)
    assert cache_key(a, NATIVE_HW) != cache_key(a, (160, 120))
    assert cache_key(a, NATIVE_HW) == cache_key(CatalogSource(catalog_root), NATIVE_HW)
    cache_a = build_image_cache(a, tmp_path / "cache", num_workers=1)
    cache_b = build_image_cache(b, tmp_path / "cache", num_workers=1)
    assert cache_a.path != cache_b.path and len(cache_b.ids) == 1


def test_second_build_reuses_the_folder_without_decoding(catalog_root: Path, tmp_path: Path, monkeypatch):
    source = CatalogSource(catalog_root)
    first = build_image_cache(source, tmp_path / "cache", num_workers=1)
    stamp = first.images_path.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("the cache was decoded again")

    monkeypatch.setattr(image_cache_module, "_decode_chunk", boom)
    second = build_image_cache(CatalogSource(catalog_root), tmp_path / "cache", num_workers=1)
    assert second.path == first.path and second.images_path.stat().st_mtime_ns == stamp
    assert second.failures == first.failures and (second.ids == first.ids).all()
    assert ImageCache.load(first.path).size_hw == NATIVE_HW
    # no half-written ".building-*" folders are left behind
    assert [p.name for p in (tmp_path / "cache" / "images").iterdir()] == [first.path.name]


def test_parallel_build_equals_serial_build(catalog_root: Path, tmp_path: Path, monkeypatch):
    serial = build_image_cache(CatalogSource(catalog_root), tmp_path / "serial", num_workers=1)
    monkeypatch.setattr(image_cache_module, "_CHUNK", 2)  # several chunks over 2 processes
    parallel = build_image_cache(CatalogSource(catalog_root), tmp_path / "parallel", num_workers=2)
    assert np.array_equal(np.asarray(serial.open_images()), np.asarray(parallel.open_images()))
    assert (serial.sha1 == parallel.sha1).all() and serial.failures == parallel.failures


def test_zip_and_folder_decode_to_the_same_pixels(catalog_root: Path, tmp_path: Path, kit):
    zipped = CatalogSource(kit.zip(catalog_root, tmp_path / "cat.zip"))
    a = build_image_cache(CatalogSource(catalog_root), tmp_path / "cache", num_workers=1)
    b = build_image_cache(zipped, tmp_path / "cache", num_workers=1)
    assert a.path != b.path  # different inputs never share a cache entry
    assert np.array_equal(np.asarray(a.open_images()), np.asarray(b.open_images()))
