"""The recommendation service: one FastAPI app over one loaded :class:`Recommender`.

Everything slow happens once, in :func:`create_app`'s caller (index verification, model load); a
request only searches (item / history: numpy + FAISS on the event loop, no thread hop, ~1 ms) or runs
one forward pass (photo / text: in a bounded thread pool, so a burst of uploads queues instead of
oversubscribing the CPU). The loaded index is read-only, so searches need no lock.

Errors are one line: ``{"detail": "..."}`` with 404 (unknown item), 413 (upload, body or photo too
large), 422 (anything else the client can fix), 429 (the photo decode budget stayed full), 503 (the model
cannot be loaded, or its worker died twice on one request). Every limit is in :mod:`.limits`; bodies are
checked and security headers added by :mod:`.guard` before a route runs.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime
import contextlib
import functools
import mimetypes
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any, cast

import anyio
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError, create_model

from fashion_lightning.data.images import NATIVE_HW, DecodeBudget, DecodeBusyError, decode_native
from fashion_lightning.retrieval import (
    FILTER_FIELDS,
    ModelLoadError,
    PhotoTooLargeError,
    QueryError,
    Recommender,
    UnknownItemError,
)
from fashion_lightning.serve.guard import RequestGuard, parse_json, security_headers
from fashion_lightning.serve.limits import INT64_MAX, INT64_MIN, ServeSettings
from fashion_lightning.serve.reload import LiveRecommender, reload_router

PAGE_DIR = "page"
FILTER_CHIP_VALUES = 12  # most common values per filter shown as chips on the page

ImageReader = Callable[[int], "bytes | None"]
ItemId = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
FilterValue = StrictStr | list[StrictStr]
_REPR = re.compile(r"<class '([\w.]+)'>|<[\w.]+ object at 0x[0-9a-f]+>")  # Python reprs never reach clients


class RecommendRequest(BaseModel):
    """Exactly one of item_id, text, history (liked ids, oldest first; disliked and half_life go with it).

    The field limits here are the defaults; :func:`request_types` makes the model for other settings."""

    model_config = ConfigDict(extra="forbid")

    item_id: ItemId | None = None
    text: StrictStr | None = None
    history: list[ItemId] | None = None
    disliked: list[ItemId] | None = None
    half_life: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    k: StrictInt | None = None
    filters: dict[str, FilterValue] = Field(default_factory=dict)


def request_types(settings: ServeSettings) -> tuple[type[RecommendRequest], TypeAdapter[Any]]:
    """The request body model and the filters' type with ``settings``' limits (shown in the OpenAPI schema)."""
    value = Annotated[StrictStr, Field(max_length=settings.max_filter_chars)]
    filters = Annotated[
        dict[str, value | Annotated[list[value], Field(max_length=settings.max_filter_values)]],
        Field(max_length=settings.max_filter_fields),
    ]
    ids = Annotated[list[ItemId], Field(max_length=settings.max_history)]
    model = create_model(
        "RecommendRequest",
        __base__=RecommendRequest,
        text=(Annotated[StrictStr, Field(max_length=settings.max_text_chars)] | None, None),
        history=(ids | None, None),
        disliked=(ids | None, None),
        half_life=(
            float | None,
            Field(default=None, ge=settings.min_half_life, le=settings.max_half_life, allow_inf_nan=False),
        ),
        filters=(filters, Field(default_factory=dict)),
    )
    return model, TypeAdapter(filters)


def create_app(
    recommender: Recommender,
    image_reader: ImageReader | None = None,
    settings: ServeSettings | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The app: JSON API, catalog photos (``image_reader(id) -> bytes``) and the shop page at ``/``.

    ``on_shutdown`` runs when the server stops (e.g. ending the inference worker processes)."""
    settings = settings or ServeSettings()
    request_model, filters_type = request_types(settings)
    budget = DecodeBudget(settings.max_decode_bytes, settings.decode_wait_s)  # decoded bytes in flight, all photos
    decode = functools.partial(decode_native, size_hw=NATIVE_HW, max_pixels=settings.max_photo_pixels, budget=budget)

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
    app.add_middleware(RequestGuard, settings=settings)  # security headers, body size and JSON depth
    # a thread semaphore, not an anyio limiter: it holds whatever event loop (or test client) calls it
    # worker processes batch waiting photos themselves: let up to a batch per worker through at once
    per_worker = getattr(recommender.loaded_encoder, "max_batch", 1)  # set at start-up, or None
    limiter = threading.BoundedSemaphore(max(1, settings.inference_workers) * per_worker)
    infos: dict[str, dict[str, Any]] = {}  # /info per index version (a LiveRecommender may reload another)
    page = resources.files("fashion_lightning.serve") / PAGE_DIR

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _first_error(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # a bug: still one line, still headers
        return JSONResponse(
            {"detail": "internal error (the server logged it)"},
            status_code=500,
            headers=security_headers(request.url.path),
        )

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": _plain(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers)

    shop_html = (page / "index.html").read_text(encoding="utf-8")  # read once, not per page view

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def shop_page() -> HTMLResponse:
        return HTMLResponse(shop_html)

    app.mount("/static", StaticFiles(directory=str(page)), name="static")

    @app.get(
        "/health",
        summary="Liveness: the index is loaded and (with worker processes) a model worker is alive",
        responses={503: {"description": "degraded: no inference worker is alive (one is being started)"}},
    )
    async def health() -> JSONResponse:
        workers = getattr(recommender.loaded_encoder, "health", None)  # worker processes, if any
        state = workers() if callable(workers) else {}
        degraded = state.get("alive") == 0
        body = {"status": "degraded" if degraded else "ok", "items": recommender.index.n, **state}
        return JSONResponse(body, status_code=503 if degraded else 200)

    @app.get("/info", summary="Index manifest summary, model, sizes, filter values, limits")
    async def get_info() -> dict[str, Any]:
        version = recommender.index.version
        if version not in infos:
            infos.clear()
            infos[version] = _info(recommender, settings)
        return infos[version]

    if isinstance(recommender, LiveRecommender):
        app.include_router(reload_router(recommender))

    @app.get("/items", summary="Browse the catalog (a spread over the filtered items)")
    async def browse(
        limit: Annotated[int, Query(ge=1, le=settings.max_k)] = settings.default_k,
        offset: Annotated[int, Query(ge=0)] = 0,
        filters: Annotated[str | None, Query(description='JSON object, e.g. {"gender": "Women"}')] = None,
    ) -> dict[str, Any]:
        parsed = _parse_filters(filters, settings, filters_type)
        mask, clean = _answer(lambda: recommender.allowed_rows(parsed))
        rows = np.arange(recommender.index.n) if mask is None else np.flatnonzero(mask)
        step = max(1, len(rows) // max(1, limit * 4))  # spread over the catalog, not its first rows
        picked = rows[::step][offset : offset + limit]
        return {"total": int(len(rows)), "filters": clean, "items": recommender.records(picked)}

    @app.get("/items/{item_id}", summary="Catalog metadata of one item")
    async def item(item_id: Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX)]) -> dict[str, Any]:
        return recommender.records([_row(recommender, item_id)])[0]

    @app.get("/items/{item_id}/image", summary="The catalog photo of one item")
    async def item_image(item_id: Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX)]) -> Response:
        _row(recommender, item_id)
        data = image_reader(item_id) if image_reader is not None else None
        if data is None:
            raise HTTPException(404, f"no catalog photo for item {item_id}")
        kind = _image_type(data)
        return Response(data, media_type=kind, headers={"Cache-Control": "public, max-age=86400"})

    @app.post("/recommend", summary="Recommendations for an item, a text or a history")
    async def recommend(request: request_model) -> dict[str, Any]:  # type: ignore[valid-type]
        body = cast(RecommendRequest, request)  # request_model is RecommendRequest with the settings' limits
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
        parsed = _parse_filters(filters, settings, filters_type)
        data = await photo.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"photo is over the upload limit of {settings.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(422, "photo: the upload is empty")
        try:
            result = await _in_pool(lambda: recommender.by_images(data, k, parsed, decode), limiter)
        except HTTPException as err:  # name the upload, not "<bytes #0>"
            err.detail = str(err.detail).replace("query image <bytes #0>", f"photo {_quoted(photo.filename)}")
            raise
        out = result.to_dict()
        out["query"]["images"] = [photo.filename or "upload"]
        return _with_server_time(out, start)

    return app


