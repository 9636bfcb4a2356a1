"""fashion-serve: load an index (and its model) once, then serve the API and the shop page with uvicorn.

Start-up failures (a taken port, missing or damaged index, checkpoint or catalog, a bad limit) end with a
one-line error and exit status 2, like the other apps. The port is bound before anything loads, so a second
server on a taken port says so at once instead of after loading the model. SIGTERM (and Ctrl-C) stop
accepting, let in-flight requests finish (``limits.drain_timeout_s``), then stop and reap the workers.
"""

from __future__ import annotations

import errno
import socket
import sys
import warnings
from typing import cast

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fashion_lightning.data.source import CatalogNotFoundError, CatalogSource
from fashion_lightning.retrieval import Encoder, Recommender, RetrievalError
from fashion_lightning.serve.app import create_app
from fashion_lightning.serve.limits import ServeSettings, SettingsError
from fashion_lightning.serve.reload import LiveRecommender, load_sharing, token_from_env
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log
from fashion_lightning.utils.config_check import ConfigError
from fashion_lightning.utils.runtime import apply_runtime, engine_of


def build(cfg: DictConfig):
    """The app for ``cfg``: verified index, catalog photos, and (unless told otherwise) the model."""
    from PIL import Image

    settings = ServeSettings.from_cfg(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    # a service refuses decompression bombs outright (PIL only warns between 1x and 2x its limit)
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    _search_threads(cfg.search_threads)
    allow_local = bool(cfg.get("allow_qdrant_local", False))
    recommender = Recommender.from_dir(
        cfg.index_dir, allow_external_model=bool(cfg.allow_external_model), allow_qdrant_local=allow_local
    )
    root = cfg.catalog_root or recommender.index.model_info.get("catalog")
    source = CatalogSource(root) if root else None
    checkpoint = recommender.index.model_path()  # resolved in the index folder, size + sha256
    loader = _onnx_loader(cfg, recommender)  # runtime=onnx: the export's encoder, checked now
    if loader is not None and cfg.inference != "process":
        recommender = Recommender(recommender.index, cast("Encoder", loader()))
    elif (checkpoint or loader) and cfg.inference == "process":
        from fashion_lightning.serve.inference import ProcessEncoder

        workers = ProcessEncoder(str(checkpoint), int(cfg.inference_workers), cfg.torch_threads, loader=loader)
        recommender = Recommender(recommender.index, cast("Encoder", workers.start()))
    elif checkpoint and cfg.preload_model:
        if cfg.torch_threads:
            import torch

            torch.set_num_threads(int(cfg.torch_threads))
        recommender.encoder  # noqa: B018  (loads it now, not on the first photo query)
    close = getattr(recommender.loaded_encoder, "close", None)  # worker processes end with the server
    live = LiveRecommender(  # POST /admin/reload swaps in a new index version (serve/reload.py)
        recommender,
        cfg.index_dir,
        load_sharing(bool(cfg.allow_external_model), allow_local),
        token_from_env(cfg.get("reload_token_env")),
    )
    reader = source.image_bytes if source else None
    try:  # a proxy to a Recommender
        app = create_app(cast(Recommender, live), reader, settings, on_shutdown=close)
    except BaseException:
        if close is not None:
            close()
        raise
    app.state.close_workers = close  # main() calls it again whatever way the server ends (it is idempotent)
    return app


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


def _onnx_loader(cfg: DictConfig, recommender: Recommender):
    """``runtime=onnx``: a loader of the export's ONNX Runtime encoder (None for PyTorch)."""
    if engine_of(cfg) == "torch":
        return None
    from fashion_lightning.deploy.onnx_encoder import encoder_loader

    return encoder_loader(cfg, recommender.index.model_info.get("model_identity"))


def _search_threads(n: int | None) -> None:
    """One query's search is one matrix-vector product: memory-bound, so extra BLAS / OpenMP threads buy
    nothing, and on a busy machine a multi-threaded product waits for its descheduled threads (measured
    here: 0.6 ms median with one thread, 20 ms with two under load). Concurrency comes from requests."""
    if not n:
        return
    from threadpoolctl import threadpool_limits

    from fashion_lightning.retrieval import configure_threads

    threadpool_limits(int(n), user_api="blas")
    configure_threads(int(n))


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="serve")
def main(cfg: DictConfig) -> None:
    sock = None
    try:
        apply_runtime(cfg.runtime)  # process-wide settings, once (conf/runtime/)
        settings = ServeSettings.from_cfg(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        sock = bind(str(cfg.host), int(cfg.port))  # before the model loads
        app = build(cfg)
    except (ConfigError, RetrievalError, CatalogNotFoundError, FileNotFoundError, SettingsError, PortError) as err:
        if sock is not None:
            sock.close()
        Console(stderr=True, soft_wrap=True).print(f"[bold red]fashion-serve:[/bold red] {err}")
        sys.exit(2)
    import uvicorn

    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, host=cfg.host, port=port, log_level=cfg.log_level, access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
    )  # fmt: skip
    log.info("serving %s on http://%s:%s/ (API docs at /docs)", cfg.index_dir, cfg.host, port)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:  # the lifespan's shutdown already stopped the workers unless the server failed to start
        close = getattr(app.state, "close_workers", None)
        if close is not None:
            close()


if __name__ == "__main__":
    main()
