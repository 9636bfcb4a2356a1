"""Load test for fashion-serve: start the server on 127.0.0.1, send a bounded mixed load, report latencies.

    python scripts/bench_serve.py --index outputs/index/runs/<run>/index
    python scripts/bench_serve.py --index DIR --requests 2000 --concurrency 8 --mix item=0.45,history=0.35,photo=0.2
    python scripts/bench_serve.py --index DIR --runtimes torch,onnx --onnx-dir <fashion-export folder> --mix photo=1

The load is a fixed number of requests (the generator stops by itself) from ``--concurrency`` clients
over keep-alive connections: item ("more like this"), history (3-5 likes + 1 dislike) and photo queries
(catalog photos uploaded as files). Reported per kind: p50 / p95 / p99 / mean latency (client side,
request sent -> JSON read), errors (non-200 or exceptions), and overall throughput.

Baseline, measured in the same run: the same queries answered in-process by ``Recommender`` one at a time
(no HTTP, no concurrency), so ``p50 / in-process p50`` is what serving adds. Client and server share the
machine's cores: on a small box the generator's own CPU time is part of the measured latency.

``--runtimes torch,onnx`` runs the same requests against one server per runtime (``runtime=onnx
onnx_dir=...`` for the ONNX Runtime encoder of a fashion-export folder), one after the other in this run, and
ends with the ratio of each runtime's p50 / p99 to the first one's. An ONNX runtime takes modifiers:
``onnx+int8`` serves the export's int8 graph (``onnx_precision=int8``), ``onnx+thread`` runs the graph in the
server's own threads (``inference=thread``: ONNX Runtime releases the GIL, concurrent photos share passes)
instead of worker processes, e.g. ``--runtimes torch,onnx,onnx+thread,onnx+int8+thread``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = ("item", "history", "photo")


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name not in KINDS:
            raise SystemExit(f"--mix: unknown kind {name!r} (kinds: {', '.join(KINDS)})")
        mix[name] = float(share)
    total = sum(mix.values())
    if total <= 0:
        raise SystemExit("--mix: shares must sum to more than 0")
    return {k: v / total for k, v in mix.items()}


def make_requests(index_dir: Path, n: int, mix: dict[str, float], k: int, seed: int) -> list[tuple[str, object]]:
    """``n`` (kind, payload) pairs drawn from the index's own items and the catalog's photos."""
    from fashion_lightning.data.source import CatalogSource
    from fashion_lightning.retrieval import load_index

    index = load_index(index_dir, verify=False)
    rng = random.Random(seed)
    ids = [int(i) for i in index.ids]
    source = CatalogSource(index.model_info["catalog"]) if "photo" in mix else None
    photos = []
    if source is not None:
        for item in rng.sample(ids, min(64, len(ids))):
            data = source.image_bytes(item)
            if data:
                photos.append((f"{item}.jpg", data))
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=n)
    out: list[tuple[str, object]] = []
    for kind in kinds:
        if kind == "item":
            out.append((kind, {"item_id": rng.choice(ids), "k": k}))
        elif kind == "history":
            picks = rng.sample(ids, rng.randint(4, 6))
            out.append((kind, {"history": picks[:-1], "disliked": picks[-1:], "half_life": 3, "k": k}))
        else:
            out.append((kind, rng.choice(photos)))
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(index_dir: Path, port: int, overrides: list[str], run_dir: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "fashion_lightning.apps.serve",
        f"index_dir={index_dir}",
        "host=127.0.0.1",
        f"port={port}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(run_dir / "server.log", "wb"))


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> float:
    import httpx

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}; see its server.log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not answer /health within {timeout:.0f} s")


async def send(client, kind: str, payload) -> tuple[int, float | None]:
    """Status and the server's own time for the request (``timings.server_ms``)."""
    if kind == "photo":
        name, data = payload
        response = await client.post("/recommend/image", files={"photo": (name, data, "image/jpeg")}, data={"k": "10"})
    else:
        response = await client.post("/recommend", json=payload)
    body = response.json()
    return response.status_code, body.get("timings", {}).get("server_ms") if response.status_code == 200 else None


