"""Catalog-scale index features: sample-trained streaming builds, memory budget, mmap, re-ranking, checkpoints."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pandas as pd
import pytest

from fashion_lightning.retrieval import (
    IndexIntegrityError,
    IndexMemoryError,
    IndexParams,
    IndexWriter,
    build_index,
    load_index,
)
from fashion_lightning.retrieval.manifest import MANIFEST_FILE, model_record
from fashion_lightning.retrieval.writer import _Reservoir

MODEL_INFO = {"checkpoint": None, "embedding_name": "random"}


def clustered(n: int, d: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def meta(n: int) -> pd.DataFrame:
    article_type = np.where(np.arange(n) % 3, "Shirts", "Jeans")
    return pd.DataFrame(
        {"id": np.arange(n, dtype=np.int64) + 100, "articleType": article_type, "year": np.arange(n) % 4 + 2010}
    )


def stream(out, vectors, params, chunk=97):
    with IndexWriter(out, MODEL_INFO, params) as writer:
        for start in range(0, len(vectors), chunk):
            writer.add(vectors[start : start + chunk], meta(len(vectors)).iloc[start : start + chunk])
        return writer.finalize()


def test_reservoir_is_seeded_uniform_and_independent_of_chunking():
    x = np.arange(5000, dtype=np.float32)[:, None]
    samples = []
    for chunk in (5000, 333, 64):
        r = _Reservoir(400, 1, seed=7)
        for start in range(0, 5000, chunk):
            r.add(x[start : start + chunk])
        samples.append(r.rows[:, 0].copy())
    np.testing.assert_array_equal(samples[0], samples[1])
    np.testing.assert_array_equal(samples[0], samples[2])
    assert len(np.unique(samples[0])) == 400  # no row twice
    assert 1500 < samples[0].mean() < 3500 and samples[0].max() > 4500  # spread over the whole stream
    other = _Reservoir(400, 1, seed=8)
    other.add(x)
    assert not np.array_equal(other.rows[:, 0], samples[0])


@pytest.mark.parametrize(
    "params",
    [IndexParams("ivf", nlist=8, train_size=600), IndexParams("ivfpq", nlist=4, pq_m=4, pq_nbits=4, train_size=600)],
    ids=["ivf", "ivfpq"],
)
def test_sample_trained_streaming_build_equals_in_memory_build(tmp_path, params):
    vectors = clustered(2000, 16)
    streamed = stream(tmp_path / "s", vectors, params)
    once = build_index(vectors, meta(2000), tmp_path / "m", MODEL_INFO, params=params)
    assert streamed.files == once.files  # byte-identical: same sample, same k-means, same lists
    assert streamed.index["train_size"] == 600
    other = build_index(
        vectors, meta(2000), tmp_path / "o", MODEL_INFO, params=IndexParams(**{**params.__dict__, "seed": 1})
    )
    assert other.files["vectors.faiss"] != once.files["vectors.faiss"]  # the seed matters
    assert not (tmp_path / "s" / "vectors.f32").exists() and not list((tmp_path / "s").glob(".*"))  # spill removed
    index = load_index(tmp_path / "s")
    _, rows = index.search(vectors[:20], 5)
    assert (rows >= 0).all()


def test_memory_budget_refuses_flat_and_hnsw_with_a_hint(tmp_path):
    vectors = clustered(3000, 64)  # 0.73 MiB of float32
    for kind in ("flat", "hnsw"):
        with pytest.raises(
            IndexMemoryError,
            match=rf"index\.type={kind} needs .* over index\.max_memory_gb=0\.0005; use index\.type=ivfpq",
        ):
            build_index(
                vectors, meta(3000), tmp_path / kind, MODEL_INFO, params=IndexParams(kind, max_memory_gb=0.0005)
            )
        assert not (tmp_path / kind / MANIFEST_FILE).exists() and not list((tmp_path / kind).glob(".tmp-*"))
    # streaming: refused as soon as the running count crosses the budget
    with (
        pytest.raises(IndexMemoryError),
        IndexWriter(tmp_path / "s", MODEL_INFO, IndexParams(max_memory_gb=0.0005)) as w,
    ):
        for start in range(0, 3000, 500):
            w.add(vectors[start : start + 500], meta(3000).iloc[start : start + 500])
    # the bounded-memory types are never refused; nor is a flat index under the budget
    build_index(
        vectors,
        meta(3000),
        tmp_path / "pq",
        MODEL_INFO,
        params=IndexParams("ivfpq", nlist=8, pq_m=8, pq_nbits=4, max_memory_gb=0.0005),
    )
    build_index(vectors, meta(3000), tmp_path / "ok", MODEL_INFO, params=IndexParams(max_memory_gb=0.01))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_mmap_loading_gives_the_same_answers(tmp_path, kind):
    vectors = clustered(3000, 32)
    params = IndexParams(kind, nlist=16, nprobe=16, pq_m=8, pq_nbits=6, hnsw_m=8)
    build_index(vectors, meta(3000), tmp_path, MODEL_INFO, params=params)
    mapped, loaded = load_index(tmp_path, mmap=True), load_index(tmp_path, mmap=False)
    queries = clustered(50, 32, seed=1)
    for engine in ["auto", "faiss", "numpy"] if kind == "flat" else ["auto"]:
        np.testing.assert_array_equal(mapped.search(queries, 10, engine)[1], loaded.search(queries, 10, engine)[1])
    allowed = np.arange(3000) % 5 == 0
    np.testing.assert_array_equal(mapped.search_filtered(queries[0], 10, allowed, exact_below=0)[1],
                                  loaded.search_filtered(queries[0], 10, allowed, exact_below=0)[1])  # fmt: skip
    if kind in ("ivf", "ivfpq"):  # the lists stay in the file: faiss's on-disk (mapped) inverted lists
        lists = faiss.extract_index_ivf(mapped.faiss_index).invlists
        assert type(faiss.downcast_InvertedLists(lists)).__name__ == "OnDiskInvertedLists"
    if kind == "flat":
        assert not mapped.vectors().flags.writeable


def test_ivfpq_rerank_from_mapped_float_vectors_is_exact_on_its_short_list(tmp_path):
    vectors = clustered(4000, 32)
    params = IndexParams("ivfpq", nlist=16, nprobe=16, pq_m=8, pq_nbits=6, rerank=200)
    manifest = build_index(vectors, meta(4000), tmp_path, MODEL_INFO, params=params)
    assert manifest.files["vectors.f32"]["bytes"] == 4000 * 32 * 4
    index = load_index(tmp_path)
    assert isinstance(index.exact_vectors, np.memmap) and index.exact
    queries = clustered(100, 32, seed=2)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    scores, rows = index.search(queries, 10)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, rows, 1), atol=1e-5)  # exact scores
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
    index.params = IndexParams(**{**index.params.__dict__, "rerank": 0})
    _, pq_rows = index.search(queries, 10)
    pq_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pq_rows, truth)])
    assert recall >= 0.95 and recall > pq_recall
    np.testing.assert_allclose(index.vectors(np.array([5, 9])), vectors[[5, 9]], atol=1e-6)  # item queries: exact


def test_items_load_only_the_columns_asked_for(tmp_path):
    build_index(clustered(50, 8), meta(50), tmp_path, MODEL_INFO)
    index = load_index(tmp_path, columns=["year"])
    assert list(index.items.columns) == ["id", "year"] and index.items["year"].dtype.kind == "i"
    assert index.rows_of([100, 149]).tolist() == [0, 49]


def test_sparse_and_dense_masks_go_through_faiss_selectors(tmp_path):
    vectors = clustered(20000, 16)
    build_index(vectors, meta(20000), tmp_path, MODEL_INFO, params=IndexParams("hnsw", hnsw_m=16))
    index = load_index(tmp_path)
    q = vectors[7]
    for every in (2, 101):  # bitmap selector, then a batch of ids (under 1/64 of the rows)
        allowed = np.arange(20000) % every == 0
        _, rows = index.search_filtered(q, 10, allowed, exact_below=0)
        expected = np.flatnonzero(allowed)[np.argsort(-(vectors[allowed] @ q))[:10]]
        assert allowed[rows].all()
        assert len(set(rows) & set(expected)) >= 9


def test_checkpoint_is_recorded_verified_and_moves_with_the_folder(tmp_path):
    folder = tmp_path / "idx"
    ckpt = folder / "model.ckpt"
    folder.mkdir()
    ckpt.write_bytes(b"weights v1" * 100)
    info = {**model_record(ckpt, folder), "embedding_name": "random"}
    assert info["checkpoint"] == "model.ckpt" and info["checkpoint_file"]["bytes"] == 1000
    build_index(clustered(30, 8), meta(30), folder, info)
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    index = load_index(moved)
    assert index.model_path() == moved / "model.ckpt" and index.model_info["checkpoint"] == str(moved / "model.ckpt")
    (moved / "model.ckpt").write_bytes(b"weights v2" * 100)  # swapped checkpoint, same size
    with pytest.raises(IndexIntegrityError, match=r"model\.ckpt: sha256 .*manifest\.json's model record"):
        load_index(moved)


def test_a_model_outside_the_folder_is_refused_unless_trusted(tmp_path):
    """Whoever wrote the manifest wrote its hashes too: a path out of the folder is refused by default."""
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"x" * 10)
    outside = model_record(other, tmp_path / "plain")
    assert outside["checkpoint"] == str(other.resolve())  # outside the folder: absolute
    manifest = build_index(clustered(30, 8), meta(30), tmp_path / "plain", {"checkpoint": str(other)})
    assert manifest.model["checkpoint_file"]["bytes"] == 10  # recorded by build_index itself
    with pytest.raises(IndexIntegrityError, match=r"outside the index folder .*allow_external_model=true"):
        load_index(tmp_path / "plain")
    assert load_index(tmp_path / "plain", allow_external_model=True).model_path() == other
    other.write_bytes(b"y" * 10)  # trusted, and still checked
    with pytest.raises(IndexIntegrityError, match=r"other\.ckpt: sha256"):
        load_index(tmp_path / "plain", allow_external_model=True)
    manifest_path = tmp_path / "plain" / MANIFEST_FILE
    for edited in ("../other.ckpt", "/etc/passwd"):  # relative escapes and absolute paths alike
        data = json.loads(manifest_path.read_text())
        data["model"]["checkpoint"] = edited
        manifest_path.write_text(json.dumps(data))
        with pytest.raises(IndexIntegrityError, match="outside the index folder"):
            load_index(tmp_path / "plain")
    (tmp_path / "plain" / "link").symlink_to(tmp_path)  # a link out of the folder is outside too
    data["model"]["checkpoint"] = "link/other.ckpt"
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(IndexIntegrityError, match="outside the index folder"):
        load_index(tmp_path / "plain")


def test_model_load_rechecks_the_checkpoint_a_service_started_with(tmp_path, monkeypatch):
    """A checkpoint swapped after start-up is refused when the model is loaded, before it is unpickled."""
    from fashion_lightning.models import base
    from fashion_lightning.retrieval import Recommender

    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "model.ckpt").write_bytes(b"weights v1" * 100)
    build_index(clustered(30, 8), meta(30), folder, {**model_record(folder / "model.ckpt", folder)})
    recommender = Recommender.from_dir(folder)  # verified now
    (folder / "model.ckpt").write_bytes(b"weights v2" * 100)  # swapped while serving
    monkeypatch.setattr(base, "load_module", lambda path: pytest.fail("a swapped checkpoint was loaded"))
    with pytest.raises(IndexIntegrityError, match=r"model\.ckpt: sha256"):
        recommender.encoder  # noqa: B018
