"""Catalog-scale benchmark: flat, HNSW, IVF and IVF-PQ index folders at 100k-1M+ items.

Synthetic unit vectors with realistic structure: a mixture of ``--clusters`` Gaussians on the sphere
(cluster spreads vary, as product categories do), generated chunk by chunk from a seed so no process
ever holds the whole catalog. 1,000 held-out queries come from the same mixture; their exact top-10
(the baseline every recall is measured against) is computed in the same run by a streaming exact scan.

Each configuration is built by ``IndexWriter`` in its own child process (so peak RSS is that build's
alone, measured with ``getrusage``), then loaded with ``load_index`` (IVF types memory-mapped) and queried:

* build time, peak RSS during the build (and the interpreter's baseline RSS, for reference);
* index bytes per item (``vectors.faiss``; ``vectors.f32`` for exact re-ranking is listed separately);
* single-query latency p50 / p99 (``search`` with k=10, one query at a time);
* batched throughput (all queries in one ``search`` call);
* recall@10 against the exact top-10.

    nice python scripts/bench_scale.py --n 100000                       # all four types, ~3 min
    nice python scripts/bench_scale.py --n 1000000 --types flat ivf ivfpq
    python scripts/bench_scale.py --n 20000 --quick                     # seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

CHUNK = 16384  # rows per add(): a stream of predict batches, not one big array
K = 10


def _rss_mb() -> float:
    """Peak RSS of this process so far (VmHWM; getrusage's ru_maxrss survives exec, so a child would
    report its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Mixture:
    """Seeded mixture of Gaussians on the unit sphere; ``chunk(i)`` is reproducible on its own."""

    def __init__(self, dim: int, clusters: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.seed = dim, seed
        self.centers = rng.standard_normal((clusters, dim)).astype(np.float32)
        self.centers /= np.linalg.norm(self.centers, axis=1, keepdims=True)
        self.weights = rng.dirichlet(np.full(clusters, 2.0))  # uneven category sizes
        self.spread = rng.uniform(0.5, 1.2, clusters).astype(np.float32)  # noise norm relative to the centre

    def draw(self, n: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream])
        label = rng.choice(len(self.centers), size=n, p=self.weights)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        x = self.centers[label] + noise * self.spread[label, None]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self, n: int):
        for i, start in enumerate(range(0, n, CHUNK)):
            yield start, self.draw(min(CHUNK, n - start), stream=i + 1)

    def queries(self, n: int) -> np.ndarray:
        return self.draw(n, stream=0)  # stream 0 is never part of the catalog: held out


