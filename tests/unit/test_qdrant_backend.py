"""The Qdrant backend against the real engines, no mock: qdrant-client's local mode and qdrant-edge-py's Rust
shard (``engine=edge``, when installed). Same answers as FAISS flat, idempotent upserts after a crash, and the
collections it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("qdrant_client")
pytestmark = pytest.mark.slow  # qdrant-client local mode commits each point to sqlite: seconds per test

from fashion_lightning.retrieval import Recommender, build_index  # noqa: E402
from fashion_lightning.retrieval.qdrant import (  # noqa: E402
    EdgeStore,
    QdrantError,
    QdrantIndexWriter,
    QdrantStore,
    QdrantTarget,
    connect,
    open_store,
)
from fashion_lightning.retrieval.update import with_content_hash  # noqa: E402

N, D = 300, 24
INFO = {"embedding_name": "test", "model_identity": "a" * 64}


def _engine(name: str) -> str:
    if name == "edge":
        pytest.importorskip("qdrant_edge")
    return name


ENGINES = pytest.mark.parametrize("engine", ["client", "edge"])


def _catalog(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(N, D)).astype(np.float32)
    frame = pd.DataFrame({
        "id": np.arange(5000, 5000 + N),
        "gender": rng.choice(["Men", "Women", "Unisex"], N),
        "articleType": rng.choice(["Shirts", "Jeans", "Watches", "Heels"], N),
        "baseColour": rng.choice(["Red", "Blue", "Black"], N),
        "year": rng.choice([2011.0, 2012.0, np.nan], N),
        "image_sha1": [f"{i % 260:040x}" for i in range(N)],  # 40 photos shown by two items each
    })  # fmt: skip
    return vectors, with_content_hash(frame)


def _qdrant(tmp: Path, vectors, frame, target: QdrantTarget, batch: int = 100) -> Path:
    out = tmp / "qdrant-index"
    writer = QdrantIndexWriter(out, INFO, target)
    for start in range(0, len(frame), batch):
        writer.add(vectors[start : start + batch], frame.iloc[start : start + batch].reset_index(drop=True))
    writer.finalize()
    writer.store(D).close()  # local mode: one opener per folder at a time
    return out


@pytest.fixture(params=["client", "edge"])
def pair(request, tmp_path):
    vectors, frame = _catalog()
    build_index(vectors, frame, tmp_path / "faiss-index", INFO)
    target = QdrantTarget(
        collection="items", path=str(tmp_path / "store"), batch_size=64, engine=_engine(request.param)
    )
    qdrant_dir = _qdrant(tmp_path, vectors, frame, target)
    faiss_rec = Recommender.from_dir(tmp_path / "faiss-index")
    qdrant_rec = Recommender.from_dir(qdrant_dir, allow_qdrant_local=True)
    yield faiss_rec, qdrant_rec, target
    qdrant_rec.index.close()


QUERIES = [
    {},
    {"filters": {"gender": "Men"}},
    {"filters": {"articleType": ["Jeans", "Watches"], "baseColour": "Blue"}},
]


def test_qdrant_gives_faiss_flat_top10_with_filters_and_duplicate_photos(pair):
    faiss_rec, qdrant_rec, _ = pair
    assert qdrant_rec.index.kind == "qdrant" and qdrant_rec.index.n == N
    for item in (5000, 5001, 5100, 5259):  # 5000 and 5260 show the same photo: both excluded
        for extra in QUERIES:
            a = faiss_rec.recommend(item_id=item, k=10, **extra)
            b = qdrant_rec.recommend(item_id=item, k=10, **extra)
            assert a.ids == b.ids and len(b.ids) == 10
            np.testing.assert_allclose([r.score for r in a.results], [r.score for r in b.results], atol=1e-5)
            assert [r.explanation.to_dict() for r in a.results] == [r.explanation.to_dict() for r in b.results]
    b = qdrant_rec.recommend(item_id=5000, k=10)
    assert 5260 not in b.ids and 5000 not in b.ids  # the item and its photo's other copy
    a = faiss_rec.recommend(history=[5003, 5004, 5005], disliked=[5006], k=10, filters={"gender": "Women"})
    b = qdrant_rec.recommend(history=[5003, 5004, 5005], disliked=[5006], k=10, filters={"gender": "Women"})
    assert a.ids == b.ids and all(r.metadata["gender"] == "Women" for r in b.results)
    assert b.timings["index_version"] == qdrant_rec.index.version != faiss_rec.index.version


def test_payload_holds_the_schema_fields(pair):
    _, qdrant_rec, target = pair
    store = qdrant_rec.index.store
    if target.engine == "edge":
        point = store.client.retrieve([5002], with_payload=True, with_vector=False)[0]
    else:
        point = store.client.retrieve("items", ids=[5002], with_payload=True)[0]
    row = qdrant_rec.index.items.set_index("id").loc[5002]
    assert point.payload["gender"] == row["gender"] and point.payload["articleType"] == row["articleType"]
    assert point.payload["model_identity"] == INFO["model_identity"]
    hashes = store.hashes()
    assert len(hashes) == N and hashes[5002] == row["content_hash"]  # what an update compares


def _crashing(base: type[QdrantStore], survive: int) -> type[QdrantStore]:
    """The real store, whose process 'dies' after ``survive`` acknowledged upsert calls (of several batches)."""
    left = [survive]

    def upsert(self, ids, vectors, payload):
        if left[0] <= 0:
            raise KeyboardInterrupt("killed mid-upsert")
        left[0] -= 1
        base.upsert(self, ids, vectors, payload)

    return type(f"Crashing{base.__name__}", (base,), {"upsert": upsert})


@ENGINES
def test_crash_mid_upsert_then_rerun_completes_without_duplicates(tmp_path, engine):
    vectors, frame = _catalog(1)
    target = QdrantTarget(collection="items", path=str(tmp_path / "store"), batch_size=50, engine=_engine(engine))
    out = tmp_path / "qdrant-index"
    if engine == "edge":
        store = _crashing(EdgeStore, 2)(target, D, INFO["model_identity"]).ensure()
    else:
        store = _crashing(QdrantStore, 2)(connect(target), target, D, INFO["model_identity"]).ensure()
    writer = QdrantIndexWriter(out, INFO, target, D, store)
    with pytest.raises(KeyboardInterrupt):
        for start in range(0, N, 100):
            writer.add(vectors[start : start + 100], frame.iloc[start : start + 100].reset_index(drop=True))
    assert 0 < store.count() < N and not (out / "manifest.json").exists()
    store.close()
    _qdrant(tmp_path, vectors, frame, target, batch=70)  # the rerun, in other batches
    store = open_store(target, D, INFO["model_identity"], create=False)
    assert sorted(store.hashes()) == frame["id"].tolist() and store.count() == N  # complete, no duplicates
    store.close()
    build_index(vectors, frame, tmp_path / "faiss-index", INFO)
    faiss_rec = Recommender.from_dir(tmp_path / "faiss-index")
    with Recommender.from_dir(out, allow_qdrant_local=True) as qdrant_rec:
        for item in (5000, 5250):
            assert faiss_rec.recommend(item_id=item, k=10).ids == qdrant_rec.recommend(item_id=item, k=10).ids


def test_refuses_other_dimension_other_model_unreachable_and_untrusted_local(pair, tmp_path):
    _, qdrant_rec, target = pair
    running = qdrant_rec.index.store
    with pytest.raises(QdrantError, match="24-d"):
        open_store(target, D + 8, INFO["model_identity"], create=True, reuse=running)
    with pytest.raises(QdrantError, match="another model"):
        open_store(target, D, "b" * 64, create=True, reuse=running)
    with pytest.raises(QdrantError, match="unreachable"):
        connect(QdrantTarget(url="http://127.0.0.1:9", timeout_s=2))
    if target.engine == "client":  # qdrant-client's local storage is pickled: trusted only when asked
        with pytest.raises(QdrantError, match="pickle"):
            Recommender.from_dir(qdrant_rec.index.path)
    with pytest.raises(QdrantError, match="exactly one"):
        QdrantTarget(collection="x")
    with pytest.raises(QdrantError, match="engine"):
        QdrantTarget(collection="x", url="http://127.0.0.1:9", engine="edge")
