"""The embedded synthetic catalog: Kaggle layout, deliberate quirks, determinism, learnable attributes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_lightning.data import synthetic
from fashion_lightning.data.schema import STYLES_HEADER
from fashion_lightning.data.synthetic import (
    GENERATOR_VERSION,
    SyntheticReport,
    ensure_synthetic_catalog,
    generate_synthetic_catalog,
)

N = 400


def _rows(root: Path) -> list[list[str]]:
    """Raw comma-split rows (no repair), so malformed lines stay visible."""
    return [line.split(",") for line in (root / "styles.csv").read_text().splitlines()[1:]]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticReport]:
    root = tmp_path_factory.mktemp("synthetic") / "cat"
    return root, generate_synthetic_catalog(root, num_items=N, seed=0)


@pytest.fixture(scope="module")
def clean_images(catalog: tuple[Path, SyntheticReport]) -> tuple[list[list[str]], np.ndarray]:
    """Well-formed rows whose image is a normal 60x80 RGB file, with the images as int16 [N,80,60,3]."""
    root, report = catalog
    skip = set(report.missing_image_ids + report.corrupt_image_ids + report.greyscale_ids + report.odd_size_ids)
    rows = [r for r in _rows(root) if len(r) == 10 and int(r[0]) not in skip]
    images = np.stack([np.asarray(Image.open(root / "images" / f"{r[0]}.jpg"), dtype=np.int16) for r in rows])
    return rows, images


def _nearest_centroid_accuracy(features: np.ndarray, labels: list[str]) -> tuple[float, float]:
    """Fit class centroids on even rows, score odd rows; returns (accuracy, majority-class accuracy)."""
    labels_arr = np.asarray(labels)
    train, test = np.arange(len(labels)) % 2 == 0, np.arange(len(labels)) % 2 == 1
    classes = sorted(set(labels_arr[train]))
    centroids = np.stack([features[train & (labels_arr == c)].mean(0) for c in classes])
    dist = ((features[test][:, None, :] - centroids[None]) ** 2).sum(-1)
    predicted = np.asarray(classes)[dist.argmin(1)]
    majority = max(np.mean(labels_arr[test] == c) for c in classes)
    return float(np.mean(predicted == labels_arr[test])), float(majority)


def test_layout_and_csv_format(catalog: tuple[Path, SyntheticReport]) -> None:
    root, report = catalog
    text = (root / "styles.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == STYLES_HEADER
    assert text.endswith("\n") and "\r" not in text and '"' not in text
    ids = [int(r[0]) for r in _rows(root)]
    assert len(ids) == N and len(set(ids)) == N
    assert len(list((root / "images").glob("*.jpg"))) == N - len(report.missing_image_ids)
    assert SyntheticReport.load(root) == report
    assert sum(report.class_counts.values()) == N


def test_labels_use_kaggle_vocabulary_and_are_imbalanced(catalog: tuple[Path, SyntheticReport]) -> None:
    root, report = catalog
    rows = [r for r in _rows(root) if len(r) == 10]
    assert {r[1] for r in rows} == {"Men", "Women", "Boys", "Girls", "Unisex"}
    assert {r[2] for r in rows} == {"Apparel", "Accessories", "Footwear", "Personal Care", "Home"}
    assert {r[6] for r in rows} - {""} == {"Summer", "Winter", "Fall", "Spring"}
    assert {r[8] for r in rows} - {""} == {"Casual", "Sports", "Formal", "Ethnic"}
    counts = report.class_counts
    assert len([a for a, n in counts.items() if n > 0]) >= 14
    assert counts["Belts"] == 3 and counts["Perfume and Body Mist"] == round(0.01 * N)
    assert counts["Tshirts"] > 15 * counts["Belts"]
    name = next(r[9] for r in rows if r[9])
    assert name.split()[1] in {"Men", "Women", "Boys", "Girls", "Unisex"}


def test_quirks_are_present(catalog: tuple[Path, SyntheticReport]) -> None:
    root, report = catalog
    by_id = {int(r[0]): r for r in _rows(root)}
    assert sorted(len(by_id[i]) for i in report.malformed_ids) == [11, 12]
    assert all(len(r) == 10 for i, r in by_id.items() if i not in report.malformed_ids)
    columns = STYLES_HEADER.split(",")
    for column, ids in report.blank_fields.items():
        assert ids and all(by_id[i][columns.index(column)] == "" for i in ids), column
    assert set(report.missing_name_ids) and set(report.missing_year_ids)
    assert [by_id[i][2] for i in report.excluded_category_ids] == ["Home"]
    assert not any((root / "images" / f"{i}.jpg").exists() for i in report.missing_image_ids)
    for i in report.corrupt_image_ids:
        with pytest.raises(OSError):  # UnidentifiedImageError is an OSError too
            Image.open(root / "images" / f"{i}.jpg").load()
    assert {Image.open(root / "images" / f"{i}.jpg").mode for i in report.greyscale_ids} == {"L"}
    assert {Image.open(root / "images" / f"{i}.jpg").size for i in report.odd_size_ids} == set(synthetic.ODD_SIZES_WH)


def test_deterministic(tmp_path: Path, catalog: tuple[Path, SyntheticReport]) -> None:
    root, report = catalog
    again = generate_synthetic_catalog(tmp_path / "again", num_items=N, seed=0)
    assert again == report and _digest(tmp_path / "again") == _digest(root)
    generate_synthetic_catalog(tmp_path / "other", num_items=synthetic.MIN_ITEMS, seed=1)
    other = (tmp_path / "other" / "styles.csv").read_text()
    assert other != (root / "styles.csv").read_text()


def test_colour_is_visible(clean_images: tuple[list[list[str]], np.ndarray]) -> None:
    rows, images = clean_images
    colours = {"Red", "Blue", "Green", "Yellow", "Orange", "Purple", "Pink", "Black", "Navy Blue", "Brown"}
    keep = [k for k, r in enumerate(rows) if r[5] in colours]
    px = images[keep].astype(np.float64)
    px[:, :12, :12] = 255  # drop the gender glyph
    fg = (px.max(-1) - px.min(-1) > 40) | (px.max(-1) < 110)  # saturated or dark: product, not background
    mean = (px * fg[..., None]).sum((1, 2)) / np.maximum(fg.sum((1, 2)), 1)[:, None]
    labels = [rows[k][5] for k in keep]
    red = mean[[lab == "Red" for lab in labels]].mean(0)
    blue = mean[[lab == "Blue" for lab in labels]].mean(0)
    assert red[0] > red[1] + 80 and red[0] > red[2] + 80
    assert blue[2] > blue[0] + 80 and blue[2] > blue[1] + 40
    accuracy, majority = _nearest_centroid_accuracy(mean, labels)
    assert accuracy > 0.8 > majority + 0.4


def test_article_type_is_visible(clean_images: tuple[list[list[str]], np.ndarray]) -> None:
    rows, images = clean_images
    keep = [k for k, r in enumerate(rows) if r[5] not in {"White", "Silver", "Beige", "Lavender", ""}]
    mask = images[keep].min(-1) < 150
    mask[:, :12, :12] = False
    silhouettes = mask.reshape(len(keep), 20, 4, 15, 4).mean((2, 4)).reshape(len(keep), -1)
    accuracy, majority = _nearest_centroid_accuracy(silhouettes, [rows[k][4] for k in keep])
    assert accuracy > 0.8 and accuracy > majority + 0.5


def test_gender_and_season_are_visible(clean_images: tuple[list[list[str]], np.ndarray]) -> None:
    rows, images = clean_images
    corner = images[:, :11, :11].astype(np.float64).mean(-1).reshape(len(rows), -1)
    accuracy, majority = _nearest_centroid_accuracy(corner, [r[1] for r in rows])
    assert accuracy > 0.95 > majority + 0.3
    seasonal = [k for k, r in enumerate(rows) if r[6]]
    patch = images[seasonal, :9, 42:].astype(np.float64).reshape(len(seasonal), -1)
    accuracy, majority = _nearest_centroid_accuracy(patch, [rows[k][6] for k in seasonal])
    assert accuracy > 0.9 > majority + 0.4


def test_too_few_items_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_items"):
        generate_synthetic_catalog(tmp_path, num_items=synthetic.MIN_ITEMS - 1)


def test_ensure_caches_by_size_and_seed(tmp_path: Path) -> None:
    n = synthetic.MIN_ITEMS
    first = ensure_synthetic_catalog(tmp_path, num_items=n, seed=3)
    assert first == tmp_path / "synthetic" / f"n{n}-s3-v{GENERATOR_VERSION}"
    mtime = (first / "styles.csv").stat().st_mtime_ns
    assert ensure_synthetic_catalog(tmp_path, num_items=n, seed=3) == first
    assert (first / "styles.csv").stat().st_mtime_ns == mtime
    assert ensure_synthetic_catalog(tmp_path, num_items=n, seed=4) != first
    assert ensure_synthetic_catalog(tmp_path, num_items=n + 1, seed=3) != first
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == sorted(
        [f"n{n}-s3-v{GENERATOR_VERSION}", f"n{n}-s4-v{GENERATOR_VERSION}", f"n{n + 1}-s3-v{GENERATOR_VERSION}"]
    )  # no temp folders left behind


def test_ensure_losing_a_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = synthetic.MIN_ITEMS
    target = tmp_path / "synthetic" / f"n{n}-s0-v{GENERATOR_VERSION}"
    real = synthetic.generate_synthetic_catalog

    def racing(root: Path, num_items: int, seed: int) -> SyntheticReport:
        real(target, num_items=num_items, seed=seed)  # another process finishes first
        (target / "winner").touch()
        return real(root, num_items=num_items, seed=seed)

    monkeypatch.setattr(synthetic, "generate_synthetic_catalog", racing)
    assert ensure_synthetic_catalog(tmp_path, num_items=n, seed=0) == target
    assert (target / "winner").exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]
