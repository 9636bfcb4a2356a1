"""The API fuzzed from its own OpenAPI schema (schemathesis, issue 19): whatever a client sends that the
schema allows (and much that it does not), the answer is never a 5xx, never slow, always carries the security
headers, and an error is one line without a Python repr.

A fixed budget, derandomised (the same examples on every run, so CI is repeatable): ``FUZZ_EXAMPLES``
per operation, about half a minute on the 2-core box. ``FASHION_SERVE_FUZZ_EXAMPLES=500`` runs a longer
session locally.
"""

from __future__ import annotations

import os
import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from test_recommender import FakeEncoder, catalog, embed_catalog, png_bytes  # noqa: F401 (fixture)

from fashion_lightning.retrieval import Recommender, build_index
from fashion_lightning.serve import ServeSettings, create_app

FUZZ_EXAMPLES = int(os.environ.get("FASHION_SERVE_FUZZ_EXAMPLES", "40"))
SLOW_S = 10.0  # no single answer may take longer (a hang shows up here, not as a CI timeout)


@pytest.fixture(scope="module")
def fuzz_app(catalog, tmp_path_factory):  # noqa: F811 (imported fixture)
    frame, images = catalog
    out = tmp_path_factory.mktemp("fuzz_index")
    build_index(embed_catalog(FakeEncoder(), images), frame, out, {"embedding_name": "fake", "checkpoint": None})
    recommender = Recommender.from_dir(out, encoder=FakeEncoder())
    reader = lambda item_id: png_bytes(images[item_id - 1000]) if 1000 <= item_id < 1160 else None  # noqa: E731
    return create_app(recommender, reader, ServeSettings(max_k=50, max_upload_bytes=256 * 1024))


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_covers_every_endpoint(api_schema):
    paths = {operation.path for operation in _operations(api_schema)}
    assert {"/recommend", "/recommend/image", "/items", "/items/{item_id}", "/items/{item_id}/image"} <= paths
    assert {"/health", "/info"} <= paths


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_is_a_server_error(api_schema, mode):
    """Each operation, ``FUZZ_EXAMPLES`` cases valid by the schema (positive) or not (negative)."""
    for operation in _operations(api_schema):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, database=None,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        def fuzz(case) -> None:
            _check(case)

        try:
            fuzz()
        except Unsatisfiable:  # negative mode: an operation without parameters has nothing to get wrong
            assert mode is GenerationMode.NEGATIVE and operation.path in ("/health", "/info"), operation.path


def _check(case) -> None:
    start = time.perf_counter()
    response = case.call_and_validate(checks=[not_a_server_error])
    assert time.perf_counter() - start < SLOW_S, f"{case.method} {case.path} took over {SLOW_S} s"
    assert response.status_code < 500
    headers = {k.lower(): v for k, v in response.headers.items()}
    assert "nosniff" in str(headers.get("x-content-type-options")), (case.path, headers)
    assert "frame-ancestors" in str(headers.get("content-security-policy"))
    if response.status_code >= 400 and "json" in str(headers.get("content-type")):
        detail = response.json().get("detail")
        assert isinstance(detail, str) and "\n" not in detail, detail
        assert "<class" not in detail and " object at 0x" not in detail, detail


def test_the_fuzzed_server_still_answers(fuzz_app):
    """After the fuzzing (same module-scoped app): a normal query still works."""
    client = TestClient(fuzz_app)
    assert client.post("/recommend", json={"item_id": 1000, "k": 3}).status_code == 200
    assert client.get("/health").json()["status"] == "ok"
