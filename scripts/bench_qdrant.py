"""FAISS flat vs Qdrant (exact search) on the same vectors: top-10 agreement and latency side by side.

    python scripts/bench_qdrant.py                                  # 20,000 clustered 256-d vectors, :memory:
    python scripts/bench_qdrant.py --index outputs/index/runs/<run>/index --queries 1000
    python scripts/bench_qdrant.py --qdrant-url http://localhost:6333  # a Qdrant server (docker run ...)
    python scripts/bench_qdrant.py --qdrant-path /tmp/edge --engine edge  # qdrant-edge-py's Rust shard

Both indexes hold the same unit vectors and answer through the same :class:`Recommender` interface:
"more like this" item queries, unfiltered and with a payload filter (gender), duplicate photos excluded.
Reported: how many of the queries give the identical top-10 ids (the goal: all), the largest score
difference, and per-query latency (p50 / p99, whole recommend call) of each backend, with the ratio
Qdrant / FAISS measured in the same run. Qdrant local mode (``--qdrant-path`` or the default
``:memory:``) is qdrant-client's in-process numpy engine, ``--engine edge`` qdrant-edge-py's in-process
Rust shard; a server is what a cluster runs. Searches run one thread each, as in fashion-serve.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fashion_lightning.retrieval import Recommender, build_index, load_index
from fashion_lightning.retrieval.qdrant import QdrantIndexWriter, QdrantTarget


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Clustered vectors (like product embeddings: many near neighbours) with catalog-like fields."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(2, n // 50), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    frame = pd.DataFrame({
        "id": np.arange(10_000, 10_000 + n),
        "gender": rng.choice(["Men", "Women", "Boys", "Girls", "Unisex"], n, p=[0.45, 0.4, 0.05, 0.05, 0.05]),
        "articleType": rng.choice(["Tshirts", "Shirts", "Watches", "Casual Shoes", "Kurtas", "Handbags"], n),
        "image_sha1": [f"{i % (n - n // 100):040x}" for i in range(n)],  # 1% of photos shown twice
    })  # fmt: skip
    return vectors, frame


def timed(rec: Recommender, items: np.ndarray, filters) -> tuple[list[list[int]], list[np.ndarray], np.ndarray]:
    ids, scores, ms = [], [], []
    for item in items:
        start = time.perf_counter()
        result = rec.recommend(item_id=int(item), k=10, filters=filters)
        ms.append((time.perf_counter() - start) * 1e3)
        ids.append(result.ids)
        scores.append(np.array([r.score for r in result.results]))
    return ids, scores, np.array(ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help="a FAISS index folder to take vectors and items from")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--qdrant-path", default=":memory:", help="Qdrant local-mode folder (default: in memory)")
    parser.add_argument("--qdrant-url", default=None, help="a Qdrant server instead of local mode")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--engine", default="client", choices=["client", "edge"], help="local engine with a path")
    parser.add_argument("--filters", nargs="+", default=["none", "gender"], choices=["none", "gender"])
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    from fashion_lightning.retrieval import configure_threads

    threadpool_limits(1, user_api="blas")  # one thread per search, as fashion-serve runs them (search_threads=1)
    configure_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-qdrant-"))
    if args.index:
        source = load_index(args.index)
        vectors, frame = source.vectors().copy(), source.items.copy()
    else:
        vectors, frame = synthetic(args.items, args.dim)
    info = {"embedding_name": "bench", "model_identity": "bench-" + "0" * 58}
    build_index(vectors, frame, work / "faiss", info)
    target = (
        QdrantTarget(collection="bench", url=args.qdrant_url, batch_size=512)
        if args.qdrant_url
        else QdrantTarget(collection="bench", path=args.qdrant_path, batch_size=512, engine=args.engine)
    )
    start = time.perf_counter()
    writer = QdrantIndexWriter(work / "qdrant", info, target)
    for s in range(0, len(frame), 4096):
        writer.add(vectors[s : s + 4096], frame.iloc[s : s + 4096].reset_index(drop=True))
    writer.finalize()
    upsert_s = time.perf_counter() - start
    faiss_rec = Recommender.from_dir(work / "faiss")
    if args.qdrant_url or args.qdrant_path != ":memory:":
        writer.store(vectors.shape[1]).close()
        qdrant_rec = Recommender.from_dir(work / "qdrant", allow_qdrant_local=True)
    else:  # an in-memory collection lives in the writer's client: search it through the same interface
        from fashion_lightning.retrieval.qdrant import QdrantIndex

        base = load_index(work / "faiss")
        qdrant_rec = Recommender(QdrantIndex(base, writer.store(vectors.shape[1])))
    rng = np.random.default_rng(1)
    items = rng.choice(frame["id"].to_numpy(), size=min(args.queries, len(frame)), replace=False)
    print(f"{len(frame):,} x {vectors.shape[1]} vectors, {len(items)} item queries, k=10; Qdrant: {target.where}")
    print(f"machine: {platform.processor() or platform.machine()}, upsert {upsert_s:.1f} s")
    print(f"{'filter':<18} {'same top-10':>12} {'max |dscore|':>13} {'FAISS p50/p99 ms':>18} {'Qdrant p50/p99 ms':>19} "
          f"{'ratio p50':>9}")  # fmt: skip
    wanted = {"none": ("none", None), "gender": ("gender=Women", {"gender": "Women"})}
    for name, filters in (wanted[f] for f in args.filters):
        faiss_ids, faiss_scores, faiss_ms = timed(faiss_rec, items, filters)
        qdrant_ids, qdrant_scores, qdrant_ms = timed(qdrant_rec, items, filters)
        same = sum(a == b for a, b in zip(faiss_ids, qdrant_ids))
        # a differing top-10 whose scores agree within 1e-5 differs only in the order of (near-)tied items
        ties = sum(
            a != b and len(sa) == len(sb) and bool(np.allclose(sa, sb, atol=1e-5))
            for a, b, sa, sb in zip(faiss_ids, qdrant_ids, faiss_scores, qdrant_scores)
        )
        worst = max(
            float(np.abs(a - b).max()) if len(a) == len(b) else np.inf for a, b in zip(faiss_scores, qdrant_scores)
        )
        fp, qp = np.percentile(faiss_ms, [50, 99]), np.percentile(qdrant_ms, [50, 99])
        print(f"{name:<18} {same:>5}/{len(items):<6} {worst:>13.2e} {fp[0]:>8.2f}/{fp[1]:<9.2f} "
              f"{qp[0]:>9.2f}/{qp[1]:<9.2f} {qp[0] / fp[0]:>9.1f}")  # fmt: skip
        if same < len(items):
            print(f"{'':<18} the other {len(items) - same}: {ties} differ only in the order of items whose scores tie")


if __name__ == "__main__":
    main()
