"""One app's state: the recommender, the settings, and what follows from them, built once by ``create_app``.

Every router (:mod:`.routes`) is made from this one object, so what a request may touch is listed here: the
request types with the configured limits, the photo decoder and its budget of decoded bytes in flight, the
limiter of concurrent forward passes, and ``/info`` per index version. Library errors become HTTP statuses
in :func:`answer`, the one place that maps them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
from fastapi import HTTPException
from pydantic import TypeAdapter, ValidationError

from fashion_lightning.data.images import NATIVE_HW, DecodeBudget, DecodeBusyError, decode_native
from fashion_lightning.retrieval import (
    FILTER_FIELDS,
    ModelLoadError,
    PhotoTooLargeError,
    QueryError,
    Recommender,
    UnknownItemError,
)
from fashion_lightning.serve.guard import parse_json
from fashion_lightning.serve.limits import ServeSettings
from fashion_lightning.serve.schemas import RecommendRequest, first_error, request_types

FILTER_CHIP_VALUES = 12  # most common values per filter shown as chips on the page

ImageReader = Callable[[int], "bytes | None"]


@dataclass
class ServeState:
    """What the routes of one app share (``app.state.serve``); see the module docstring."""

    recommender: Recommender
    image_reader: ImageReader | None
    settings: ServeSettings
    request_model: type[RecommendRequest]
    filters_type: TypeAdapter[Any]
    decode: Callable[..., Any]
    limiter: threading.BoundedSemaphore
    infos: dict[str, dict[str, Any]] = field(default_factory=dict)  # /info per index version (reloads change it)

    @classmethod
    def create(
        cls, recommender: Recommender, image_reader: ImageReader | None = None, settings: ServeSettings | None = None
    ) -> ServeState:
        settings = settings or ServeSettings()
        request_model, filters_type = request_types(settings)
        budget = DecodeBudget(settings.max_decode_bytes, settings.decode_wait_s)  # decoded bytes in flight, all photos
        decode = functools.partial(
            decode_native, size_hw=NATIVE_HW, max_pixels=settings.max_photo_pixels, budget=budget
        )
        # a thread semaphore, not an anyio limiter: it holds whatever event loop (or test client) calls it
        # worker processes batch waiting photos themselves: let up to a batch per worker through at once
        per_worker = getattr(recommender.loaded_encoder, "max_batch", 1)  # set at start-up, or None
        limiter = threading.BoundedSemaphore(max(1, settings.inference_workers) * per_worker)
        return cls(recommender, image_reader, settings, request_model, filters_type, decode, limiter)

    def k(self, k: int | None) -> int:
        k = self.settings.default_k if k is None else k
        if not 1 <= k <= self.settings.max_k:
            raise HTTPException(422, f"k must be between 1 and {self.settings.max_k}, got {k}")
        return k

    def parse_filters(self, text: str | None) -> dict[str, Any]:
        """A form field's or query parameter's filters: JSON within the limits, then the same type as the body's."""
        if not text:
            return {}
        filters = parse_json(text, "filters", self.settings)
        if not isinstance(filters, dict):
            raise HTTPException(422, 'filters: expected a JSON object like {"gender": "Men"}')
        try:
            return self.filters_type.validate_python(filters)
        except ValidationError as err:
            raise HTTPException(422, "filters." + first_error(err.errors())) from None

    def row(self, item_id: int) -> int:
        row = int(self.recommender.index.rows_of(np.asarray([item_id], dtype=np.int64))[0])
        if row < 0:
            raise HTTPException(404, f"unknown item id {item_id}")
        return row

    async def in_pool(self, call: Callable[[], Any]) -> Any:
        """Run a forward pass in a worker thread, at most ``inference_workers`` at once (the rest wait)."""

        def bounded() -> Any:
            with self.limiter:
                return answer(call)

        return await anyio.to_thread.run_sync(bounded)

    async def off_loop(self, call: Callable[[], Any]) -> Any:
        """Run a search-only query (no forward pass) in a thread: not behind the forward-pass limiter, but off
        the event loop, whose time is for reading requests and writing answers."""
        return await anyio.to_thread.run_sync(lambda: answer(call))

    def health(self) -> tuple[dict[str, Any], int]:
        """The ``/health`` body and status: 503 when worker processes are used and none is alive."""
        workers = getattr(self.recommender.loaded_encoder, "health", None)  # worker processes, if any
        state = workers() if callable(workers) else {}
        degraded = state.get("alive") == 0
        body = {"status": "degraded" if degraded else "ok", "items": self.recommender.index.n, **state}
        return body, 503 if degraded else 200

    def info(self) -> dict[str, Any]:
        """``/info``, computed once per index version."""
        version = self.recommender.index.version
        if version not in self.infos:
            self.infos.clear()
            self.infos[version] = _info(self.recommender, self.settings)
        return self.infos[version]


def answer(call: Callable[[], Any]) -> Any:
    """``call()``, its library errors as the HTTP statuses the API documents."""
    try:
        return call()
    except DecodeBusyError as err:
        raise HTTPException(429, str(err), headers={"Retry-After": "5"}) from None
    except PhotoTooLargeError as err:
        raise HTTPException(413, str(err)) from None
    except ModelLoadError as err:
        raise HTTPException(503, str(err)) from None
    except UnknownItemError as err:
        raise HTTPException(404, str(err)) from None
    except QueryError as err:
        raise HTTPException(422, str(err)) from None


def _info(recommender: Recommender, settings: ServeSettings) -> dict[str, Any]:
    index = recommender.index
    manifest = index.manifest
    items = index.items
    values = {
        name: items[name].astype(str).value_counts().head(FILTER_CHIP_VALUES).index.tolist()
        for name in FILTER_FIELDS
        if name in items.columns
    }
    model = {
        k: v
        for k, v in index.model_info.items()
        if k in ("embedding_name", "module_class", "model", "checkpoint", "model_identity", "tasks")
    }
    return {
        "index": {
            "path": str(index.path),
            "version": index.version,
            "count": manifest.count,
            "dim": manifest.dim,
            "type": manifest.index.get("type"),
            "faiss_factory": manifest.index.get("faiss_factory"),
            "created_at": manifest.created_at,
            "bytes": {name: meta.get("bytes") for name, meta in manifest.files.items()},
        },
        "model": model,
        "text_queries": bool(index.parts) or "clip" in str(model.get("embedding_name", "")).lower(),
        "photo_queries": bool(model.get("model") or model.get("checkpoint")) or recommender.loaded_encoder is not None,
        "filters": values,
        "limits": settings.public(),
    }
