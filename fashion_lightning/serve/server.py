"""Running the app: the listening socket, bound before anything loads, and uvicorn with a graceful drain.

The port is bound first so that a second server on a taken port says so at once instead of after loading
the model. SIGTERM (and Ctrl-C) stop accepting, let in-flight requests finish (``drain_timeout_s``), then
the app's lifespan ends the inference workers; :func:`run` ends them again whatever way the server stops.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from fashion_lightning.serve.limits import ServeSettings


class PortError(OSError):
    """The address to serve on cannot be bound (taken, not this machine's, no permission)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, made before the model loads (the port is held from now on)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT port is free
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        why = (
            "address already in use (another server is on it; pick another port=)"
            if err.errno == errno.EADDRINUSE
            else (err.strerror or str(err))
        )
        raise PortError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(False)
    return sock


def run(app: Any, sock: socket.socket, host: str, settings: ServeSettings, log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until SIGTERM / Ctrl-C; then ``app.state.close_workers()`` (idempotent) if set."""
    import uvicorn

    config = uvicorn.Config(
        app, host=host, port=sock.getsockname()[1], log_level=log_level, access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
    )  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:  # the lifespan's shutdown already stopped the workers unless the server failed to start
        close: Callable[[], None] | None = getattr(app.state, "close_workers", None)
        if close is not None:
            close()
