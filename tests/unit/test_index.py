"""Index folders: round-trip, index types, streaming, integrity checks, exact filtered search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashion_lightning.retrieval import (
    IndexIntegrityError,
    IndexParams,
    IndexWriter,
    build_index,
    load_index,
)
from fashion_lightning.retrieval.flat import bf16_available
from fashion_lightning.retrieval.manifest import MANIFEST_FILE, sha256_file

MODEL_INFO = {"checkpoint": None, "embedding_name": "random", "module_class": "None", "tasks": ["articleType"]}


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def metadata(n: int) -> pd.DataFrame:
    names = ['Men, "Navy" Shirt', "Café\nline", "", "plain"]
    return pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64) * 7 + 3,
            "productDisplayName": [names[i % 4] for i in range(n)],
            "year": np.arange(n) % 5 + 2010,
            "price": np.linspace(0, 1, n),
            "articleType": ["Shirts" if i % 3 else "Jeans" for i in range(n)],
        }
    )


def brute_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


@pytest.fixture
def flat_dir(tmp_path: Path) -> tuple[Path, np.ndarray, pd.DataFrame]:
    vectors, meta = unit_vectors(300, 24), metadata(300)
    build_index(vectors, meta, tmp_path / "idx", MODEL_INFO, extra_vectors={"image_embedding": vectors[:, :8]})
    return tmp_path / "idx", vectors, meta


def test_round_trip_matches_brute_force(flat_dir):
    path, vectors, meta = flat_dir
    index = load_index(path)
    assert (index.n, index.dim) == (300, 24)
    pd.testing.assert_frame_equal(index.items, meta, check_dtype=False)
    assert index.items["id"].dtype == np.int64 and index.items["year"].dtype.kind == "i"
    np.testing.assert_array_equal(index.parts["image_embedding"], vectors[:, :8])
    queries = unit_vectors(40, 24, seed=1)
    expected = brute_topk(vectors, queries, 7)
    engines = ["auto", "numpy", "faiss"] + (["bf16"] if bf16_available() else [])
    for engine in engines:
        scores, rows = index.search(queries, 7, engine=engine)
        np.testing.assert_array_equal(rows, expected, err_msg=engine)
        np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, expected, 1), atol=1e-5)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["count"] == 300 and manifest["dim"] == 24 and manifest["index"]["type"] == "flat"
    assert set(manifest["files"]) == {"vectors.faiss", "items.csv", "parts.npz"}
    assert manifest["model"]["embedding_name"] == "random"


@pytest.mark.parametrize(
    "params",
    [
        IndexParams("ivf", nlist=8, nprobe=8),
        IndexParams("hnsw", hnsw_m=16),
        IndexParams("ivfpq", nlist=4, nprobe=4, pq_m=8, pq_nbits=4),
    ],
    ids=lambda p: p.type,
)
def test_approximate_index_types(tmp_path, params):
    vectors = unit_vectors(1200, 32)
    build_index(vectors, metadata(1200), tmp_path, MODEL_INFO, params=params)
    index = load_index(tmp_path)
    queries = vectors[:50]
    _, rows = index.search(queries, 10)
    expected = brute_topk(vectors, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, expected)])
    assert recall >= (0.3 if params.type == "ivfpq" else 0.9)
    if params.type != "ivfpq":  # exact storage: an item finds itself first
        np.testing.assert_array_equal(rows[:, 0], np.arange(50))
        np.testing.assert_allclose(index.vectors(np.array([3, 7])), vectors[[3, 7]], atol=1e-6)
    allowed = np.arange(1200) % 2 == 0  # broad mask: over-fetch path through the approximate index
    scores, rows = index.search_filtered(vectors[1], 25, allowed, exact_below=0)
    assert len(rows) == 25 and allowed[rows].all() and (np.diff(scores) <= 1e-6).all()


@pytest.mark.parametrize("params", [IndexParams(), IndexParams("ivf", nlist=4)], ids=["flat", "ivf"])
def test_streaming_writer_equals_one_shot(tmp_path, params):
    vectors, meta = unit_vectors(250, 16), metadata(250)
    with IndexWriter(tmp_path / "stream", MODEL_INFO, params) as writer:
        for start in range(0, 250, 64):
            writer.add(vectors[start : start + 64], meta.iloc[start : start + 64])
        streamed = writer.finalize()
    one_shot = build_index(vectors, meta, tmp_path / "once", MODEL_INFO, params=params)
    assert streamed.files == one_shot.files  # byte-identical folders
    if params.type == "flat":
        assert streamed.bytes_per_item == pytest.approx(16 * 4, rel=0.1)


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((3, 4), np.nan), metadata(3), tmp_path / "a", MODEL_INFO)
    with pytest.raises(ValueError, match="duplicate item ids"):
        build_index(unit_vectors(3, 4), metadata(3).assign(id=[1, 1, 2]), tmp_path / "b", MODEL_INFO)
    with pytest.raises(ValueError, match="'id'"):
        build_index(unit_vectors(3, 4), metadata(3).drop(columns="id"), tmp_path / "c", MODEL_INFO)


def test_interrupted_build_leaves_no_index(tmp_path, flat_dir):
    path, vectors, meta = flat_dir
    with pytest.raises(RuntimeError), IndexWriter(path, MODEL_INFO) as writer:  # rebuild in place, then die
        writer.add(vectors, meta)
        raise RuntimeError("embedding crashed")
    with pytest.raises(IndexIntegrityError, match="manifest.json: missing"):
        load_index(path)


def _rewrite_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _rechecksum(path: Path, name: str) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"][name] = {"bytes": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def _drop_last_item_row(path: Path) -> None:
    frame = pd.read_csv(path / "items.csv", dtype=str, keep_default_na=False)
    frame.iloc[:-1].to_csv(path / "items.csv", index=False)


CORRUPTIONS = {
    "flipped byte in vectors": (lambda p: _flip_byte(p / "vectors.faiss", 5000), r"vectors\.faiss: sha256 .* corrupt"),
    "truncated items": (
        lambda p: (p / "items.csv").write_bytes((p / "items.csv").read_bytes()[:-40]),
        r"items\.csv: \d+ bytes, but manifest\.json recorded \d+ \(truncated",
    ),
    "missing manifest": (lambda p: (p / MANIFEST_FILE).unlink(), r"manifest\.json: missing"),
    "missing parts": (lambda p: (p / "parts.npz").unlink(), r"parts\.npz: listed in manifest\.json but missing"),
    "manifest not json": (lambda p: (p / MANIFEST_FILE).write_text("{oops"), r"manifest\.json:? (is )?not valid JSON"),
    "manifest dim": (
        lambda p: _rewrite_manifest(p, dim=32),
        r"vectors\.faiss: holds 24-d vectors but manifest\.json says dim=32",
    ),
    "manifest count": (
        lambda p: _rewrite_manifest(p, count=301),
        r"holds 300 vectors but manifest\.json says count=301",
    ),
    "format version": (lambda p: _rewrite_manifest(p, format_version=99), r"format_version 99 is not supported"),
    "row count": (
        lambda p: (_drop_last_item_row(p), _rechecksum(p, "items.csv")),
        r"items\.csv: 299 item rows but the index holds 300 vectors",
    ),
    "vectors replaced consistently": (
        lambda p: (
            build_index(unit_vectors(10, 24), metadata(10), p / "other", MODEL_INFO),
            (p / "vectors.faiss").write_bytes((p / "other" / "vectors.faiss").read_bytes()),
            _rechecksum(p, "vectors.faiss"),
        ),
        r"holds 10 vectors but manifest\.json says count=300",
    ),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS), ids=list(CORRUPTIONS))
def test_corruption_is_refused_with_a_clear_message(flat_dir, damage):
    path = flat_dir[0]
    corrupt, message = CORRUPTIONS[damage]
    load_index(path)  # sound before
    corrupt(path)
    with pytest.raises(IndexIntegrityError, match=message):
        load_index(path)


def test_missing_folder(tmp_path):
    with pytest.raises(IndexIntegrityError, match="index folder not found"):
        load_index(tmp_path / "nope")


def brute_filtered(vectors, query, k, allowed, groups):
    rows = np.flatnonzero(allowed)
    order = rows[np.argsort(-(vectors[rows] @ query), kind="stable")]
    keep, seen = [], set()
    for row in order:
        if groups[row] not in seen:
            seen.add(groups[row])
            keep.append(row)
    return np.array(keep[:k])


@pytest.mark.parametrize("fraction", [0.6, 0.05, 0.0005], ids=["broad-overfetch", "selective-exact", "tiny"])
def test_search_filtered_is_exact(tmp_path, fraction):
    n = 40_000
    vectors = unit_vectors(n, 8, seed=3)
    build_index(vectors, metadata(n)[["id"]], tmp_path, MODEL_INFO)
    index = load_index(tmp_path, verify=False)
    rng = np.random.default_rng(4)
    groups = rng.integers(0, n // 3, n)  # ~3 rows per "image": de-duplication matters
    for q in unit_vectors(5, 8, seed=5):
        allowed = rng.random(n) < fraction
        allowed[0] = True
        scores, rows = index.search_filtered(q, 12, allowed, groups)
        expected = brute_filtered(vectors, q, 12, allowed, groups)
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_allclose(scores, vectors[expected] @ q, atol=1e-5)
        assert allowed[rows].all() and len(set(groups[rows])) == len(rows)


@pytest.mark.skipif(not bf16_available(), reason="no native bf16 GEMM on this CPU")
def test_bf16_search_is_exact_under_near_ties(tmp_path):
    base = unit_vectors(1, 64)[0]
    noise = unit_vectors(3000, 64, seed=9) * 1e-3
    vectors = base + noise  # 3000 vectors within bf16 rounding of each other
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    build_index(vectors, metadata(3000)[["id"]], tmp_path, MODEL_INFO)
    index = load_index(tmp_path, verify=False)
    queries = np.vstack([base + unit_vectors(64, 64, seed=10) * 0.01])
    scores, _ = index.search(queries, 5, engine="bf16")
    exact = np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(scores, exact, atol=1e-6)
