"""The service's outer wall: security headers on every answer, body size and JSON depth before parsing.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``: no extra task per request, uploads stream
through it). Python's ``json.loads`` recurses once per bracket, so a few KB of ``[[[[...`` is a
RecursionError (a 500 that also resets the keep-alive connection): the depth is measured here with a
linear scan that never recurses, before FastAPI's parser sees the body. Body size is checked from
``Content-Length`` and again while the body streams in (chunked uploads have no length).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException

from fashion_lightning.serve.limits import ServeSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MULTIPART_SLACK = 64 * 1024  # form fields and part headers around an upload
# the shop page (serve/page/) loads only its own script and stylesheet; photos come from /items/{id}/image,
# the dropped photo's preview is a blob: URL, the favicon a data: URL
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# FastAPI's /docs and /redoc pages load their bundle from jsDelivr and configure it in an inline script
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")
HEADERS = {
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cross-origin-opener-policy": b"same-origin",
    b"cross-origin-resource-policy": b"same-origin",
    b"permissions-policy": b"camera=(), microphone=(), geolocation=()",
}

# a JSON string (escapes included), a lone quote (an unterminated string), or a bracket
_TOKENS = re.compile(rb'"(?:[^"\\]++|\\.)*+"|"|[\[\]{}]', re.DOTALL)


class JsonLimitError(ValueError):
    """A JSON text is too deep or not JSON at all (the message says which, in one line)."""


def check_json_depth(data: bytes | str, max_depth: int) -> None:
    """Raise :class:`JsonLimitError` when ``data`` nests brackets deeper than ``max_depth`` (linear time)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = 0
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token[0] == 0x22:  # '"'
            if len(token) == 1:
                raise JsonLimitError("not valid JSON (a string is not terminated)")
        elif token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise JsonLimitError(f"JSON nested deeper than the limit of {max_depth}")
        else:
            depth -= 1


def parse_json(text: str, what: str, settings: ServeSettings) -> Any:
    """``json.loads`` of a client's text within the size and depth limits, no NaN / Infinity (422 otherwise)."""
    if len(text) > settings.max_json_bytes:
        raise HTTPException(413, f"{what}: over the limit of {settings.max_json_bytes} characters")
    try:
        check_json_depth(text, settings.max_json_depth)
        return json.loads(text, parse_constant=_no_constant)
    except JsonLimitError as err:
        raise HTTPException(422, f"{what}: {err}") from None
    except json.JSONDecodeError as err:
        raise HTTPException(422, f"{what}: not JSON ({err.msg})") from None


def _no_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not a JSON number")


class RequestGuard:
    """ASGI middleware: security headers on every response; request bodies within size and depth limits."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._with_headers(scope, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        multipart = content_type == b"multipart/form-data"
        limit = self.settings.max_upload_bytes + MULTIPART_SLACK if multipart else self.settings.max_json_bytes
        declared = headers.get(b"content-length", b"").strip()
        if declared:
            if not declared.isdigit():
                await _error(send, 400, "content-length is not a number")
                return
            if int(declared) > limit:
                await _error(send, 413, _too_large(multipart, limit))
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and not declared:
            await self.app(scope, receive, send)
            return
        if multipart:  # streamed to the form parser, counted on the way
            await self.app(scope, _counting(receive, limit, _too_large(multipart, limit)), send)
            return
        body = await _read_body(receive, limit)
        if body is None:
            await _error(send, 413, _too_large(multipart, limit))
            return
        if body:
            try:
                check_json_depth(body, self.settings.max_json_depth)
            except JsonLimitError as err:
                await _error(send, 422, f"request body: {err}")
                return
        await self.app(scope, _replay(body, receive), send)

    def _with_headers(self, scope: Scope, send: Send) -> Send:
        csp = _csp(scope.get("path", "")).encode()

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in HEADERS.items() if k not in present]
                if b"content-security-policy" not in present:
                    extra.append((b"content-security-policy", csp))
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        return wrapped


def _csp(path: str) -> str:
    return DOCS_CSP if path.rstrip("/") in DOCS_PATHS else PAGE_CSP


def security_headers(path: str) -> dict[str, str]:
    """The headers :class:`RequestGuard` adds, for answers made outside it (Starlette's 500 handler runs
    outside every middleware)."""
    return {k.decode(): v.decode() for k, v in HEADERS.items()} | {"content-security-policy": _csp(path)}


def _too_large(multipart: bool, limit: int) -> str:
    what = "upload" if multipart else "request body"
    return f"{what} is over the limit of {limit} bytes"


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the app sees an empty body and the send fails harmlessly
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notices come from the server

    return replay


def _counting(receive: Receive, limit: int, message: str) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        received = await receive()
        if received["type"] == "http.request":
            size += len(received.get("body", b""))
            if size > limit:  # FastAPI re-raises an HTTPException from body parsing as is
                raise HTTPException(413, message)
        return received

    return counted


async def _error(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
