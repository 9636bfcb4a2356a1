"""The console scripts as users run them: fashion-recommend's one-line errors (rc 2), light imports for
light queries, and fashion-serve refusing to start on a bad index or checkpoint."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_recommender import FakeEncoder, catalog, embed_catalog, png_bytes  # noqa: F401 (fixture)

from fashion_lightning.retrieval import build_index
from fashion_lightning.retrieval.manifest import model_record

pytestmark = pytest.mark.slow  # subprocesses: ~5 s each


@pytest.fixture(scope="module")
def index_dir(catalog, tmp_path_factory) -> Path:  # noqa: F811 (imported fixture)
    """A synthetic index whose manifest names a damaged checkpoint and an existing catalog folder."""
    frame, images = catalog
    root = tmp_path_factory.mktemp("cli")
    damaged = root / "index" / "damaged.ckpt"  # inside the folder (a model outside it is refused earlier)
    damaged.parent.mkdir()
    damaged.write_bytes(b"PK\x03\x04" + os.urandom(256))
    catalog_dir = root / "catalog"
    (catalog_dir / "images").mkdir(parents=True)
    frame.drop(columns=["image_sha1"]).to_csv(catalog_dir / "styles.csv", index=False)
    for item_id, image in zip(frame["id"], images):
        (catalog_dir / "images" / f"{item_id}.png").write_bytes(png_bytes(image))
    model_info = {"embedding_name": "fake", **model_record(damaged, root / "index"), "catalog": str(catalog_dir)}
    build_index(embed_catalog(FakeEncoder(), images), frame, root / "index", model_info)
    return root / "index"


def _cli(module: str, *overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASHION_LIGHTNING_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", module, *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A valid PNG header claiming 400 M pixels (over PIL's limit) with one tiny row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("overrides, message", [
    (["query.item_id=1000", "k=abc"], "k must be a whole number >= 1, got 'abc'"),
    (["query.item_id=1000", "k=2.5"], "k must be a whole number >= 1, got 2.5"),
    (["query.item_id=1000", "filters.gender=2015"], "filters.gender=2015: filter values are names"),
    (["query.item_id=1000", "+filters.year=2015"], "unknown filter 'year'"),
    (["query.item_id=7"], "unknown item id(s) [7]"),
    (["query.image=PHOTO"], "cannot load the index's model"),
    (["query.image=BOMB"], "exceeds limit"),
    (["query.image=TEXT"], "not a decodable image"),
])  # fmt: skip
def test_recommend_turns_bad_input_into_one_line_rc_2(index_dir, tmp_path, overrides, message):
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(np.full((80, 60, 3), 90, np.uint8)))
    paths = {"PHOTO": photo, "BOMB": _bomb_png(tmp_path / "bomb.png"), "TEXT": tmp_path / "notes.png"}
    paths["TEXT"].write_text("not a photo")
    overrides = [
        o.split("=")[0] + "=" + str(paths[o.split("=")[1]]) if o.split("=")[1] in paths else o for o in overrides
    ]
    done = _cli(
        "fashion_lightning.apps.recommend", f"index_dir={index_dir}", "gallery=false", *overrides, tmp_path=tmp_path
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "fashion-recommend:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr


def test_id_and_history_queries_stay_light(index_dir, tmp_path):
    """An id or history query imports neither torch nor Lightning nor matplotlib (start-up is most of a CLI
    query's time), checked in a fresh interpreter."""
    code = f"""
import sys
from fashion_lightning.apps.recommend import recommend
from hydra_helpers import make_cfg
for i, query in enumerate(["query.item_id=1000", "query.history=[1000,1005]"]):
    cfg = make_cfg("recommend", {str(tmp_path)!r} + f"/run{{i}}", {str(tmp_path / "c")!r},
                   ["index_dir={index_dir}", query, "gallery=false"])
    recommend(cfg)
heavy = ("torch", "lightning", "timm", "open_clip", "matplotlib")
print("HEAVY", sorted(m for m in heavy if m in sys.modules))
"""
    tests_dir = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{tests_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout


def test_serve_refuses_to_start_on_a_bad_checkpoint_or_index(index_dir, tmp_path):
    done = _cli("fashion_lightning.apps.serve", f"index_dir={index_dir}", tmp_path=tmp_path)
    assert done.returncode == 2 and "fashion-serve:" in done.stderr and "cannot load the index's model" in done.stderr
    done = _cli("fashion_lightning.apps.serve", f"index_dir={tmp_path / 'nowhere'}", tmp_path=tmp_path)
    assert done.returncode == 2 and "fashion-serve:" in done.stderr
