"""The API's routes in three routers, each made from the app's one :class:`~.state.ServeState`.

* :func:`admin_router`: ``/health``, ``/info`` and (with a live recommender) ``POST /admin/reload``;
* :func:`catalog_router`: the shop page ``/``, ``/items`` (browse), ``/items/{id}`` and its photo;
* :func:`query_router`: ``POST /recommend`` (item, text, history) and ``POST /recommend/image`` (a photo).

A route declares its HTTP shape (parameters with the configured limits, which the OpenAPI schema shows) and
calls the state or the recommender; item and history searches run on the event loop (~1 ms, no thread hop),
forward passes (text, photos) in the state's bounded thread pool.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime
import mimetypes
import time
from importlib import resources
from importlib.abc import Traversable
from typing import Annotated, Any, cast

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Path, Query, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from fashion_lightning.serve.limits import INT64_MAX, INT64_MIN
from fashion_lightning.serve.reload import LiveRecommender, reload_router
from fashion_lightning.serve.schemas import RecommendRequest
from fashion_lightning.serve.state import ServeState, answer

PAGE_DIR = "page"


def page_files() -> Traversable:
    """The shop page's folder inside the package (index.html, app.js, style.css)."""
    return resources.files("fashion_lightning.serve") / PAGE_DIR


def admin_router(state: ServeState) -> APIRouter:
    router = APIRouter()

    @router.get(
        "/health",
        summary="Liveness: the index is loaded and (with worker processes) a model worker is alive",
        responses={503: {"description": "degraded: no inference worker is alive (one is being started)"}},
    )
    async def health() -> JSONResponse:
        body, status = state.health()
        return JSONResponse(body, status_code=status)

    @router.get("/info", summary="Index manifest summary, model, sizes, filter values, limits")
    async def get_info() -> dict[str, Any]:
        return state.info()

    if isinstance(state.recommender, LiveRecommender):
        router.include_router(reload_router(state.recommender))
    return router


def catalog_router(state: ServeState) -> APIRouter:
    router = APIRouter()
    settings = state.settings
    shop_html = (page_files() / "index.html").read_text(encoding="utf-8")  # read once, not per page view

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def shop_page() -> HTMLResponse:
        return HTMLResponse(shop_html)

    @router.get("/items", summary="Browse the catalog (a spread over the filtered items)")
    async def browse(
        limit: Annotated[int, Query(ge=1, le=settings.max_k)] = settings.default_k,
        offset: Annotated[int, Query(ge=0)] = 0,
        filters: Annotated[str | None, Query(description='JSON object, e.g. {"gender": "Women"}')] = None,
    ) -> dict[str, Any]:
        parsed = state.parse_filters(filters)
        recommender = state.recommender
        mask, clean = answer(lambda: recommender.allowed_rows(parsed))
        rows = np.arange(recommender.index.n) if mask is None else np.flatnonzero(mask)
        step = max(1, len(rows) // max(1, limit * 4))  # spread over the catalog, not its first rows
        picked = rows[::step][offset : offset + limit]
        return {"total": int(len(rows)), "filters": clean, "items": recommender.records(picked)}

    @router.get("/items/{item_id}", summary="Catalog metadata of one item")
    async def item(item_id: Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX)]) -> dict[str, Any]:
        return state.recommender.records([state.row(item_id)])[0]

    @router.get("/items/{item_id}/image", summary="The catalog photo of one item")
    async def item_image(item_id: Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX)]) -> Response:
        state.row(item_id)
        data = state.image_reader(item_id) if state.image_reader is not None else None
        if data is None:
            raise HTTPException(404, f"no catalog photo for item {item_id}")
        kind = _image_type(data)
        return Response(data, media_type=kind, headers={"Cache-Control": "public, max-age=86400"})

    return router


def query_router(state: ServeState) -> APIRouter:
    router = APIRouter()
    settings = state.settings

    @router.post("/recommend", summary="Recommendations for an item, a text or a history")
    async def recommend(request: state.request_model) -> dict[str, Any]:  # type: ignore[name-defined]
        body = cast(RecommendRequest, request)  # request_model is RecommendRequest with the settings' limits
        k = state.k(body.k)
        if body.disliked and not body.history:
            raise HTTPException(422, "disliked ids only go with a history query")
        if body.half_life is not None and not body.history:
            raise HTTPException(422, "half_life only goes with a history query")
        start = time.perf_counter()
        recommender = state.recommender
        call = lambda: recommender.recommend(  # noqa: E731
            text=body.text, item_id=body.item_id, history=body.history, disliked=body.disliked,
            half_life=body.half_life, k=k, filters=body.filters,
        )  # fmt: skip
        if body.text is not None:  # the text tower runs: a forward pass, in the pool
            result = await state.in_pool(call)
        else:  # a search: off the event loop (FAISS / numpy release the GIL), so photo uploads keep flowing
            result = await state.off_loop(call)
        return _with_server_time(result.to_dict(), start)

    @router.post("/recommend/image", summary="Recommendations for an uploaded photo")
    async def recommend_image(
        photo: Annotated[UploadFile, File(description="a product photo (JPEG, PNG, WebP, ...)")],
        k: Annotated[int | None, Form()] = None,
        filters: Annotated[str | None, Form(description='JSON object, e.g. {"gender": "Men"}')] = None,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        k = state.k(k)
        parsed = state.parse_filters(filters)
        data = await photo.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"photo is over the upload limit of {settings.max_upload_bytes} bytes")
        if not data:
            raise HTTPException(422, "photo: the upload is empty")
        recommender = state.recommender
        try:
            result = await state.in_pool(lambda: recommender.by_images(data, k, parsed, state.decode))
        except HTTPException as err:  # name the upload, not "<bytes #0>"
            err.detail = str(err.detail).replace("query image <bytes #0>", f"photo {_quoted(photo.filename)}")
            raise
        out = result.to_dict()
        out["query"]["images"] = [photo.filename or "upload"]
        return _with_server_time(out, start)

    return router


def _quoted(name: str | None) -> str:
    return '"' + " ".join(str(name or "upload").split())[:200].replace('"', "'") + '"'


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
