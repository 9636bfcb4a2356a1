"""The recommendation service: one FastAPI app over one loaded :class:`Recommender`.

Everything slow happens once, in :func:`create_app`'s caller (index verification, model load); a
request only searches (item / history: numpy + FAISS on the event loop, no thread hop, ~1 ms) or runs
one forward pass (photo / text: in a bounded thread pool, so a burst of uploads queues instead of
oversubscribing the CPU). The loaded index is read-only, so searches need no lock.

Errors are one line: ``{"detail": "..."}`` with 404 (unknown item), 413 (upload, body or photo too
large), 422 (anything else the client can fix), 429 (the photo decode budget stayed full), 503 (the model
cannot be loaded, or its worker died twice on one request). Every limit is in :mod:`.limits`; bodies are
checked and security headers added by :mod:`.guard` before a route runs. The routes are in :mod:`.routes`,
made from one :class:`~.state.ServeState`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from fashion_lightning.retrieval import Recommender
from fashion_lightning.serve.guard import RequestGuard, security_headers
from fashion_lightning.serve.limits import ServeSettings
from fashion_lightning.serve.routes import admin_router, catalog_router, page_files, query_router
from fashion_lightning.serve.schemas import RecommendRequest, first_error, plain
from fashion_lightning.serve.state import ImageReader, ServeState

__all__ = ["RecommendRequest", "ServeSettings", "create_app"]


def create_app(
    recommender: Recommender,
    image_reader: ImageReader | None = None,
    settings: ServeSettings | None = None,
    on_shutdown: Callable[[], None] | None = None,
) -> FastAPI:
    """The app: JSON API, catalog photos (``image_reader(id) -> bytes``) and the shop page at ``/``.

    ``on_shutdown`` runs when the server stops (e.g. ending the inference worker processes)."""
    state = ServeState.create(recommender, image_reader, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="fashion-lightning recommendations",
        summary="More like this, personalised and photo search over a fashion-lightning index.",
        version="1",
    )
    app.state.serve = state
    app.add_middleware(RequestGuard, settings=state.settings)  # security headers, body size and JSON depth
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _crash)
    app.add_exception_handler(HTTPException, _http)  # type: ignore[arg-type]
    app.include_router(admin_router(state))
    app.include_router(catalog_router(state))
    app.mount("/static", StaticFiles(directory=str(page_files())), name="static")
    app.include_router(query_router(state))
    return app


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": first_error(exc.errors())}, status_code=422)


async def _crash(request: Request, exc: Exception) -> JSONResponse:  # a bug: still one line, still headers
    return JSONResponse(
        {"detail": "internal error (the server logged it)"},
        status_code=500,
        headers=security_headers(request.url.path),
    )


async def _http(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": plain(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers)