def _answer(call: Callable[[], Any]) -> Any:
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


def _parse_filters(text: str | None, settings: ServeSettings, filters_type: TypeAdapter[Any]) -> dict[str, Any]:
    """A form field's or query parameter's filters: JSON within the limits, then the same type as the body's."""
    if not text:
        return {}
    filters = parse_json(text, "filters", settings)
    if not isinstance(filters, dict):
        raise HTTPException(422, 'filters: expected a JSON object like {"gender": "Men"}')
    try:
        return filters_type.validate_python(filters)
    except ValidationError as err:
        raise HTTPException(422, "filters." + _first_error(err.errors())) from None


def _first_error(errors: Any) -> str:
    """pydantic's first error as one line: ``where: what`` (no input values, no Python reprs)."""
    # a union (a filter is a name or a list of names) reports each branch: the one the input's type chose
    # fails on its value, the others on the type
    ranked = sorted(errors or [{}], key=lambda e: str(e.get("type", "")).endswith("_type"))
    first = ranked[0]
    skip = ("body", "query", "path", "form", "str", "list[str]", "constrained-str", "list[constrained-str]")
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in skip)
    return f"{where or 'request'}: {_plain(str(first.get('msg', 'invalid')))}"


def _plain(message: str) -> str:
    """A message without Python object reprs (``<class 'str'>`` becomes ``str``) on one line."""
    message = _REPR.sub(lambda m: m.group(1) or "object", message)
    return " ".join(message.split())


def _quoted(name: str | None) -> str:
    return '"' + " ".join(str(name or "upload").split())[:200].replace('"', "'") + '"'


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
    """The answer as shoppers see it: the server's time added, the index folder's path on this machine left out
    (``timings.index_version`` says which index answered)."""
    out["timings"]["server_ms"] = round((time.perf_counter() - start) * 1e3, 3)
    out.get("query", {}).pop("index", None)
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
