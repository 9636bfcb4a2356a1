"""Benchmark the retrieval index against a numpy baseline and the memory-bandwidth bound.

For each dimension: index build time, single-query p50/p95 latency, 1,000-query batched throughput,
all measured in the same run as

* the numpy baseline: ``V @ q`` (``Q @ V.T`` for batches) + ``argpartition`` + sort of the top k;
* the memory-bandwidth bound: the time to read V once. A single exact query must stream all N x D
  floats from RAM, so nothing can answer it faster. We measure it as ``V @ ones`` over the index's own
  storage with numpy's multi-threaded BLAS (the fastest full read we found from Python; ``V.sum()`` is
  single-threaded pairwise summation and slower), i.e. a query's access pattern minus the top-k. It
  includes the BLAS threads' wake-up, which is why small D shows fewer GB/s.

It also sweeps faiss's ``distance_compute_blas_threshold`` (shipped default vs the value the index
module sets) over batch sizes, since that switch decides between faiss's per-query SIMD loop and BLAS.

    python scripts/bench_retrieval.py            # N = 44,000, D in 512 384 1280 2048
    python scripts/bench_retrieval.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import faiss
import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits

from fashion_lightning.retrieval import build_index, configure_threads, load_index
from fashion_lightning.retrieval.flat import BATCH_MIN_QUERIES, bf16_available

# faiss's own value: importing the package leaves it alone (configure_threads sets ours, once)
DEFAULT_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold

TARGET_SINGLE_RATIO = 1.5
TARGET_BATCH_QPS_512 = 4000


def once(fn: Callable[[], object]) -> float:
    """Wall time in seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def numpy_single(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ q
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def numpy_batch(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
    return np.take_along_axis(top, order, 1)


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_dim(n: int, d: int, args: argparse.Namespace, workdir: str) -> dict[str, float]:
    vectors = unit_vectors(n, d, seed=d)
    meta = pd.DataFrame({"id": np.arange(n, dtype=np.int64)})
    ones = np.ones(d, np.float32)

    start = time.perf_counter()
    plain = faiss.IndexFlatIP(d)
    plain.add(vectors)
    build_faiss = time.perf_counter() - start
    start = time.perf_counter()
    build_index(vectors, meta, f"{workdir}/d{d}", {"embedding_name": "bench"})
    build_folder = time.perf_counter() - start
    start = time.perf_counter()
    index = load_index(f"{workdir}/d{d}")
    load_s = time.perf_counter() - start

    stored = index.vectors()  # the memory a query streams through (zero-copy view)
    singles = unit_vectors(args.single, d, seed=1)
    lat: dict[str, list[float]] = {"bound": [], "ours": [], "faiss": [], "numpy": []}
    for q in singles:  # interleaved, so background load on shared cores hits all four alike
        for name, fn in (
            ("bound", lambda: stored @ ones),
            ("ours", lambda q=q: index.search(q[None], args.k)),  # q=q: bind this query (B023)
            ("faiss", lambda q=q: plain.search(q[None], args.k)),
            ("numpy", lambda q=q: numpy_single(vectors, q, args.k)),
        ):
            start = time.perf_counter()
            fn()
            lat[name].append(time.perf_counter() - start)
    bound = float(np.median(lat.pop("bound")))
    row: dict[str, float] = {
        "bound_ms": bound * 1e3,
        "GB/s": vectors.nbytes / bound / 1e9,
        "build_faiss_s": build_faiss,
        "build_folder_s": build_folder,
        "load_s": load_s,
    }
    for name, values in lat.items():
        row[f"{name}_p50_ms"] = float(np.percentile(values, 50)) * 1e3
        row[f"{name}_p95_ms"] = float(np.percentile(values, 95)) * 1e3

    queries = unit_vectors(args.batch, d, seed=2)
    batch_fns = {
        "ours": lambda: index.search(queries, args.k),
        "faiss": lambda: plain.search(queries, args.k),
        "numpy": lambda: numpy_batch(vectors, queries, args.k),
    }
    times: dict[str, list[float]] = {name: [] for name in batch_fns}
    for fn in batch_fns.values():  # warm-up (bf16 copy, BLAS buffers)
        fn()
    for _ in range(args.repeats):  # interleaved; best-of-repeats is the least-disturbed run (as timeit does)
        for name, fn in batch_fns.items():
            times[name].append(once(fn))
    for name, values in times.items():
        row[f"{name}_qps"] = args.batch / min(values)
        row[f"{name}_qps_median"] = args.batch / float(np.median(values))
    _, ours = index.search(queries, args.k)
    row["agree"] = float((ours == numpy_batch(vectors, queries, args.k)).mean())
    return row


def blas_sweep(n: int, d: int, args: argparse.Namespace) -> Table:
    """faiss flat search time per batch size, shipped threshold vs ours (interleaved, best of repeats)."""
    vectors = unit_vectors(n, d, seed=d)
    index = faiss.IndexFlatIP(d)
    index.add(vectors)
    ours = faiss.cvar.distance_compute_blas_threshold
    table = Table(title=f"faiss distance_compute_blas_threshold, N={n:,} D={d}: ms per batch (best of {args.repeats})")
    for col in ("nq", f"shipped={DEFAULT_BLAS_THRESHOLD}", f"ours={ours}", "speed-up"):
        table.add_column(col, justify="right")
    for nq in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        q = unit_vectors(nq, d, seed=nq)
        index.search(q, args.k)  # warm-up
        best = {DEFAULT_BLAS_THRESHOLD: np.inf, ours: np.inf}
        for _ in range(args.repeats):
            for threshold in best:
                faiss.cvar.distance_compute_blas_threshold = threshold
                best[threshold] = min(best[threshold], once(lambda q=q: index.search(q, args.k)) * 1e3)
        faiss.cvar.distance_compute_blas_threshold = ours
        shipped, mine = best[DEFAULT_BLAS_THRESHOLD], best[ours]
        table.add_row(str(nq), f"{shipped:.2f}", f"{mine:.2f}", f"{shipped / mine:.2f}x")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=44_000, help="catalog size")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 384, 1280, 2048])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--single", type=int, default=100, help="single queries timed per dimension")
    parser.add_argument("--batch", type=int, default=1000, help="queries in the batched run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="faiss/BLAS threads (default: CPUs usable)")
    parser.add_argument("--quick", action="store_true", help="N=10,000, D=512, few repeats")
    args = parser.parse_args()
    if args.quick:
        args.n, args.dims, args.single, args.repeats = 10_000, [512], 50, 2
    threads = configure_threads(args.threads)  # faiss's OpenMP pool; BLAS and torch get the same count
    threadpool_limits(threads)
    torch.set_num_threads(threads)
    console = Console(width=None if Console().is_terminal else 200)  # no wrapping when piped to a file
    load = os.getloadavg()[0]
    console.print(
        f"N={args.n:,} k={args.k} threads={threads} faiss {faiss.__version__} "
        f"bf16 GEMM: {bf16_available()} (batches >= {BATCH_MIN_QUERIES} queries) load avg {load:.2f}"
    )

    table = Table(title="retrieval benchmark (ratios: vs the bandwidth bound / vs numpy)")
    for col in (
        "D",
        "bound ms (GB/s)",
        "build s faiss / folder / load",
        "single p50 ms ours / faiss / numpy",
        "p95 ms ours / faiss / numpy",
        "p50 / bound",
        "batch q/s ours / faiss / numpy (best)",
        "ours median q/s",
        "ours / numpy",
        "top-k = numpy",
    ):
        table.add_column(col, justify="right")
    verdicts = []
    with tempfile.TemporaryDirectory() as workdir:
        for d in args.dims:
            r = bench_dim(args.n, d, args, workdir)
            ratio = r["ours_p50_ms"] / r["bound_ms"]
            table.add_row(
                str(d),
                f"{r['bound_ms']:.2f} ({r['GB/s']:.1f})",
                f"{r['build_faiss_s']:.2f} / {r['build_folder_s']:.2f} / {r['load_s']:.2f}",
                f"{r['ours_p50_ms']:.2f} / {r['faiss_p50_ms']:.2f} / {r['numpy_p50_ms']:.2f}",
                f"{r['ours_p95_ms']:.2f} / {r['faiss_p95_ms']:.2f} / {r['numpy_p95_ms']:.2f}",
                f"{ratio:.2f}x",
                f"{r['ours_qps']:,.0f} / {r['faiss_qps']:,.0f} / {r['numpy_qps']:,.0f}",
                f"{r['ours_qps_median']:,.0f}",
                f"{r['ours_qps'] / r['numpy_qps']:.2f}x",
                f"{r['agree']:.4f}",
            )
            verdicts.append(
                f"D={d}: single p50 {ratio:.2f}x bound (target <= {TARGET_SINGLE_RATIO}x): "
                f"{'PASS' if ratio <= TARGET_SINGLE_RATIO else 'FAIL'}"
            )
            if d == 512:
                ok = r["ours_qps"] >= TARGET_BATCH_QPS_512
                verdicts.append(
                    f"D=512: batched {r['ours_qps']:,.0f} q/s best, {r['ours_qps_median']:,.0f} median "
                    f"(target >= {TARGET_BATCH_QPS_512:,}): {'PASS' if ok else 'FAIL'}"
                )
    console.print(table)
    sweep_dim = 512 if 512 in args.dims else args.dims[0]
    console.print(blas_sweep(args.n, sweep_dim, args))
    for line in verdicts:
        console.print(line)
    console.print(f"load avg at end {os.getloadavg()[0]:.2f} (other processes on these cores skew every number)")


if __name__ == "__main__":
    main()
