"""fashion-serve hot reload: a new index version under 8 concurrent clients, with no failed request."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import cast

import httpx
import numpy as np
import pandas as pd
import pytest
import uvicorn
from fastapi.testclient import TestClient

from fashion_lightning.retrieval import Recommender, build_index
from fashion_lightning.serve.app import create_app
from fashion_lightning.serve.reload import LiveRecommender, load_sharing, publish

N, D = 3000, 32
INFO = {"embedding_name": "test", "model_identity": "c" * 64}


def _index(path: Path, seed: int, n: int = N, identity: str = INFO["model_identity"]) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "id": np.arange(1, n + 1),
        "gender": rng.choice(["Men", "Women"], n),
        "articleType": rng.choice(["Shirts", "Jeans"], n),
        "image_sha1": [f"{i:040x}" for i in range(n)],
    })  # fmt: skip
    build_index(rng.normal(size=(n, D)).astype(np.float32), frame, path, {**INFO, "model_identity": identity})
    return path


def _live(path: Path, token: str | None) -> LiveRecommender:
    return LiveRecommender(Recommender.from_dir(path), path, load_sharing(False, False), token)


class _Server:
    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_reload_under_eight_concurrent_clients_fails_no_request(tmp_path):
    v1, v2 = _index(tmp_path / "v1", 1), _index(tmp_path / "v2", 2, n=N - 100)  # v2 retired 100 items
    live = _live(v1, token=None)  # no token: this machine only (the real server sees 127.0.0.1)
    versions = {live.index.version: "v1", Recommender.from_dir(v2).index.version: "v2"}
    failures, seen, stop = [], [], threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                body = {"item_id": int(rng.integers(1, N - 100)), "k": 10, "filters": {"gender": "Women"}}
                response = http.post("/recommend", json=body)
                if response.status_code != 200 or len(response.json()["results"]) != 10:
                    failures.append((response.status_code, response.text[:200]))
                else:
                    seen.append(response.json()["timings"]["index_version"])

    with _Server(create_app(cast(Recommender, live))) as base:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=base, timeout=60) as admin:
            for i in range(6):
                time.sleep(0.3)
                target = v2 if i % 2 == 0 else v1
                response = admin.post("/admin/reload", json={"index_dir": str(target)})
                assert response.status_code == 200, response.text
                assert versions[response.json()["version"]] == target.name
                assert admin.get("/info").json()["index"]["version"] == response.json()["version"]
            stop.set()
            for t in threads:
                t.join()
            assert admin.get("/info").json()["index"]["count"] == N  # the last reload went back to v1
    assert failures == [] and len(seen) > 50
    assert {versions[v] for v in seen} == {"v1", "v2"}  # both versions answered, each saying which


def test_reload_guard_model_check_bad_folder_and_current_pointer(tmp_path):
    v1, v2 = _index(tmp_path / "v1", 1), _index(tmp_path / "v2", 2)
    other_model = _index(tmp_path / "other", 3, identity="d" * 64)
    live = _live(v1, token="s3cret")
    http = TestClient(create_app(cast(Recommender, live)))
    before = live.index.version
    assert http.post("/admin/reload").status_code == 403  # no token
    assert http.post("/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 403
    auth = {"Authorization": "Bearer s3cret"}
    response = http.post("/admin/reload", json={"index_dir": str(other_model)}, headers=auth)
    assert response.status_code == 409 and "another model" in response.json()["detail"]
    (tmp_path / "broken").mkdir()
    response = http.post("/admin/reload", json={"index_dir": str(tmp_path / "broken")}, headers=auth)
    assert response.status_code == 422 and "manifest.json" in response.json()["detail"]
    assert live.index.version == before and http.post("/recommend", json={"item_id": 5}).status_code == 200
    # the `current` pointer: the server was started on a symlink; flip it, reload without a body
    current = publish(tmp_path / "current", v1)
    live = _live(current, token=None)
    local = TestClient(create_app(cast(Recommender, live)), client=("127.0.0.1", 5000))
    publish(current, v2)
    response = local.post("/admin/reload")
    assert response.status_code == 200 and response.json()["previous"] == before
    assert response.json()["version"] == local.get("/info").json()["index"]["version"] != before
    result = local.post("/recommend", json={"item_id": 7, "k": 3}).json()
    assert result["timings"]["index_version"] == response.json()["version"]
    assert TestClient(create_app(cast(Recommender, live))).post("/admin/reload").status_code == 403  # not local
    assert json.loads((v2 / "manifest.json").read_text())["count"] == N


def test_qdrant_local_reload_shares_the_client(tmp_path):
    pytest.importorskip("qdrant_client")
    from fashion_lightning.retrieval.qdrant import QdrantIndexWriter, QdrantTarget

    target = QdrantTarget(collection="c", path=str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"id": np.arange(1, 201), "gender": rng.choice(["Men", "Women"], 200)})
    for name in ("q1", "q2"):
        writer = QdrantIndexWriter(tmp_path / name, INFO, target)
        writer.add(rng.normal(size=(200, D)).astype(np.float32), frame)
        writer.finalize()
        writer.store(D).client.close()
    live = LiveRecommender(
        Recommender.from_dir(tmp_path / "q1", allow_qdrant_local=True), tmp_path / "q1", load_sharing(False, True)
    )
    local = TestClient(create_app(cast(Recommender, live)), client=("127.0.0.1", 5000))
    response = local.post("/admin/reload", json={"index_dir": str(tmp_path / "q2")})
    assert response.status_code == 200, response.text
    assert local.post("/recommend", json={"item_id": 3, "k": 5}).status_code == 200
    live.index.close()
