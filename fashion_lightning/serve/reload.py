"""Hot reload: fashion-serve answers from a new index version without a restart and without failing a request.

The app holds a :class:`LiveRecommender`, a proxy whose attribute reads go to the current
:class:`Recommender`. ``POST /admin/reload`` loads and verifies the new folder in a worker thread (the old
version keeps answering meanwhile), then swaps one reference on the event loop. Every endpoint resolves
the proxy per call, and a call runs start to end on the recommender it resolved, so a request in flight
finishes on the version it started on and the next one gets the new version: nothing is locked, nothing
fails. Answers say which version answered (``timings.index_version``), as does ``/info``.

Which folder: the body's ``index_dir``, else the configured ``index_dir`` read again, so a ``current``
symlink flipped to a new version (:func:`publish`) is picked up by a reload without a body.

Who may reload: with a token configured (``reload_token_env`` names the environment variable holding it),
requests carrying ``Authorization: Bearer <token>``; without one, only requests from this machine.
The new index must come from the same model as the running one (photo and text queries keep the loaded
encoder); another model needs a restart (409).
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, StrictStr

from fashion_lightning.retrieval import Recommender, RetrievalError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index_dir: StrictStr | None = None  # default: the configured index_dir (e.g. a `current` symlink), again


class LiveRecommender:
    """The running :class:`Recommender`, swappable: attribute reads go to the current one."""

    def __init__(
        self,
        recommender: Recommender,
        index_dir: str | Path,
        load: Callable[[Path, Recommender], Recommender],
        token: str | None = None,
    ) -> None:
        self.current = recommender
        self.index_dir = str(index_dir)
        self.token = token or None
        self._load = load
        self._reloading = threading.Lock()  # one reload at a time; requests never take it

    def __getattr__(self, name: str) -> Any:  # only for names this class does not define
        return getattr(self.current, name)

    def load(self, index_dir: str | None) -> Recommender:
        """The new version, loaded and verified (in a worker thread), from the same model as the current."""
        new = self._load(Path(index_dir or self.index_dir), self.current)
        ours, theirs = (r.index.manifest.model.get("model_identity") for r in (self.current, new))
        if ours != theirs:
            new.index.close()
            raise ModelChangedError(
                f"{new.index.path} was built by another model than the running index ({str(theirs)[:12]}... vs "
                f"{str(ours)[:12]}...); restart fashion-serve to change models"
            )
        return new


class ModelChangedError(RetrievalError):
    """The new index needs another model than the one the server has loaded."""


def load_sharing(allow_external_model: bool, allow_qdrant_local: bool) -> Callable[[Path, Recommender], Recommender]:
    """A loader for :class:`LiveRecommender`: the new index shares the running encoder and, for the same
    Qdrant collection, its client (a local-mode folder admits one client at a time)."""
    from fashion_lightning.retrieval.search import load_index

    def load(path: Path, running: Recommender) -> Recommender:
        index = load_index(
            path,
            allow_external_model=allow_external_model,
            allow_qdrant_local=allow_qdrant_local,
            reuse_qdrant=getattr(running.index, "store", None),
        )
        return running.with_index(index)  # the same model

    return load


def reload_router(live: LiveRecommender) -> APIRouter:
    router = APIRouter()

    @router.post("/admin/reload", summary="Load a new index version and answer from it (no restart)")
    async def reload(request: Request, body: ReloadRequest | None = None) -> dict[str, Any]:
        _authorise(request, live.token)
        wanted = body.index_dir if body is not None else None

        def load() -> Recommender:
            if not live._reloading.acquire(blocking=False):  # noqa: SLF001
                raise HTTPException(409, "a reload is already running")
            try:
                return live.load(wanted)
            except ModelChangedError as err:
                raise HTTPException(409, str(err)) from None
            except (RetrievalError, FileNotFoundError) as err:
                raise HTTPException(422, str(err).splitlines()[0]) from None
            finally:
                live._reloading.release()  # noqa: SLF001

        new = await anyio.to_thread.run_sync(load)
        # on the event loop, between two requests' synchronous parts; the old version is not closed: requests
        # still running on it finish there, and it is freed with their last reference
        old, live.current = live.current, new
        return {
            "version": new.index.version,
            "previous": old.index.version,
            "index_dir": str(new.index.path),
            "items": new.index.n,
            "parent": new.index.manifest.parent,
        }

    return router


def _authorise(request: Request, token: str | None) -> None:
    if token:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            raise HTTPException(403, "reload needs the header Authorization: Bearer <token>")
        return
    host = request.client.host if request.client else ""
    if host not in LOOPBACK:
        raise HTTPException(403, "reload is allowed from this machine only (or configure reload_token_env)")


def token_from_env(name: str | None) -> str | None:
    return os.environ.get(name) or None if name else None


def publish(current: str | Path, target: str | Path) -> Path:
    """Point the ``current`` symlink at ``target`` atomically (a new link renamed over the old one), so a
    reader sees the old version or the new one, never neither."""
    link, target = Path(current), Path(target).resolve()
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, link)
    return link
