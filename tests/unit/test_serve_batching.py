"""fashion-serve's worker processes batch the photos that wait for them, and answer each query its own rows."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fashion_lightning.serve import inference


class CountingEncoder:
    """Embedding = the photo's mean pixel; attribute = that mean as a string; counts forward passes."""

    embedding_name = "counting"

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def embed_and_predict(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[str]]]:
        self.entered.set()
        self.gate.wait(5)  # the first pass blocks until every query is waiting
        self.batches.append(len(images))
        means = images.float().mean(dim=(1, 2, 3))
        return means[:, None].repeat(1, 4), {"colour": [f"{m:.0f}" for m in means.tolist()]}


def test_waiting_photos_go_through_as_one_batch_and_each_query_gets_its_rows(monkeypatch):
    fake = CountingEncoder()
    monkeypatch.setattr(inference, "_ENCODER", fake)
    monkeypatch.setattr(inference, "_ERROR", None)
    pool = ThreadPoolExecutor(1)  # one "worker process", run in a thread with the fake model
    encoder = inference.ProcessEncoder("unused.ckpt", workers=1, max_batch=16, pool=pool).start()

    queries = [np.full((n, 3, 8, 6), value, dtype=np.uint8) for n, value in [(1, 10), (2, 20), (1, 30), (3, 40)]]
    with ThreadPoolExecutor(len(queries)) as clients:
        first = clients.submit(encoder.embed_and_predict, queries[0])  # occupies the only worker
        assert fake.entered.wait(5)  # the first query's forward pass is running
        rest = [clients.submit(encoder.embed_and_predict, q) for q in queries[1:]]
        threading.Event().wait(0.2)  # the rest queue up behind the busy worker
        fake.gate.set()
        answers = [first.result(5)] + [r.result(5) for r in rest]
    encoder.close()

    assert fake.batches == [1, 6]  # the three waiting queries (6 photos) shared one forward pass
    for query, (embedding, predicted) in zip(queries, answers):
        assert embedding.shape == (len(query), 4) and np.allclose(embedding, query[0, 0, 0, 0])
        assert predicted == {"colour": [str(int(query[0, 0, 0, 0]))] * len(query)}


class CountingTextEncoder:
    """Embedding of a text = its length; counts forward passes and how many texts each held."""

    embedding_name = "counting-text"

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        self.entered.set()
        self.gate.wait(5)
        self.batches.append(len(texts))
        return torch.tensor([[float(len(t))] * 3 for t in texts])


def test_waiting_text_queries_go_through_as_one_batch_beside_photos(monkeypatch):
    """Text queries batch like photos (issue 17), and a photo batcher waiting for photos never holds a worker
    that texts need (one worker)."""
    fake = CountingTextEncoder()
    monkeypatch.setattr(inference, "_ENCODER", fake)
    monkeypatch.setattr(inference, "_ERROR", None)
    pool = ThreadPoolExecutor(1)
    encoder = inference.ProcessEncoder("unused.ckpt", workers=1, max_batch=16, pool=pool).start()
    queries = [["red dress"], ["blue jeans", "black belt"], ["watch"], ["white sneakers", "cap", "scarf"]]
    with ThreadPoolExecutor(len(queries)) as clients:
        first = clients.submit(encoder.embed_texts, queries[0])
        assert fake.entered.wait(5)
        rest = [clients.submit(encoder.embed_texts, q) for q in queries[1:]]
        threading.Event().wait(0.2)
        fake.gate.set()
        answers = [first.result(5)] + [r.result(5) for r in rest]
    encoder.close()

    assert fake.batches == [1, 6]
    for query, embedding in zip(queries, answers):
        assert np.array_equal(embedding[:, 0], [len(t) for t in query])
