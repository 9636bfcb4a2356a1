"""fashion-serve under load while the index is reloaded: failed requests and p99, steady vs during reloads.

    python scripts/bench_reload.py                                  # two 20,000 x 256 versions, 8 clients
    python scripts/bench_reload.py --items 44000 --clients 8 --seconds 20 --reload-every 1.0

Starts ``fashion-serve index_dir=<dir>/current`` (a symlink) on 127.0.0.1 in its own process, then runs
``--clients`` keep-alive clients sending "more like this" queries (half with a gender filter) for
``--seconds`` twice: first steady (the baseline, same run), then while the ``current`` pointer flips between
two index versions and ``POST /admin/reload`` is called every ``--reload-every`` seconds. Reported: requests,
failures (non-200 or a short answer), p50 / p99 latency of each phase and their ratio, the versions that
answered. The goal: 0 failures, p99 during reloads <= 2x steady.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

from fashion_lightning.retrieval import build_index
from fashion_lightning.serve.reload import publish


def version(path: Path, n: int, dim: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "id": np.arange(1, n + 1),
        "gender": rng.choice(["Men", "Women", "Unisex"], n),
        "articleType": rng.choice(["Tshirts", "Shirts", "Watches", "Casual Shoes"], n),
        "image_sha1": [f"{i:040x}" for i in range(n)],
    })  # fmt: skip
    build_index(
        rng.normal(size=(n, dim)).astype(np.float32),
        frame,
        path,
        {"embedding_name": "bench", "model_identity": "b" * 64},
    )
    return path


def load(base: str, clients: int, seconds: float, n: int, stop_early: threading.Event | None = None):
    latencies: list[float] = []
    failures: list[str] = []
    versions: set[str] = set()
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=base, timeout=30) as http:
            while time.perf_counter() < end:
                body: dict = {"item_id": int(rng.integers(1, n + 1)), "k": 10}
                if rng.random() < 0.5:
                    body["filters"] = {"gender": "Women"}
                start = time.perf_counter()
                try:
                    response = http.post("/recommend", json=body)
                    ok = response.status_code == 200 and len(response.json()["results"]) == 10
                    detail = "" if ok else f"{response.status_code} {response.text[:120]}"
                except httpx.HTTPError as err:
                    ok, detail = False, repr(err)
                elapsed = (time.perf_counter() - start) * 1e3
                with lock:
                    if ok:
                        latencies.append(elapsed)
                        versions.add(response.json()["timings"]["index_version"])
                    else:
                        failures.append(detail)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.array(latencies), failures, versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--reload-every", type=float, default=1.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    v1, v2 = version(work / "v1", args.items, args.dim, 1), version(work / "v2", args.items, args.dim, 2)
    current = publish(work / "current", v1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "fashion_lightning.apps.serve", f"index_dir={current}", f"port={port}",
         f"hydra.run.dir={work / 'serve'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        steady, steady_failures, _ = load(base, args.clients, args.seconds, args.items)
        reloads, reload_ms, done = [], [], threading.Event()

        def reloader() -> None:
            target = v2
            with httpx.Client(base_url=base, timeout=60) as admin:
                while not done.is_set():
                    time.sleep(args.reload_every)
                    publish(current, target)
                    start = time.perf_counter()
                    response = admin.post("/admin/reload")
                    reload_ms.append((time.perf_counter() - start) * 1e3)
                    reloads.append(response.status_code)
                    target = v1 if target == v2 else v2

        thread = threading.Thread(target=reloader)
        thread.start()
        during, during_failures, versions = load(base, args.clients, args.seconds, args.items)
        done.set()
        thread.join()
    finally:
        server.terminate()
        server.wait(10)
    s50, s99 = np.percentile(steady, [50, 99])
    d50, d99 = np.percentile(during, [50, 99])
    print(f"{args.items:,} x {args.dim} flat index, 2 versions, {args.clients} clients, {args.seconds:g} s per phase")
    print(f"{'phase':<16} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'steady':<16} {len(steady):>9} {len(steady_failures):>7} {s50:>8.1f} {s99:>8.1f}")
    print(f"{'during reloads':<16} {len(during):>9} {len(during_failures):>7} {d50:>8.1f} {d99:>8.1f}")
    ok = sum(code == 200 for code in reloads)
    print(f"reloads: {ok}/{len(reloads)} answered 200 (median {np.median(reload_ms):.0f} ms each); "
          f"versions that answered: {len(versions)}")  # fmt: skip
    failed = len(steady_failures) + len(during_failures)
    print(f"p99 during reloads / steady: {d99 / s99:.2f} (goal <= 2); failed requests: {failed}")
    for failure in (steady_failures + during_failures)[:5]:
        print("  failed:", failure)


if __name__ == "__main__":
    main()
