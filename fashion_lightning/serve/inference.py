"""Forward passes in worker processes, so searches never wait for the model.

A forward pass is thousands of small Python-level module calls; in the server's own process they hold
the GIL often enough that item and history queries (pure search, ~1 ms) queue behind every photo
(measured on the 2-core box: item p50 100 ms with in-process inference threads, see README). Worker
processes have their own interpreters: the server process only decodes the photo, ships a 80x60 uint8
array (14 KB) and gets the embedding and predicted attributes back. ``workers`` bounds how many run at
once. Photos that arrive while every worker is busy wait together and go through as one batch (up to
``max_batch``): under load a forward pass then serves several shoppers for little more than the cost of one.
"""

from __future__ import annotations

import functools
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from fashion_lightning.retrieval import ModelLoadError

_ENCODER: Any = None  # the worker process's model
_ERROR: str | None = None


def _load(checkpoint: str, torch_threads: int | None, loader: Callable[[], Any] | None = None) -> None:
    """Worker initializer: load the checkpoint once (errors are kept and reported on the first call).
    ``loader`` (picklable) builds another encoder instead, e.g. ONNX Runtime's (``runtime=onnx``)."""
    global _ENCODER, _ERROR
    try:
        if loader is not None:
            _ENCODER = loader()
            return
        import torch

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        from fashion_lightning.models.base import load_module

        _ENCODER = load_module(checkpoint)
    except Exception as err:  # noqa: BLE001 - reported to the server as ModelLoadError
        _ERROR = f"cannot load the index's model {checkpoint}: {err}"


def _call(method: str, payload: Any) -> Any:
    if _ERROR is not None:
        raise ModelLoadError(_ERROR)
    if getattr(_ENCODER, "accepts_numpy", False):  # numpy in and out (ONNX Runtime): no torch in the worker
        return _call_numpy(method, payload)
    import torch

    with torch.inference_mode():
        if method == "ready":
            time.sleep(payload)  # keeps this worker busy so the next "ready" reaches another one
            return _ENCODER.embedding_name
        if method == "embed_texts":
            return _ENCODER.embed_texts(list(payload)).float().cpu().numpy()
        images = torch.from_numpy(payload)
        if method == "embed_and_predict":
            embedding, predictions = _ENCODER.embed_and_predict(images)
            return embedding.float().cpu().numpy(), predictions
        if method == "embed_images":
            return _ENCODER.embed_images(images).float().cpu().numpy()
        if method == "predict_attributes":
            return _ENCODER.predict_attributes(images)
    raise ValueError(f"unknown encoder method {method!r}")


def _call_numpy(method: str, payload: Any) -> Any:
    if method == "ready":
        time.sleep(payload)
        return _ENCODER.embedding_name
    if method in ("embed_texts", "embed_and_predict", "embed_images", "predict_attributes"):
        return getattr(_ENCODER, method)(list(payload) if method == "embed_texts" else payload)
    raise ValueError(f"unknown encoder method {method!r}")


class ProcessEncoder:
    """The :class:`~fashion_lightning.retrieval.queries.Encoder` protocol, answered by worker processes."""

    accepts_numpy = True  # the recommender hands over uint8 [B, 3, H, W] arrays, not torch tensors

    def __init__(
        self,
        checkpoint: str,
        workers: int = 1,
        torch_threads: int | None = 1,
        max_batch: int = 16,
        pool: Executor | None = None,
        loader: Callable[[], Any] | None = None,
    ) -> None:
        """``pool``: where forward passes run (default: ``workers`` spawned processes that load ``checkpoint``,
        or call ``loader`` for another encoder)."""
        self.pool = pool or ProcessPoolExecutor(
            max(1, workers), mp_context=multiprocessing.get_context("spawn"),
            initializer=_load, initargs=(checkpoint, torch_threads, loader),
        )  # fmt: skip
        self.workers = max(1, workers)
        self.max_batch = max(1, max_batch)
        self.embedding_name = ""
        self._photos: queue.SimpleQueue[tuple[np.ndarray, Future[Any]] | None] = queue.SimpleQueue()
        self._free = threading.Semaphore(self.workers)  # a batch leaves only when a worker is free
        self._batcher = threading.Thread(target=self._batch_photos, name="photo-batcher", daemon=True)

    def start(self) -> ProcessEncoder:
        """Start every worker and wait for its model (raises ModelLoadError for a bad checkpoint)."""
        futures = [self.pool.submit(_call, "ready", 0.5 if self.workers > 1 else 0.0) for _ in range(self.workers)]
        self.embedding_name = [f.result() for f in futures][0]
        self._batcher.start()
        return self

    def _run(self, method: str, payload: Any) -> Any:
        return self.pool.submit(_call, method, payload).result()

    def embed_and_predict(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, list[str]]]:
        """One query's photos; batched with the photos of other queries waiting at the same time."""
        answer: Future[Any] = Future()
        self._photos.put((np.ascontiguousarray(images), answer))
        return answer.result()

    def _batch_photos(self) -> None:
        """Wait for a free worker, then send every photo query waiting by then (up to max_batch) as one batch."""
        while True:
            self._free.acquire()
            first = self._photos.get()
            if first is None:
                return
            waiting = [first]
            while sum(len(images) for images, _ in waiting) < self.max_batch:
                try:
                    nxt = self._photos.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._photos.put(None)  # stop after this batch
                    break
                waiting.append(nxt)
            batch = np.concatenate([images for images, _ in waiting]) if len(waiting) > 1 else first[0]
            try:
                done = self.pool.submit(_call, "embed_and_predict", batch)
            except RuntimeError as err:  # the pool is shut down
                self._free.release()
                for _, answer in waiting:
                    answer.set_exception(err)
                continue
            done.add_done_callback(functools.partial(self._answer, waiting))

    def _answer(self, waiting: list[tuple[np.ndarray, Future[Any]]], result: Future[Any]) -> None:
        """Split a batch's embeddings and predictions back to the queries it served."""
        self._free.release()
        error = result.exception()
        start = 0
        for images, answer in waiting:
            if error is not None:
                answer.set_exception(error)
                continue
            embedding, predictions = result.result()
            rows = slice(start, start + len(images))
            answer.set_result((embedding[rows], {task: labels[rows] for task, labels in predictions.items()}))
            start += len(images)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        return self._run("embed_images", np.ascontiguousarray(images))

    def predict_attributes(self, images: np.ndarray) -> dict[str, list[str]]:
        return self._run("predict_attributes", np.ascontiguousarray(images))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self._run("embed_texts", list(texts))

    def close(self) -> None:
        self._photos.put(None)
        self.pool.shutdown(wait=False, cancel_futures=True)