async def run_load(url: str, requests: list[tuple[str, object]], concurrency: int) -> tuple[dict, float]:
    import httpx

    stats = {kind: {"latency": [], "server": [], "errors": 0, "statuses": {}} for kind in KINDS}
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client) -> None:
        while queue:
            kind, payload = queue.pop()
            start = time.perf_counter()
            try:
                status, server_ms = await send(client, kind, payload)
            except Exception as err:  # noqa: BLE001 - every failure counts as an error
                status, server_ms = type(err).__name__, None
            stats[kind]["latency"].append((time.perf_counter() - start) * 1e3)
            if server_ms is not None:
                stats[kind]["server"].append(server_ms)
            if status != 200:
                stats[kind]["errors"] += 1
                stats[kind]["statuses"][str(status)] = stats[kind]["statuses"].get(str(status), 0) + 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return stats, wall


def in_process_baseline(
    index_dir: Path, requests: list[tuple[str, object]], per_kind: int, onnx_dir: Path | None = None,
    precision: str = "fp32",
) -> dict[str, float]:  # fmt: skip
    """p50 of the same queries answered by Recommender directly, one at a time (after one warm-up each)."""
    from fashion_lightning.retrieval import Recommender

    recommender = Recommender.from_dir(index_dir)
    if onnx_dir is not None:  # the export's ONNX Runtime encoder, one intra-op thread like the server's default
        from fashion_lightning.deploy.onnx_encoder import load_onnx_encoder

        identity = recommender.index.model_info.get("model_identity")
        encoder = load_onnx_encoder(onnx_dir, 1, precision, identity=identity)
        recommender = Recommender(recommender.index, encoder)
    out = {}
    for kind, payload in requests[:3]:  # warm-up: model load, first-call allocations
        if kind == "photo":
            recommender.by_images(payload[1], 10)
    for kind in KINDS:
        sample = [payload for k, payload in requests if k == kind][: per_kind + 1]
        if not sample:
            continue
        times = []
        for payload in sample:
            start = time.perf_counter()
            if kind == "photo":
                recommender.by_images(payload[1], 10)
            elif kind == "item":
                recommender.by_item(payload["item_id"], payload["k"])
            else:
                recommender.by_history(
                    payload["history"], payload["k"], disliked=payload["disliked"], half_life=payload["half_life"]
                )
            times.append((time.perf_counter() - start) * 1e3)
        out[kind] = float(np.median(times[1:] or times))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, required=True, help="index folder from fashion-index")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--mix", default="item=0.45,history=0.35,photo=0.2")
    parser.add_argument("--warmup", type=int, default=40, help="requests sent (and not counted) before the load")
    parser.add_argument("--baseline", type=int, default=50, help="in-process queries per kind (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON here")
    parser.add_argument(
        "--runtimes", default="torch", help="comma-separated, run in this order: torch, onnx[+int8][+thread]"
    )
    parser.add_argument("--onnx-dir", type=Path, help="fashion-export folder of the index's model (runtime onnx)")
    parser.add_argument("server_overrides", nargs="*", help="fashion-serve overrides, e.g. torch_threads=1")
    args = parser.parse_args()
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not runtimes or any(runtime_overrides(r, Path(".")) is None for r in runtimes):
        raise SystemExit(f"--runtimes: torch or onnx[+int8][+thread], comma-separated; got {args.runtimes!r}")
    if any(r.startswith("onnx") for r in runtimes) and args.onnx_dir is None:
        raise SystemExit("--runtimes onnx needs --onnx-dir (a fashion-export folder of the index's model)")
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")  # the baseline searches like the server does (search_threads=1)
    mix = parse_mix(args.mix)
    requests = make_requests(args.index, args.requests + args.warmup, mix, 10, args.seed)
    warmup, requests = requests[: args.warmup], requests[args.warmup :]
    reports = {runtime: bench_runtime(args, runtime, warmup, requests) for runtime in runtimes}
    if len(reports) > 1:
        first = runtimes[0]
        print(f"ratios to {first} (same requests, this run): p50 / p99 client side; server p50")
        for runtime in runtimes[1:]:
            for kind, stats in reports[runtime]["kinds"].items():
                ref = reports[first]["kinds"].get(kind)
                if ref:
                    print(
                        f"  {runtime:18} {kind:8} p50 x{stats['p50_ms'] / ref['p50_ms']:.2f}  "
                        f"p99 x{stats['p99_ms'] / ref['p99_ms']:.2f}  server p50 x"
                        f"{stats['server_p50_ms'] / ref['server_p50_ms']:.2f}"
                    )
    if args.out:
        args.out.write_text(json.dumps(reports if len(reports) > 1 else reports[runtimes[0]], indent=2) + "\n")
    if any(sum(s["errors"] for s in r["kinds"].values()) for r in reports.values()):
        raise SystemExit(1)


