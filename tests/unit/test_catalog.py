"""styles.csv parsing, repair and cleaning with the real data's quirks; folder / nested / zip sources."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pandas as pd
import pytest

from fashion_lightning.data.catalog import DataReport, clean_styles, load_catalog, parse_styles
from fashion_lightning.data.schema import COLUMNS, STYLES_HEADER, UNKNOWN
from fashion_lightning.data.source import CatalogNotFoundError, CatalogSource

# Raw text exactly as the Kaggle file has it: unquoted commas in names (11 and 12 fields),
# blank fields, a Home row; plus a properly quoted comma (not a repair), a duplicate id,
# a short row and a non-numeric year.
ROWS = [
    "1001,Men,Apparel,Topwear,Tshirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",
    "1002,Women,Footwear,Shoes,Heels,Black,Summer,2012,Casual,Catwalk Women Black Heels",
    "1003,Men,Accessories,Watches,Watches,Silver,Winter,2016,Casual,Titan Men Silver Watch, Pack of 2",
    "1004,Women,Accessories,Jewellery,Earrings,Gold,Summer,2012,Ethnic,Estelle Women Gold Earrings, Set, Of 3",
    "1005,Men,Apparel,Topwear,Shirts,White,Summer,2012,Formal,",
    "1006,Men,Apparel,Bottomwear,Jeans,Blue,Fall,,Casual,Wrangler Men Blue Jeans",
    "1007,Unisex,Accessories,Bags,Backpacks,,Fall,2011,Casual,Wildcraft Unisex Backpack",
    "1008,Men,Apparel,Topwear,Tshirts,Red,,2012,Sports,Puma Men Red Tshirt",
    "1009,Women,Apparel,Topwear,Kurtas,Pink,Summer,2012,,Fabindia Women Pink Kurta",
    "1010,Unisex,Home,Home Furnishing,Cushion Covers,Blue,Summer,2012,Casual,Home Centre Blue Cushion Cover",
    '1011,Men,Apparel,Topwear,Shirts,Blue,Fall,2011,Casual,"Quoted Men Blue Shirt, Slim"',
    "1012,Men,Apparel,Topwear,Shirts,Grey,Fall,2011,Casual,Second Row With Id 1012",
    "1012,Men,Apparel,Topwear,Shirts,Grey,Fall,2011,Casual,Duplicate Of 1012",
    "1013,Men,Apparel,Topwear",
    "1014,Men,Apparel,Topwear,Shirts,Grey,Fall,20x1,Casual,Bad Year Shirt",
    "1015,Girls,Apparel,Topwear,Tops,Yellow,Summer,2012,Casual,Gini and Jony Girls Yellow Top",
]
STYLES = "\ufeff" + STYLES_HEADER + "\n" + "\n".join(ROWS) + "\n\n"  # BOM and a trailing blank line, like exports
IDS = [1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1014, 1015]


def _parsed() -> tuple[pd.DataFrame, DataReport]:
    report = DataReport()
    return parse_styles(STYLES.encode("utf-8"), report), report


def test_parse_repairs_unquoted_commas_into_the_name():
    frame, report = _parsed()
    names = dict(zip(frame["id"], frame["productDisplayName"]))
    assert names["1003"] == "Titan Men Silver Watch, Pack of 2"  # exactly the joined raw text
    assert names["1004"] == "Estelle Women Gold Earrings, Set, Of 3"
    assert names["1011"] == "Quoted Men Blue Shirt, Slim"  # quoted: parsed normally, not a repair
    assert report.repaired == {"name_with_1_extra_commas": 1, "name_with_2_extra_commas": 1}
    assert report.repaired_ids == [1003, 1004]
    assert list(frame.columns) == list(COLUMNS)
    assert not any(c.startswith("Unnamed") for c in frame.columns)
    # the short row is the only one that cannot be parsed; blank lines are not rows
    assert report.rows_read == len(ROWS)
    assert report.dropped == {"malformed_row (wrong number of fields)": 1}
    assert report.dropped_ids["malformed_row (wrong number of fields)"] == [1013]
    assert len(frame) == len(ROWS) - 1
    # other fields of repaired rows are untouched
    row = frame.set_index("id").loc["1004"]
    assert (row["baseColour"], row["season"], row["year"], row["usage"]) == ("Gold", "Summer", "2012", "Ethnic")


def test_parse_rejects_a_file_without_the_kaggle_columns():
    with pytest.raises(ValueError, match="lacks column"):
        parse_styles(b"id,name\n1,x\n", DataReport())


def test_clean_counts_every_drop_and_fill_by_reason():
    frame, report = _parsed()
    clean = clean_styles(frame, report)
    assert report.dropped == {
        "malformed_row (wrong number of fields)": 1,
        "duplicate_id": 1,
        "missing_productDisplayName": 1,
        "missing_or_bad_year": 2,
    }
    assert report.dropped_ids["missing_productDisplayName"] == [1005]
    assert sorted(report.dropped_ids["missing_or_bad_year"]) == [1006, 1014]
    assert report.dropped_ids["duplicate_id"] == [1012]
    assert report.filled == {"usage": 1, "baseColour": 1, "season": 1}
    by_id = clean.set_index("id")
    assert by_id.loc[1007, "baseColour"] == UNKNOWN
    assert by_id.loc[1008, "season"] == UNKNOWN
    assert by_id.loc[1009, "usage"] == UNKNOWN
    assert by_id.loc[1012, "productDisplayName"] == "Second Row With Id 1012"  # first occurrence kept
    assert by_id.loc[1003, "productDisplayName"] == "Titan Men Silver Watch, Pack of 2"
    assert 1010 in by_id.index  # Home kept unless excluded
    assert clean["id"].dtype == "int64" and clean["year"].dtype == "int64"
    assert not clean[list(COLUMNS)].isna().any().any()


def test_clean_excludes_configured_master_categories():
    frame, report = _parsed()
    clean = clean_styles(frame, report, exclude_master_categories=["Home", "Free Items"])
    assert 1010 not in set(clean["id"])
    assert report.dropped["excluded_masterCategory"] == 1
    assert report.dropped_ids["excluded_masterCategory"] == [1010]


def test_literal_na_is_missing_like_the_study():
    """pandas (the study's reader) makes the literal NA missing: dev zip has it in name, colour and usage."""
    text = (
        STYLES_HEADER
        + "\n"
        + "\n".join(
            [
                "2001,Men,Apparel,Topwear,Shirts,Blue,Summer,2012,Casual,NA",
                "2002,Men,Apparel,Topwear,Shirts,NA,Summer,2012,Casual,Puma Men Shirt",
                "2003,Women,Apparel,Topwear,Tops,Red,Fall,2011,NA,Puma Women Top",
            ]
        )
    )
    report = DataReport()
    clean = clean_styles(parse_styles(text.encode(), report), report).set_index("id")
    assert 2001 not in clean.index
    assert report.dropped.get("missing_productDisplayName") == 1
    assert clean.loc[2002, "baseColour"] == UNKNOWN and clean.loc[2003, "usage"] == UNKNOWN


@pytest.fixture
def images(kit) -> dict[int, bytes]:
    return {i: kit.jpeg(seed=i) for i in IDS if i != 1015}  # 1015 has no image file


def test_load_catalog_drops_rows_without_image_and_writes_report(tmp_path: Path, kit, images):
    catalog = load_catalog(kit.write(tmp_path / "cat", STYLES, images))
    assert catalog.report.dropped["missing_image"] == 1
    assert catalog.report.dropped_ids["missing_image"] == [1015]
    assert catalog.report.rows_read == len(ROWS)
    # malformed 1, duplicate 1, no name 1, bad/no year 2, no image 1
    assert catalog.report.rows_kept == len(catalog.frame) == len(ROWS) - 6
    saved = json.loads(catalog.report.save(tmp_path / "run" / "data_report.json").read_text())
    assert saved["repaired"] == {"name_with_1_extra_commas": 1, "name_with_2_extra_commas": 1}
    assert saved["dropped"]["missing_image"] == 1
    summary = catalog.report.summary()
    assert "repaired 2" in summary and "missing_image=1" in summary


def test_folder_nested_folder_and_zip_give_the_same_catalog(tmp_path: Path, kit, images):
    flat = kit.write(tmp_path / "flat", STYLES, images)
    nested = kit.write(tmp_path / "nested" / "fashion-product-images-small" / "myntradataset", STYLES, images)
    flat_zip = kit.zip(flat, tmp_path / "flat.zip")
    nested_zip = kit.zip(flat, tmp_path / "nested.zip", prefix="fashion-product-images-small/")
    reference = load_catalog(flat)
    for root in (tmp_path / "nested", flat_zip, nested_zip, str(flat_zip)):
        other = load_catalog(root)
        pd.testing.assert_frame_equal(other.frame, reference.frame)
        assert other.report.dropped == reference.report.dropped
        assert other.source.image_ids == reference.source.image_ids
        assert other.source.image_bytes(1001) == images[1001]
        assert other.source.image_bytes(99999) is None
    assert CatalogSource(flat_zip).is_zip and not CatalogSource(nested).is_zip


def test_source_prefers_the_shallowest_styles_csv(tmp_path: Path, kit, images):
    """The Kaggle archive holds styles.csv twice (top level and myntradataset/): the top one wins."""
    root = kit.write(tmp_path / "dl", STYLES, images)
    kit.write(root / "myntradataset", STYLES_HEADER + "\n", {})
    source = CatalogSource(root)
    assert source.styles_path == "styles.csv"
    assert source.image_ids == set(images)


def test_source_errors_are_clear(tmp_path: Path):
    with pytest.raises(CatalogNotFoundError, match="does not exist"):
        CatalogSource(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogNotFoundError, match="no styles.csv"):
        CatalogSource(tmp_path / "empty")
    (tmp_path / "file.zip").write_text("not a zip")
    with pytest.raises(CatalogNotFoundError, match="not a zip"):
        CatalogSource(tmp_path / "file.zip")


def test_zip_source_survives_pickling(tmp_path: Path, kit, images):
    source = CatalogSource(kit.zip(kit.write(tmp_path / "c", STYLES, images), tmp_path / "c.zip"))
    assert source.image_bytes(1002)  # opens a handle
    clone = pickle.loads(pickle.dumps(source))
    assert clone.image_bytes(1002) == source.image_bytes(1002)
    assert clone.fingerprint() == source.fingerprint()


# -- ids as values, encoding repairs counted (issue 8, item 5) ---------------------------------
def test_bad_ids_are_reported_by_value_not_row_number():
    from fashion_lightning.data.catalog import DataReport, clean_styles, parse_styles

    text = "\n".join([
        STYLES_HEADER,
        "2001,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Fine shirt",
        "abc,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Bad id",
        "x9,Men,Apparel,Topwear",  # malformed and a bad id
    ]) + "\n"  # fmt: skip
    report = DataReport()
    frame = clean_styles(parse_styles(text.encode(), report), report)
    assert frame["id"].tolist() == [2001]
    assert report.dropped_ids["bad_id (not an integer)"] == ["abc"]
    assert report.dropped_ids["malformed_row (wrong number of fields)"] == ["x9"]


def test_non_utf8_names_are_decoded_and_counted():
    from fashion_lightning.data.catalog import DataReport, clean_styles, parse_styles

    header = STYLES_HEADER.encode() + b"\n"
    raw = (
        header
        + "3001,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Caf\u00e9 shirt\n".encode()
        + b"3002,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Cr\xe8me tee\n"
    )  # cp1252 byte
    report = DataReport()
    frame = clean_styles(parse_styles(raw, report), report)
    assert frame.set_index("id")["productDisplayName"].to_dict() == {3001: "Caf\u00e9 shirt", 3002: "Cr\u00e8me tee"}
    assert report.repaired == {"name_encoding_repaired": 1} and report.repaired_ids == [3002]
    assert "\ufffd" not in "".join(frame["productDisplayName"])
