"""The recommendation service: one FastAPI app over one loaded :class:`Recommender`.

Everything slow happens once, in :func:`create_app`'s caller (index verification, model load); a
request only searches (item / history: numpy + FAISS on the event loop, no thread hop, ~1 ms) or runs
one forward pass (photo / text: in a bounded thread pool, so a burst of uploads queues instead of
oversubscribing the CPU). The loaded index is read-only, so searches need no lock.

Errors are one line: ``{"detail": "..."}`` with 404 (unknown item), 413 (upload or photo too large),
422 (anything else the client can fix), 503 (the model cannot be loaded).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime
import contextlib
import json
import mimetypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from fashion_lightning.retrieval import (
    FILTER_FIELDS,
    ModelLoadError,
    PhotoTooLargeError,
    QueryError,
    Recommender,
    UnknownItemError,
)

PAGE_DIR = "page"
FILTER_CHIP_VALUES = 12  # most common values per filter shown as chips on the page

ImageReader = Callable[[int], "bytes | None"]
FilterValue = StrictStr | list[StrictStr]


@dataclass
class ServeSettings:
    """Limits a storefront wants enforced before any work is done."""

    max_k: int = 100
    default_k: int = 12
    max_upload_bytes: int = 10 * 1024 * 1024
    inference_workers: int = 1  # concurrent forward passes; more only helps with spare cores


class RecommendRequest(BaseModel):
    """Exactly one of item_id, text, history (liked ids, oldest first; disliked and half_life go with it)."""

    model_config = ConfigDict(extra="forbid")

    item_id: StrictInt | None = None
    text: StrictStr | None = None
    history: list[StrictInt] | None = None
    disliked: list[StrictInt] | None = None
    half_life: float | None = Field(default=None, gt=0)
    k: StrictInt | None = None
    filters: dict[str, FilterValue] = Field(default_factory=dict)


def create_app(
    recommender: Recommender,
    image_reader: ImageReader | None = None,
    settings: ServeSettings | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The app: JSON API, catalog photos (``image_reader(id) -> bytes``) and the shop page at ``/``.

    ``on_shutdown`` runs when the server stops (e.g. ending the inference worker processes)."""
    settings = settings or ServeSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="fashion-lightning recommendations",
        summary="More like this, personalised and photo search over a fashion-lightning index.",
        version="1",
    )
    # a thread semaphore, not an anyio limiter: it holds whatever event loop (or test client) calls it
    # worker processes batch waiting photos themselves: let up to a batch per worker through at once
    per_worker = getattr(recommender.loaded_encoder, "max_batch", 1)  # set at start-up, or None
    limiter = threading.BoundedSemaphore(max(1, settings.inference_workers) * per_worker)
    info = _info(recommender, settings)
    page = resources.files("fashion_lightning.serve") / PAGE_DIR

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form"))
        return JSONResponse({"detail": f"{where or 'request'}: {first.get('msg', 'invalid')}"}, status_code=422)

    shop_html = (page / "index.html").read_text(encoding="utf-8")  # read once, not per page view

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def shop_page() -> HTMLResponse:
        return HTMLResponse(shop_html)

    app.mount("/static", StaticFiles(directory=str(page)), name="static")

    @app.get("/health", summary="Liveness: the index is loaded")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "items": recommender.index.n}

    @app.get("/info", summary="Index manifest summary, model, sizes, filter values, limits")
    async def get_info() -> dict[str, Any]:
        return info

    @app.get("/items", summary="Browse the catalog (a spread over the filtered items)")
    async def browse(
        limit: Annotated[int, Query(ge=1, le=settings.max_k)] = settings.default_k,
        offset: Annotated[int, Query(ge=0)] = 0,
        filters: Annotated[str | None, Query(description='JSON object, e.g. {"gender": "Women"}')] = None,
    ) -> dict[str, Any]:
        mask, clean = _answer(lambda: recommender.allowed_rows(_parse_filters(filters)))
        rows = np.arange(recommender.index.n) if mask is None else np.flatnonzero(mask)
        step = max(1, len(rows) // max(1, limit * 4))  # spread over the catalog, not its first rows
        picked = rows[::step][offset : offset + limit]
        return {"total": int(len(rows)), "filters": clean, "items": recommender.records(picked)}

    @app.get("/items/{item_id}", summary="Catalog metadata of one item")
    async def item(item_id: int) -> dict[str, Any]:
        return recommender.records([_row(recommender, item_id)])[0]

    @app.get("/items/{item_id}/image", summary="The catalog photo of one item")
    async def item_image(item_id: int) -> Response:
        _row(recommender, item_id)
        data = image_reader(item_id) if image_reader is not None else None
        if data is None:
            raise HTTPException(404, f"no catalog photo for item {item_id}")
        kind = _image_type(data)
        return Response(data, media_type=kind, headers={"Cache-Control": "public, max-age=86400"})

    @app.post("/recommend", summary="Recommendations for an item, a text or a history")
    async def recommend(body: RecommendRequest) -> dict[str, Any]:
        k = _k(body.k, settings)
        if body.disliked and not body.history:
            raise HTTPException(422, "disliked ids only go with a history query")
        if body.half_life is not None and not body.history:
            raise HTTPException(422, "half_life only goes with a history query")
        start = time.perf_counter()
        call = lambda: recommender.recommend(  # noqa: E731
            text=body.text, item_id=body.item_id, history=body.history, disliked=body.disliked,
            half_life=body.half_life, k=k, filters=body.filters,
        )  # fmt: skip
        if body.text is not None:  # the text tower runs: a forward pass, in the pool
            result = await _in_pool(call, limiter)
        else:
            result = _answer(call)
        return _with_server_time(result.to_dict(), start)

    @app.post("/recommend/image", summary="Recommendations for an uploaded photo")
    async def recommend_image(
        photo: Annotated[UploadFile, File(description="a product photo (JPEG, PNG, WebP, ...)")],
        k: Annotated[int | None, Form()] = None,
        filters: Annotated[str | None, Form(description='JSON object, e.g. {"gender": "Men"}')] = None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        k = _k(k, settings)
        parsed = _parse_filters(filters)
        data = await photo.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"photo is over the upload limit of {settings.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(422, "photo: the upload is empty")
        try:
            result = await _in_pool(lambda: recommender.by_images(data, k, parsed), limiter)
        except HTTPException as err:  # name the upload, not "<bytes #0>"
            err.detail = str(err.detail).replace("query image <bytes #0>", f"photo {photo.filename!r}")
            raise
        out = result.to_dict()
        out["query"]["images"] = [photo.filename or "upload"]
        return _with_server_time(out, start)

    return app


def _answer(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except PhotoTooLargeError as err:
        raise HTTPException(413, str(err)) from None
    except ModelLoadError as err:
        raise HTTPException(503, str(err)) from None
    except UnknownItemError as err:
        raise HTTPException(404, str(err)) from None
    except QueryError as err:
        raise HTTPException(422, str(err)) from None


async def _in_pool(call: Callable[[], Any], limiter: threading.BoundedSemaphore) -> Any:
    """Run a forward pass in a worker thread, at most ``inference_workers`` at once (the rest wait)."""

    def bounded() -> Any:
        with limiter:
            return _answer(call)

    return await anyio.to_thread.run_sync(bounded)


def _k(k: int | None, settings: ServeSettings) -> int:
    k = settings.default_k if k is None else k
    if not 1 <= k <= settings.max_k:
        raise HTTPException(422, f"k must be between 1 and {settings.max_k}, got {k}")
    return k


def _parse_filters(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        filters = json.loads(text)
    except json.JSONDecodeError as err:
        raise HTTPException(422, f"filters: not JSON ({err.msg})") from None
    if not isinstance(filters, dict):
        raise HTTPException(422, 'filters: expected a JSON object like {"gender": "Men"}')
    return filters


def _row(recommender: Recommender, item_id: int) -> int:
    row = int(recommender.index.rows_of(np.asarray([item_id], dtype=np.int64))[0])
    if row < 0:
        raise HTTPException(404, f"unknown item id {item_id}")
    return row


def _image_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.types_map.get(".jpg", "application/octet-stream")


def _with_server_time(out: dict[str, Any], start: float) -> dict[str, Any]:
    out["timings"]["server_ms"] = round((time.perf_counter() - start) * 1e3, 3)
    return out


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
        "limits": {
            "max_k": settings.max_k,
            "default_k": settings.default_k,
            "max_upload_bytes": settings.max_upload_bytes,
        },
    }
