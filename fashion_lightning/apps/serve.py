"""fashion-serve: load an index (and its model) once, then serve the API and the shop page with uvicorn.

Start-up failures (a taken port, missing or damaged index, checkpoint or catalog, a bad limit) end with a
one-line error and exit status 2, like the other apps. The port is bound before anything loads, so a second
server on a taken port says so at once instead of after loading the model. SIGTERM (and Ctrl-C) stop
accepting, let in-flight requests finish (``limits.drain_timeout_s``), then stop and reap the workers
(:mod:`fashion_lightning.serve.server`). The service itself is the library :mod:`fashion_lightning.serve`.
"""

from __future__ import annotations

import warnings
from typing import cast

import hydra
from omegaconf import DictConfig, OmegaConf

from fashion_lightning.data.source import CatalogNotFoundError, CatalogSource
from fashion_lightning.retrieval import Encoder, Recommender, RetrievalError
from fashion_lightning.serve.app import create_app
from fashion_lightning.serve.limits import ServeSettings, SettingsError
from fashion_lightning.serve.reload import LiveRecommender, load_sharing, token_from_env
from fashion_lightning.serve.server import PortError, bind, run
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log
from fashion_lightning.utils.config_check import one_line_errors
from fashion_lightning.utils.runtime import engine_of
from fashion_lightning.utils.task_wrapper import task_wrapper


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
    app.state.close_workers = close  # serve.server.run calls it again however the server ends (idempotent)
    return app


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


@task_wrapper
def serve(cfg: DictConfig) -> None:
    """Bind the port, then load (:func:`build`), then serve until SIGTERM / Ctrl-C."""
    settings = ServeSettings.from_cfg(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    sock = bind(str(cfg.host), int(cfg.port))  # before the model loads
    try:
        app = build(cfg)
    except BaseException:
        sock.close()
        raise
    log.info("serving %s on http://%s:%s/ (API docs at /docs)", cfg.index_dir, cfg.host, sock.getsockname()[1])
    run(app, sock, str(cfg.host), settings, log_level=cfg.log_level)


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="serve")
def main(cfg: DictConfig) -> None:
    with one_line_errors(
        RetrievalError, CatalogNotFoundError, FileNotFoundError, SettingsError, PortError, app="fashion-serve"
    ):
        serve(cfg)


if __name__ == "__main__":
    main()
