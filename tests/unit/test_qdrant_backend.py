"""The Qdrant backend against the real qdrant-client in local mode (no mock): same answers as FAISS flat,
idempotent upserts after a crash, and the collections it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("qdrant_client")

from fashion_lightning.retrieval import Recommender, build_index  # noqa: E402
from fashion_lightning.retrieval.qdrant import (  # noqa: E402
    QdrantError,
    QdrantIndexWriter,
    QdrantStore,
    QdrantTarget,
    connect,
)

N, D = 600, 24
INFO = {"embedding_name": "test", "model_identity": "a" * 64}


def _catalog(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(N, D)).astype(np.float32)
    frame = pd.DataFrame({
        "id": np.arange(5000, 5000 + N),
        "gender": rng.choice(["Men", "Women", "Unisex"], N),
        "articleType": rng.choice(["Shirts", "Jeans", "Watches", "Heels"], N),
        "baseColour": rng.choice(["Red", "Blue", "Black"], N),
        "year": rng.choice([2011.0, 2012.0, np.nan], N),
        "image_sha1": [f"{i % 560:040x}" for i in range(N)],  # 40 photos shown by two items each
    })  # fmt: skip
    return vectors, frame


def _qdrant(tmp: Path, vectors, frame, target: QdrantTarget, batch: int = 100) -> Path:
    out = tmp / "qdrant-index"
    writer = QdrantIndexWriter(out, INFO, target)
    for start in range(0, len(frame), batch):
        writer.add(vectors[start : start + batch], frame.iloc[start : start + batch].reset_index(drop=True))
    writer.finalize()
    writer.store(D).client.close()  # local mode: one client per folder at a time
    return out


@pytest.fixture
def pair(tmp_path):
    vectors, frame = _catalog()
    build_index(vectors, frame, tmp_path / "faiss-index", INFO)
    target = QdrantTarget(collection="items", path=str(tmp_path / "store"), batch_size=64)
    qdrant_dir = _qdrant(tmp_path, vectors, frame, target)
    faiss_rec = Recommender.from_dir(tmp_path / "faiss-index")
    qdrant_rec = Recommender.from_dir(qdrant_dir, allow_qdrant_local=True)
    yield faiss_rec, qdrant_rec, target
    qdrant_rec.index.store.client.close()


QUERIES = [
    {},
    {"filters": {"gender": "Men"}},
    {"filters": {"articleType": ["Jeans", "Watches"], "baseColour": "Blue"}},
]


def test_qdrant_gives_faiss_flat_top10_with_filters_and_duplicate_photos(pair):
    faiss_rec, qdrant_rec, _ = pair
    assert qdrant_rec.index.kind == "qdrant" and qdrant_rec.index.n == N
    for item in (5000, 5001, 5100, 5559):  # 5000 and 5560 show the same photo: both excluded
        for extra in QUERIES:
            a = faiss_rec.recommend(item_id=item, k=10, **extra)
            b = qdrant_rec.recommend(item_id=item, k=10, **extra)
            assert a.ids == b.ids and len(b.ids) == 10
            np.testing.assert_allclose([r.score for r in a.results], [r.score for r in b.results], atol=1e-5)
            assert [r.explanation.to_dict() for r in a.results] == [r.explanation.to_dict() for r in b.results]
    b = qdrant_rec.recommend(item_id=5000, k=10)
    assert 5560 not in b.ids and 5000 not in b.ids  # the item and its photo's other copy
    a = faiss_rec.recommend(history=[5003, 5004, 5005], disliked=[5006], k=10, filters={"gender": "Women"})
    b = qdrant_rec.recommend(history=[5003, 5004, 5005], disliked=[5006], k=10, filters={"gender": "Women"})
    assert a.ids == b.ids and all(r.metadata["gender"] == "Women" for r in b.results)
    assert b.timings["index_version"] == qdrant_rec.index.version != faiss_rec.index.version


def test_payload_holds_the_schema_fields(pair):
    _, qdrant_rec, _ = pair
    point = qdrant_rec.index.store.client.retrieve("items", ids=[5002], with_payload=True)[0]
    row = qdrant_rec.index.items.set_index("id").loc[5002]
    assert point.payload["gender"] == row["gender"] and point.payload["articleType"] == row["articleType"]
    assert point.payload["model_identity"] == INFO["model_identity"]


class _CrashingStore(QdrantStore):
    """The real store whose process 'dies' after ``survive`` upsert batches were acknowledged."""

    survive = 3

    def upsert(self, ids, vectors, payload):
        if self.survive <= 0:
            raise KeyboardInterrupt("killed mid-upsert")
        type(self).survive -= 1
        super().upsert(ids, vectors, payload)


def test_crash_mid_upsert_then_rerun_completes_without_duplicates(tmp_path):
    vectors, frame = _catalog(1)
    target = QdrantTarget(collection="items", path=str(tmp_path / "store"), batch_size=50)
    out = tmp_path / "qdrant-index"
    client = connect(target)
    store = _CrashingStore(client, target, D, INFO["model_identity"]).ensure()
    writer = QdrantIndexWriter(out, INFO, target, D, store)
    with pytest.raises(KeyboardInterrupt):
        for start in range(0, N, 100):
            writer.add(vectors[start : start + 100], frame.iloc[start : start + 100].reset_index(drop=True))
    assert 0 < client.count("items").count < N and not (out / "manifest.json").exists()
    client.close()
    _qdrant(tmp_path, vectors, frame, target, batch=70)  # the rerun, in other batches
    client = connect(target)
    ids = sorted(int(p.id) for p in client.scroll("items", limit=10 * N)[0])
    assert ids == frame["id"].tolist() and client.count("items").count == N  # complete, no duplicates
    client.close()
    build_index(vectors, frame, tmp_path / "faiss-index", INFO)
    faiss_rec = Recommender.from_dir(tmp_path / "faiss-index")
    qdrant_rec = Recommender.from_dir(out, allow_qdrant_local=True)
    for item in (5000, 5300):
        assert faiss_rec.recommend(item_id=item, k=10).ids == qdrant_rec.recommend(item_id=item, k=10).ids


def test_refuses_other_dimension_other_model_unreachable_and_untrusted_local(pair, tmp_path):
    _, qdrant_rec, target = pair
    client = qdrant_rec.index.store.client
    with pytest.raises(QdrantError, match="24-d"):
        QdrantStore(client, target, D + 8, INFO["model_identity"]).ensure()
    with pytest.raises(QdrantError, match="another model"):
        QdrantStore(client, target, D, "b" * 64).ensure()
    with pytest.raises(QdrantError, match="unreachable"):
        connect(QdrantTarget(url="http://127.0.0.1:9", timeout_s=2))
    with pytest.raises(QdrantError, match="pickle"):
        Recommender.from_dir(qdrant_rec.index.path)  # local storage is trusted only when the caller says so
    with pytest.raises(QdrantError, match="exactly one"):
        QdrantTarget(collection="x")
