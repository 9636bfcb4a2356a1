"""fashion-index + fashion-recommend end to end: checkpoint -> index folder -> each query kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashion_lightning.apps.recommend import recommend
from fashion_lightning.retrieval import IndexIntegrityError, QueryError
from hydra_helpers import make_cfg, train_and_index

pytestmark = pytest.mark.slow
ITEMS = 240


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return train_and_index(tmp_path_factory.mktemp("apps"), ITEMS, epochs=3)


def _items(index_dir: Path):
    import pandas as pd

    return pd.read_csv(index_dir / "items.csv")


def _recommend(index_dir: Path, run: Path, cache: Path, overrides: list[str]):
    cfg = make_cfg("recommend", run, cache, [f"index_dir={index_dir}", "k=5", *overrides])
    return recommend(cfg)


def test_index_covers_the_whole_catalog_with_a_manifest(index_dir):
    manifest = json.loads((index_dir / "manifest.json").read_text())
    items = _items(index_dir)
    assert manifest["count"] == len(items) > 0.9 * ITEMS  # split=all: every clean item, not just test
    assert manifest["model"]["embedding_name"] == "multitask" and manifest["model"]["model"] == "model"
    assert sorted(manifest["model"]["model_files"]) == ["model.json", "model.safetensors"]
    assert {"id", "articleType", "image_sha1"} <= set(items.columns) and "cache_row" not in items.columns


def test_index_folder_is_self_contained(index_dir, tmp_path):
    """The model travels inside the folder as safetensors + JSON: a copy answers photo queries on its own."""
    import shutil

    from fashion_lightning.retrieval import Recommender

    moved = Path(shutil.copytree(index_dir, tmp_path / "moved"))
    recommender = Recommender.from_dir(moved)
    assert recommender.index.model_path() == moved / "model"
    catalog = Path(json.loads((index_dir / "manifest.json").read_text())["model"]["catalog"])
    photo = catalog / "images" / f"{_items(index_dir)['id'].iloc[0]}.jpg"
    result = recommender.by_images(photo, k=3)
    assert len(result.results) == 3 and result.query.get("predicted")


def test_item_query_writes_json_and_gallery(index_dir, tmp_path):
    item = int(_items(index_dir)["id"].iloc[0])
    result = _recommend(
        index_dir, tmp_path, tmp_path / "c", [f"query.item_id={item}", "filters.masterCategory=Apparel"]
    )
    assert len(result.results) == 5 and item not in result.ids
    assert all(r.metadata["masterCategory"] == "Apparel" for r in result.results)
    saved = json.loads((tmp_path / "recommendations.json").read_text())
    assert [r["id"] for r in saved["results"]] == result.ids
    with Image.open(tmp_path / "gallery.png") as img:
        assert img.width > 300 and img.height > 100


def test_photo_and_history_queries(index_dir, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((300, 200, 4), (200, 20, 20, 255), np.uint8), "RGBA").save(photo)  # RGBA, odd size
    result = _recommend(index_dir, tmp_path / "photo", tmp_path / "c", [f"query.image={photo}"])
    assert len(result.results) == 5 and result.results[0].explanation is not None
    ids = _items(index_dir)["id"].tolist()
    result = _recommend(
        index_dir,
        tmp_path / "hist",
        tmp_path / "c",
        [f"query.history=[{ids[0]},{ids[1]}]", f"query.disliked=[{ids[2]}]"],
    )
    assert not {ids[0], ids[1], ids[2]} & set(result.ids)


def test_bad_queries_and_damaged_index_are_refused(index_dir, tmp_path):
    with pytest.raises(QueryError):
        _recommend(index_dir, tmp_path / "a", tmp_path / "c", ["query.item_id=-5"])
    with pytest.raises(QueryError, match="text"):
        _recommend(index_dir, tmp_path / "b", tmp_path / "c", ["query.text='red shirt'"])  # no text tower
    import shutil

    damaged = Path(shutil.copytree(index_dir, tmp_path / "damaged"))
    data = bytearray((damaged / "vectors.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "vectors.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="vectors.faiss"):
        _recommend(damaged, tmp_path / "d", tmp_path / "c", ["query.item_id=1"])
    env = {**os.environ, "FASHION_LIGHTNING_CACHE": str(tmp_path / "c")}
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "fashion_lightning.apps.recommend",
            f"index_dir={damaged}",
            "query.item_id=1",
            f"hydra.run.dir={tmp_path / 'cli'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert cli.returncode == 2 and "vectors.faiss" in cli.stderr