def runtime_overrides(runtime: str, onnx_dir: Path | None) -> list[str] | None:
    """fashion-serve overrides of a ``--runtimes`` entry (None: not one)."""
    base, *modifiers = runtime.split("+")
    if base == "torch" and not modifiers:
        return []  # the server's default
    if base != "onnx" or len(set(modifiers)) != len(modifiers) or set(modifiers) - {"int8", "thread"}:
        return None
    extra = {"int8": "onnx_precision=int8", "thread": "inference=thread"}
    return ["runtime=onnx", f"onnx_dir={onnx_dir}", *(extra[m] for m in modifiers)]


def bench_runtime(args: argparse.Namespace, runtime: str, warmup: list, requests: list) -> dict:
    """One server with ``runtime`` under the load; prints its table and returns its numbers."""
    onnx_dir = args.onnx_dir if runtime.startswith("onnx") else None
    overrides = [*args.server_overrides, *(runtime_overrides(runtime, onnx_dir) or [])]
    precision = "int8" if "+int8" in runtime else "fp32"
    baseline = in_process_baseline(args.index, requests, args.baseline, onnx_dir, precision) if args.baseline else {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as run_dir:
        server = start_server(args.index, port, overrides, Path(run_dir))
        try:
            startup = wait_healthy(url, server, timeout=600)
            asyncio.run(run_load(url, warmup, args.concurrency))
            load_before = os.getloadavg()[0]
            stats, wall = asyncio.run(run_load(url, requests, args.concurrency))
            load_after = os.getloadavg()[0]
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()

    total_errors = sum(s["errors"] for s in stats.values())
    print(
        f"fashion-serve bench (runtime={runtime}): {len(requests)} requests, {args.concurrency} concurrent, "
        f"mix {args.mix}; "
        f"index {args.index} ({platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M %Z')})"
    )
    print(
        f"server start-up to first /health: {startup:.1f} s; load wall {wall:.2f} s; "
        f"throughput {len(requests) / wall:.1f} req/s; errors {total_errors}; "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print("latency = client side (send -> JSON read); server p50/p99 = the app's own time (timings.server_ms)")
    header = (
        f"{'kind':8} {'n':>5} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8} "
        f"{'server p50':>10} {'server p99':>10} {'in-proc p50':>11} {'p50 ratio':>9}"
    )
    print(header)
    report = {
        "runtime": runtime,
        "requests": len(requests),
        "concurrency": args.concurrency,
        "mix": parse_mix(args.mix),
        "wall_s": wall,
        "throughput_rps": len(requests) / wall,
        "startup_s": startup,
        "load_average": [load_before, load_after],
        "kinds": {},
    }
    for kind in KINDS:
        lat = np.asarray(stats[kind]["latency"])
        if not len(lat):
            continue
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        base = baseline.get(kind)
        ratio = f"{p50 / base:9.2f}" if base else f"{'-':>9}"
        base_text = f"{base:11.2f}" if base else f"{'-':>11}"
        server = np.asarray(stats[kind]["server"]) if stats[kind]["server"] else np.asarray([np.nan])
        s50, s99 = np.percentile(server, [50, 99])
        print(
            f"{kind:8} {len(lat):5d} {stats[kind]['errors']:6d} {p50:8.2f} {p95:8.2f} {p99:8.2f} {lat.mean():8.2f} "
            f"{s50:10.2f} {s99:10.2f} {base_text} {ratio}"
        )
        report["kinds"][kind] = {
            "n": int(len(lat)),
            "errors": stats[kind]["errors"],
            "statuses": stats[kind]["statuses"],
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "mean_ms": float(lat.mean()),
            "server_p50_ms": float(s50),
            "server_p99_ms": float(s99),
            "in_process_p50_ms": base,
        }
    return report


if __name__ == "__main__":
    main()
