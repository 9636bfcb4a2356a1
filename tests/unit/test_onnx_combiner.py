"""The ONNX encoder combines concurrent callers into shared graph passes (fashion-serve inference=thread): the
calls waiting while a pass runs go through as the next one, each gets its own rows, a lone caller runs its own
pass in its own thread, and an error reaches only the call that causes it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fashion_lightning.deploy.onnx_encoder import Combiner


class Gated:
    """A "graph": row sums and row means; the first pass blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.passes: list[int] = []
        self.threads: list[str] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        self.entered.set()
        self.gate.wait(5)
        if (rows < 0).any():
            raise ValueError("negative pixels")
        self.passes.append(len(rows))
        self.threads.append(threading.current_thread().name)
        return [rows.sum(axis=1), rows.mean(axis=1, keepdims=True)]


def test_calls_waiting_behind_a_pass_share_the_next_one_and_get_their_own_rows():
    graph = Gated()
    combine = Combiner(graph, max_batch=16)
    calls = [np.full((n, 3), v, dtype=np.float32) for n, v in [(1, 1), (2, 2), (1, 3), (3, 4)]]
    with ThreadPoolExecutor(len(calls)) as clients:
        first = clients.submit(combine, calls[0])
        assert graph.entered.wait(5)
        rest = [clients.submit(combine, c) for c in calls[1:]]
        threading.Event().wait(0.2)  # they queue behind the running pass
        graph.gate.set()
        answers = [first.result(5)] + [r.result(5) for r in rest]
    assert graph.passes == [1, 6]
    for call, (sums, means) in zip(calls, answers):
        np.testing.assert_array_equal(sums, call.sum(axis=1))
        np.testing.assert_array_equal(means[:, 0], call[:, 0])


def test_a_lone_caller_runs_its_pass_in_its_own_thread_and_large_calls_go_alone():
    graph = Gated()
    graph.gate.set()
    combine = Combiner(graph, max_batch=4)
    sums, _ = combine(np.ones((10, 2), np.float32))  # over max_batch: one pass of its own, not split or refused
    assert graph.passes == [10] and graph.threads == [threading.current_thread().name]
    np.testing.assert_array_equal(sums, np.full(10, 2.0))


def test_an_error_reaches_only_the_call_that_causes_it():
    graph = Gated()
    combine = Combiner(graph, max_batch=16)
    with ThreadPoolExecutor(3) as clients:
        first = clients.submit(combine, np.ones((1, 2), np.float32))
        assert graph.entered.wait(5)
        bad = clients.submit(combine, -np.ones((1, 2), np.float32))
        good = clients.submit(combine, np.ones((2, 2), np.float32))
        threading.Event().wait(0.2)
        graph.gate.set()
        assert first.result(5)[0].tolist() == [2.0]
        with pytest.raises(ValueError, match="negative pixels"):
            bad.result(5)
        assert good.result(5)[0].tolist() == [2.0, 2.0]  # it shared the failing pass, then went again alone
    assert graph.passes == [1, 2]
    assert combine(np.ones((1, 2), np.float32))[0].tolist() == [2.0]
