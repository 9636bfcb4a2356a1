"""The whole shared dev zip (35,616 rows): repair, cleaning, missing images, image cache, datamodule.

Skipped with a reason when ``../shared`` is absent. The image cache is built once per session
(~40 s on 2 cores; see ``real_image_cache`` in tests/conftest.py) and reused by every test here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fashion_lightning.data.catalog import DataReport, parse_styles
from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.image_cache import attach_images
from fashion_lightning.data.images import NATIVE_HW, to_native

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS_IN_ZIP = 35_616
IMAGES_IN_ZIP = 35_612
#: ids with no image file in the original Kaggle set; the ones that fall in the dev part (not 39403)
NO_IMAGE_IDS = {12347, 39401, 39403, 39410, 39425}
MISSING_YEAR_ID = 53781


def test_rows_and_repairs(real_catalog):
    report = real_catalog.report
    assert report.rows_read == ROWS_IN_ZIP
    assert report.repaired == {"name_with_1_extra_commas": 18, "name_with_2_extra_commas": 2}
    assert len(report.repaired_ids) == len(set(report.repaired_ids)) == 20
    names = real_catalog.frame.set_index("id")["productDisplayName"]
    repaired = [i for i in report.repaired_ids if i in names.index]
    assert len(repaired) == 20 and all("," in names[i] for i in repaired)
    # each repaired name is the raw row's text after the 9th comma, exactly
    raw = real_catalog.source.read_styles().decode("utf-8-sig").splitlines()
    raw_names = {int(line.split(",", 1)[0]): line.split(",", 9)[9].strip() for line in raw[1:] if line}
    assert all(names[i] == raw_names[i] for i in repaired)


def test_missing_images_and_rows_kept(real_catalog):
    report = real_catalog.report
    styles_ids = set(parse_styles(real_catalog.source.read_styles(), DataReport())["id"].astype(int))
    expected_missing = NO_IMAGE_IDS & styles_ids
    assert expected_missing == {12347, 39401, 39410, 39425}  # 39403 is in the held-out part
    assert set(report.dropped_ids["missing_image"]) == expected_missing
    assert report.dropped["missing_image"] == 4
    assert report.dropped_ids["missing_or_bad_year"] == [MISSING_YEAR_ID]
    assert len(real_catalog.source.image_ids) == IMAGES_IN_ZIP
    # rows with no name (the literal "NA", as pandas reads it) are dropped
    no_name = report.dropped.get("missing_productDisplayName", 0)
    assert report.rows_kept == len(real_catalog.frame) == ROWS_IN_ZIP - 1 - 4 - no_name
    assert report.filled["season"] == 14  # 15 blank seasons, one of them on the row without a year


def test_na_literals_count_as_missing(real_catalog):
    report = real_catalog.report
    assert report.dropped.get("missing_productDisplayName") == 6
    # fills are counted after the nameless rows are dropped (4 of those also lack colour and usage)
    assert report.filled.get("baseColour") == 6 and report.filled.get("usage") == 256


def test_image_cache_holds_every_image_byte_exact(real_catalog, real_image_cache):
    cache = real_image_cache
    assert len(cache.ids) == IMAGES_IN_ZIP and cache.failures == {}
    images = cache.open_images()
    assert images.shape == (IMAGES_IN_ZIP, *NATIVE_HW, 3)
    rng = np.random.default_rng(0)
    for row in rng.choice(len(cache.ids), size=64, replace=False):
        data = real_catalog.source.image_bytes(int(cache.ids[row]))
        assert np.array_equal(images[row], to_native(data)), int(cache.ids[row])
    attached = attach_images(real_catalog, cache)
    assert len(attached.frame) == real_catalog.report.rows_kept
    assert "corrupt_image (cannot be decoded)" not in attached.report.dropped


def test_datamodule_on_the_dev_zip(shared_zip, real_image_cache, real_cache_dir, tmp_path):
    dm = FashionDataModule(root=str(shared_zip), cache_dir=str(real_cache_dir), output_dir=str(tmp_path),
                           num_workers=0, batch_size=32)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache.path == real_image_cache.path  # reused, not decoded again
    sizes = {k: len(dm.frames[k]) for k in ("train", "val", "test")}
    total = sum(sizes.values())
    assert total == len(dm.frames["all"]) == dm.catalog.report.rows_kept
    assert dm.catalog.report.dropped["excluded_masterCategory"] >= 1  # "Home"
    assert sizes["test"] / total == pytest.approx(0.3, abs=0.01)
    assert sizes["val"] / total == pytest.approx(0.14, abs=0.01)
    assert 60 <= len(dm.vocabs["articleType"]) <= 141 and "Other" in dm.vocabs["articleType"].classes
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (32, 3, *NATIVE_HW)
    assert (tmp_path / "data_report.json").is_file() and (tmp_path / "splits.csv").is_file()