def exact_topk(mix: Mixture, n: int, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows by a streaming scan (the recall baseline)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_r = np.full((len(queries), k), -1, np.int64)
    for start, chunk in mix.chunks(n):
        scores = queries @ chunk.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        s = np.concatenate([best_s, np.take_along_axis(scores, part, 1)], axis=1)
        r = np.concatenate([best_r, part + start], axis=1)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
    return best_r


CONFIGS = {
    "flat": {"type": "flat"},
    "hnsw": {"type": "hnsw", "hnsw_m": 32, "ef_construction": 80, "ef_search": 128},
    "ivf": {"type": "ivf", "nprobe": 64},
    # one build, measured twice: PQ codes alone, then with the short list re-ranked from vectors.f32
    "ivfpq": {"type": "ivfpq", "nprobe": 64, "rerank": 200},
}


def worker(args: argparse.Namespace) -> None:
    """Build one configuration, then measure it; prints one JSON line."""
    import faiss
    import pandas as pd

    from fashion_lightning.retrieval import IndexParams, IndexWriter, load_index

    base_rss = _rss_mb()
    mix = Mixture(args.dim, args.clusters, args.seed)
    cfg = dict(CONFIGS[args.worker])
    cfg.update(json.loads(args.overrides or "{}"))
    params = IndexParams(**cfg, max_memory_gb=None)
    out = Path(args.workdir) / args.worker
    start = time.perf_counter()
    with IndexWriter(out, {"checkpoint": None, "embedding_name": "synthetic"}, params, normalize=False) as writer:
        for first, chunk in mix.chunks(args.n):
            writer.add(chunk, pd.DataFrame({"id": np.arange(first, first + len(chunk))}))
        manifest = writer.finalize()
    build_s = time.perf_counter() - start
    build_rss = _rss_mb()
    index = load_index(out, verify=False)  # IVF types memory-mapped
    queries = np.load(Path(args.workdir) / "queries.npy")
    truth = np.load(Path(args.workdir) / "truth.npy")
    variants = [(args.worker, index.params)]
    if index.params.rerank:  # one build, several short-list lengths (0 = PQ codes alone)
        lengths = [0, *sorted({index.params.rerank, *(args.rerank or [])})]
        variants = [
            (f"{args.worker}+rerank{r}" if r else args.worker, replace(index.params, rerank=r)) for r in lengths
        ]
    if args.nprobe and index.params.type in ("ivf", "ivfpq"):  # query-time knob: same build
        variants = [(f"{name} nprobe{p}", replace(v, nprobe=p)) for p in args.nprobe for name, v in variants]
    index.search(queries, K)  # warm-up: page in the mapped lists a query stream would keep hot
    for name, search_params in variants:
        index.params = search_params
        if search_params.type in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(index.faiss_index).nprobe = search_params.nprobe
        row = measure(index, queries, truth, args.single)
        print(json.dumps({
            "config": name,
            "factory": manifest.index["faiss_factory"],
            "params": {k: search_params.__dict__[k] for k in ("nlist", "nprobe", "pq_m", "train_size", "rerank",
                                                              "hnsw_m", "ef_construction", "ef_search")},
            "build_s": build_s,
            "peak_build_rss_mb": build_rss,
            "base_rss_mb": base_rss,
            "bytes_per_item": manifest.files["vectors.faiss"]["bytes"] / args.n,
            "rerank_bytes_per_item": manifest.files["vectors.f32"]["bytes"] / args.n if search_params.rerank else 0,
            **row,
        }))  # fmt: skip


def measure(index, queries: np.ndarray, truth: np.ndarray, single: int) -> dict[str, float]:
    n_single = min(len(queries), single)
    index.search(queries[:5], K)  # warm-up (page-in of small structures, bf16 copy for flat)
    lat = []
    for q in queries[:n_single]:
        t = time.perf_counter()
        index.search(q[None], K)
        lat.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    _, rows = index.search(queries, K)
    batch_s = time.perf_counter() - t
    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(rows, truth)]))
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "single_queries": n_single, "batch_qps": len(queries) / batch_s, "recall_at_10": recall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=300, help="queries timed one at a time")
    parser.add_argument("--types", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--overrides", default="", help='JSON IndexParams overrides for every type, e.g. {"nlist": 1024}'
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rerank", type=int, nargs="*", help="extra IVF-PQ short-list lengths to measure")
    parser.add_argument("--nprobe", type=int, nargs="*", help="IVF lists probed per query, measured on one build")
    parser.add_argument("--quick", action="store_true", help="20k items, 200 queries")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--cache", type=Path, help="folder to keep the exact top-10 in between runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.n, args.queries, args.single = 20_000, 200, 100
    mix = Mixture(args.dim, args.clusters, args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as workdir:
        queries = mix.queries(args.queries)
        key = f"truth_n{args.n}_d{args.dim}_c{args.clusters}_s{args.seed}_q{args.queries}.npy"
        if args.cache and (args.cache / key).is_file():  # same data, same queries: reuse the exact top-10
            truth = np.load(args.cache / key)
        else:
            t = time.perf_counter()
            truth = exact_topk(mix, args.n, queries, K)
            print(f"exact baseline: {args.n:,} x {args.dim}, {args.queries} queries, {time.perf_counter() - t:.1f} s",
                  flush=True)  # fmt: skip
            if args.cache:
                args.cache.mkdir(parents=True, exist_ok=True)
                np.save(args.cache / key, truth)
        np.save(Path(workdir) / "truth.npy", truth)
        np.save(Path(workdir) / "queries.npy", queries)
        for name in args.types:
            cmd = [sys.executable, __file__, "--worker", name, "--workdir", workdir, "--n", str(args.n),
                   "--dim", str(args.dim), "--clusters", str(args.clusters), "--seed", str(args.seed),
                   "--single", str(args.single), "--overrides", args.overrides,
                   "--rerank", *map(str, args.rerank or []), "--nprobe", *map(str, args.nprobe or [])]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            for line in done.stdout.strip().splitlines():
                rows.append(json.loads(line))
                print(line, flush=True)
            for f in (Path(workdir) / name).glob("*"):
                f.unlink()
    print(f"\nN={args.n:,} d={args.dim} clusters={args.clusters} queries={args.queries}")
    print("| index | faiss | build s | peak build RSS MB | bytes/item | p50 ms | p99 ms | batch QPS | recall@10 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        extra = f" (+{r['rerank_bytes_per_item']:.0f} on disk)" if r["rerank_bytes_per_item"] else ""
        print(f"| {r['config']} | {r['factory']} | {r['build_s']:.1f} | {r['peak_build_rss_mb']:.0f} | "
              f"{r['bytes_per_item']:.0f}{extra} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['batch_qps']:.0f} | "
              f"{r['recall_at_10']:.3f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
