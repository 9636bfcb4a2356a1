"""fashion-serve's inference workers are supervised (issue 19): a killed worker is replaced and the request
it took down is answered by the replacement; ``/health`` says "degraded" (503) while no worker is alive and
recovers; a call that kills its worker twice is a clear error, not a hang; closing leaves no process behind.

Before: kill the worker and every photo query was a 500 for good while ``/health`` said ok.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from serve_workers import load_fake, nothing
from test_recommender import FakeEncoder, catalog, embed_catalog, png_bytes  # noqa: F401 (fixture)

from fashion_lightning.retrieval import Recommender, build_index
from fashion_lightning.serve import create_app
from fashion_lightning.serve.inference import ProcessEncoder, SupervisedPool, WorkerDiedError

pytestmark = pytest.mark.slow  # worker processes import torch: a few seconds each start


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait(condition, timeout: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_killed_worker_is_replaced_and_the_photo_query_still_answers(catalog, tmp_path):  # noqa: F811
    frame, images = catalog
    build_index(embed_catalog(FakeEncoder(), images), frame, tmp_path, {"embedding_name": "fake"})
    encoder = ProcessEncoder("unused", pool=SupervisedPool(1, initializer=load_fake, initargs=(1.5,))).start()
    client = TestClient(create_app(Recommender.from_dir(tmp_path, encoder=encoder), None))
    photo = {"photo": ("p.png", png_bytes(images[0]), "image/png")}
    try:
        assert client.post("/recommend/image", files=photo).status_code == 200
        assert client.get("/health").json() == {"status": "ok", "items": 160, "workers": 1, "alive": 1, "restarts": 0}
        (worker,) = encoder.pool.pids()

        with ThreadPoolExecutor(1) as asker:  # a query in flight when its worker is killed
            answer = asker.submit(client.post, "/recommend/image", files=photo)
            time.sleep(0.5)  # inside the 1.5 s forward pass
            os.kill(worker, signal.SIGKILL)
            assert _wait(lambda: client.get("/health").status_code == 503, 10)  # no worker alive: degraded
            degraded = client.get("/health")
            if degraded.status_code == 503:  # (the replacement may already be up on a fast machine)
                assert degraded.json()["status"] == "degraded" and degraded.json()["alive"] == 0
            response = answer.result(120)
        assert response.status_code == 200, response.text  # retried on the replacement
        assert [r["id"] for r in response.json()["results"]][:1] != [1000]  # itself and its copies excluded
        assert _wait(lambda: client.get("/health").status_code == 200)
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["alive"] == 1 and health["restarts"] == 1
        assert encoder.pool.pids() != [worker] and _gone(worker)
        assert client.post("/recommend/image", files=photo).status_code == 200  # and later ones too
        replacement = encoder.pool.pids()
    finally:
        encoder.close()
    assert all(_gone(pid) for pid in replacement)  # closing reaps every worker


def test_a_call_that_kills_its_worker_twice_is_a_clear_error():
    pool = SupervisedPool(1, initializer=nothing)
    try:
        assert pool.submit(abs, -3).result(60) == 3
        with pytest.raises(WorkerDiedError, match="died twice"):
            pool.submit(os._exit, 1).result(120)  # dies, is sent to the replacement, kills it too
        assert pool.submit(abs, -4).result(60) == 4  # the pool heals
        assert pool.restarts == 2
        pids = pool.pids()
    finally:
        pool.shutdown()
    assert pids and all(_gone(pid) for pid in pids)
