"""Forward passes in worker processes, so searches never wait for the model.

A forward pass is thousands of small Python-level module calls; in the server's own process they hold
the GIL often enough that item and history queries (pure search, ~1 ms) queue behind every photo
(measured on the 2-core box: item p50 100 ms with in-process inference threads, see README). Worker
processes have their own interpreters: the server process only decodes the photo, ships a 80x60 uint8
array (14 KB) and gets the embedding and predicted attributes back. ``workers`` bounds how many run at
once. Photos that arrive while every worker is busy wait together and go through as one batch (up to
``max_batch``): under load a forward pass then serves several shoppers for little more than the cost of one.

The workers are supervised (:class:`SupervisedPool`): one that dies (killed, out of memory, a crash in
native code) is replaced at once and the calls it took down are sent again, once; the pool reports how
many workers are alive (``/health`` says "degraded" while none is), and workers end with the server, or
with its death, never outliving it. What a worker loads is its initializer's business, so another
encoder (another runtime) plugs in by its own initializer and keeps the supervision.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_for_sentinels
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


class WorkerDiedError(ModelLoadError):
    """A call's worker process died, and so did the replacement it was sent to again."""


def _supervised_init(parent_pid: int, initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    """Worker start: leave SIGINT / SIGTERM to the server (it drains, then stops its workers), die with the
    server even when it is killed (a polling thread: the kernel's PDEATHSIG follows the spawning *thread*,
    and pool threads come and go), then run the encoder's own initializer."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    initializer(*initargs)


class SupervisedPool(Executor):
    """``workers`` spawned processes that a supervisor thread replaces when one dies.

    A process pool is broken for good once a worker dies (every later call fails): the supervisor waits
    on the workers' sentinels, and on a death starts a new pool (its workers load the model again: the
    pool is "degraded", ``alive == 0``, until one is ready) and sends the calls the death failed to it,
    once each; a call that fails that way twice raises :class:`WorkerDiedError`. Restarts back off
    (``min_restart_gap_s`` doubling to 30 s) while workers keep dying within a minute of starting.
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., None],
        initargs: tuple[Any, ...] = (),
        warmup: Callable[[], Future[Any]] | None = None,
        min_restart_gap_s: float = 0.5,
    ) -> None:
        self.workers = max(1, workers)
        self._init = (initializer, initargs)
        self._lock = threading.Lock()
        self._retries: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...], int]]
        self._retries = queue.SimpleQueue()
        self._closed = threading.Event()
        self.restarts = 0
        self._gap = self._min_gap = min_restart_gap_s
        self._started_at = time.monotonic()
        self._generation = 0
        self._ready = 0
        self._pool = self._new_pool()
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._supervisor.start()

    def _new_pool(self) -> ProcessPoolExecutor:
        initializer, initargs = self._init
        pool = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_supervised_init, initargs=(os.getpid(), initializer, initargs),
        )  # fmt: skip
        self._ready = 0
        generation = self._generation
        for _ in range(self.workers):  # spawn every worker now (from this long-lived thread) and count ready ones
            pool.submit(_call, "ready", 0.5 if self.workers > 1 else 0.0).add_done_callback(
                functools.partial(self._warmed, generation)
            )
        return pool

    def _warmed(self, generation: int, done: Future[Any]) -> None:
        if generation == self._generation and not done.cancelled() and done.exception() is None:
            with self._lock:
                self._ready += 1

    # -- Executor ------------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a worker; a worker's death sends it to the replacement pool once."""
        outer: Future[Any] = Future()
        self._send(outer, fn, args, attempt=0)
        return outer

    def _send(self, outer: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], attempt: int) -> None:
        if self._closed.is_set():
            outer.set_exception(RuntimeError("the inference workers are stopped (the server is shutting down)"))
            return
        with self._lock:
            pool, generation = self._pool, self._generation
        try:
            inner = pool.submit(fn, *args)
        except (RuntimeError, BrokenProcessPool):  # broken or being replaced: the supervisor sends it on
            self._retries.put((outer, fn, args, attempt))
            return
        inner.add_done_callback(functools.partial(self._settle, outer, fn, args, attempt, generation))

    def _settle(
        self,
        outer: Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        attempt: int,
        generation: int,
        inner: Future[Any],
    ) -> None:
        if inner.cancelled():  # queued on a pool that was replaced: not this call's fault
            self._retries.put((outer, fn, args, attempt))
            return
        error = inner.exception()
        if isinstance(error, BrokenProcessPool):
            if attempt >= 1:
                outer.set_exception(
                    WorkerDiedError("the inference worker died twice on this request (its replacement too)")
                )
                return
            self._retries.put((outer, fn, args, attempt + 1))
            return
        if error is not None:
            outer.set_exception(error)
        else:
            outer.set_result(inner.result())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop supervising and stop every worker: asked to exit, then terminated, then killed (reaped)."""
        self._closed.set()
        with self._lock:
            pool = self._pool
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + (5.0 if wait else 1.0)
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)
        self._supervisor.join(2.0)
        while True:  # calls nobody will answer now
            try:
                outer, *_ = self._retries.get_nowait()
            except queue.Empty:
                break
            if not outer.done():
                outer.set_exception(RuntimeError("the inference workers are stopped (the server is shutting down)"))

    # -- supervision ---------------------------------------------------------------------------------
    def health(self) -> dict[str, int]:
        """Workers configured, alive (started, model loaded, process running), replaced so far."""
        with self._lock:
            pool, ready = self._pool, self._ready
        processes = list((getattr(pool, "_processes", None) or {}).values())
        running = sum(1 for p in processes if p.is_alive())
        return {"workers": self.workers, "alive": min(ready, running), "restarts": self.restarts}

    def pids(self) -> list[int]:
        with self._lock:
            pool = self._pool
        return [p.pid for p in (getattr(pool, "_processes", None) or {}).values() if p.pid is not None]

    def _supervise(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                pool, generation = self._pool, self._generation
            sentinels = [p.sentinel for p in list((getattr(pool, "_processes", None) or {}).values())]
            died = bool(wait_for_sentinels(sentinels, timeout=0.1)) if sentinels else self._closed.wait(0.1)
            if self._closed.is_set():
                return
            pending = []
            while True:
                try:
                    pending.append(self._retries.get_nowait())
                except queue.Empty:
                    break
            broken = bool(getattr(pool, "_broken", False))
            if died or broken:
                self._replace(generation)
            for outer, fn, args, attempt in pending:
                self._send(outer, fn, args, attempt)

    def _replace(self, generation: int) -> None:
        """A worker died: start a new pool (the old one is broken) after the back-off, stop the old one."""
        if time.monotonic() - self._started_at < 60:
            self._closed.wait(self._gap)
            self._gap = min(30.0, self._gap * 2)
        else:
            self._gap = self._min_gap
        if self._closed.is_set():
            return
        with self._lock:
            if generation != self._generation:
                return
            old = self._pool
            self._generation += 1
            self.restarts += 1
            self._started_at = time.monotonic()
            self._pool = self._new_pool()
        old_processes = list((getattr(old, "_processes", None) or {}).values())
        old.shutdown(wait=False, cancel_futures=True)
        for process in old_processes:
            if process.is_alive():
                process.kill()
            process.join(1.0)


def _join_photos(queries: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(queries) if len(queries) > 1 else queries[0]


def _split_photos(answer: tuple[np.ndarray, dict[str, list[str]]], rows: slice) -> Any:
    embedding, predictions = answer
    return embedding[rows], {task: labels[rows] for task, labels in predictions.items()}


def _join_texts(queries: list[list[str]]) -> list[str]:
    return [text for query in queries for text in query]


def _split_rows(answer: np.ndarray, rows: slice) -> np.ndarray:
    return answer[rows]


class ProcessEncoder:
    """The :class:`~fashion_lightning.retrieval.encoder.Encoder` protocol, answered by worker processes."""

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
        """``pool``: where forward passes run (default: ``workers`` supervised processes that load ``checkpoint``,
        or call ``loader`` for another encoder)."""
        self.pool = pool or SupervisedPool(workers, initializer=_load, initargs=(checkpoint, torch_threads, loader))
        self.workers = max(1, workers)
        self.max_batch = max(1, max_batch)
        self.embedding_name = ""
        self._photos: queue.SimpleQueue[tuple[np.ndarray, Future[Any]] | None] = queue.SimpleQueue()
        self._texts: queue.SimpleQueue[tuple[list[str], Future[Any]] | None] = queue.SimpleQueue()
        self._free = threading.Semaphore(self.workers)  # a batch leaves only when a worker is free
        self._batchers = [
            threading.Thread(
                target=self._serve_batches, args=("embed_and_predict", self._photos, _join_photos, _split_photos),
                name="photo-batcher", daemon=True,
            ),
            threading.Thread(
                target=self._serve_batches, args=("embed_texts", self._texts, _join_texts, _split_rows),
                name="text-batcher", daemon=True,
            ),
        ]  # fmt: skip

    def start(self) -> ProcessEncoder:
        """Start every worker and wait for its model (raises ModelLoadError for a bad checkpoint)."""
        futures = [self.pool.submit(_call, "ready", 0.5 if self.workers > 1 else 0.0) for _ in range(self.workers)]
        try:
            self.embedding_name = [f.result() for f in futures][0]
        except (WorkerDiedError, BrokenProcessPool) as err:
            self.close()
            raise ModelLoadError(f"the inference worker died while loading the model ({err})") from None
        except ModelLoadError:
            self.close()
            raise
        for batcher in self._batchers:
            batcher.start()
        return self

    def health(self) -> dict[str, int]:
        """``{"workers", "alive", "restarts"}`` of supervised workers (empty for a plain pool)."""
        health = getattr(self.pool, "health", None)
        return health() if callable(health) else {}

    def _run(self, method: str, payload: Any) -> Any:
        return self.pool.submit(_call, method, payload).result()

    def embed_and_predict(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, list[str]]]:
        """One query's photos; batched with the photos of other queries waiting at the same time."""
        answer: Future[Any] = Future()
        self._photos.put((np.ascontiguousarray(images), answer))
        return answer.result()

    def _serve_batches(
        self,
        method: str,
        waiting: queue.SimpleQueue[Any],
        join: Callable[[list[Any]], Any],
        split: Callable[[Any, slice], Any],
    ) -> None:
        """Take the next query, wait for a free worker, then send every query of this kind waiting by then (up
        to ``max_batch`` items) as one forward pass; ``split`` gives each query its own rows of the answer."""
        while True:
            first = waiting.get()
            if first is None:
                return
            self._free.acquire()  # queries arriving while every worker is busy join this batch
            batch = [first]
            while sum(len(payload) for payload, _ in batch) < self.max_batch:
                try:
                    nxt = waiting.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    waiting.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            try:
                done = self.pool.submit(_call, method, join([payload for payload, _ in batch]))
            except RuntimeError as err:  # the pool is shut down
                self._free.release()
                for _, answer in batch:
                    answer.set_exception(err)
                continue
            done.add_done_callback(functools.partial(self._answer, batch, split))

    def _answer(
        self, batch: list[tuple[Any, Future[Any]]], split: Callable[[Any, slice], Any], result: Future[Any]
    ) -> None:
        """Hand each query of a batch its own rows of the answer."""
        self._free.release()
        error = result.exception()
        start = 0
        for payload, answer in batch:
            if error is not None:
                answer.set_exception(error)
                continue
            answer.set_result(split(result.result(), slice(start, start + len(payload))))
            start += len(payload)

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        return self._run("embed_images", np.ascontiguousarray(images))

    def predict_attributes(self, images: np.ndarray) -> dict[str, list[str]]:
        return self._run("predict_attributes", np.ascontiguousarray(images))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """One query's texts; batched with the texts of other queries waiting at the same time."""
        answer: Future[Any] = Future()
        self._texts.put((list(texts), answer))
        return answer.result()

    def close(self) -> None:
        """Stop the batcher and every worker process (waits for them: no worker outlives the server)."""
        self._photos.put(None)
        self._texts.put(None)
        self.pool.shutdown(wait=True, cancel_futures=True)
