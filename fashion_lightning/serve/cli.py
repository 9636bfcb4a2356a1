"""fashion-serve: load an index (and its model) once, then serve the API and the shop page with uvicorn.

Start-up failures (missing or damaged index, checkpoint or catalog) end with a one-line error and
exit status 2, like the other apps.
"""

from __future__ import annotations

import sys
import warnings
from typing import cast

import hydra
from omegaconf import DictConfig
from rich.console import Console

from fashion_lightning.data.source import CatalogNotFoundError, CatalogSource
from fashion_lightning.retrieval import Encoder, Recommender, RetrievalError
from fashion_lightning.retrieval.queries import verified_model_path
from fashion_lightning.serve.app import ServeSettings, create_app
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log, quiet_runtime
from fashion_lightning.utils.config_check import ConfigError


def build(cfg: DictConfig):
    """The app for ``cfg``: verified index, catalog photos, and (unless told otherwise) the model."""
    from PIL import Image

    # a service refuses decompression bombs outright (PIL only warns between 1x and 2x its limit)
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    _search_threads(cfg.search_threads)
    recommender = Recommender.from_dir(cfg.index_dir, allow_external_model=bool(cfg.allow_external_model))
    root = cfg.catalog_root or recommender.index.model_info.get("catalog")
    source = CatalogSource(root) if root else None
    checkpoint = verified_model_path(recommender.index)  # resolved in the index folder, size + sha256
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
        quiet_runtime()  # torch is imported now: its matmul precision applies
    settings = ServeSettings(
        max_k=int(cfg.max_k), default_k=int(cfg.default_k), max_upload_bytes=int(cfg.max_upload_mb * 1024 * 1024),
        inference_workers=int(cfg.inference_workers),
    )  # fmt: skip
    close = getattr(recommender._encoder, "close", None)  # worker processes end with the server
    return create_app(recommender, source.image_bytes if source else None, settings, on_shutdown=close)


def _onnx_loader(cfg: DictConfig, recommender: Recommender):
    """``runtime=onnx``: a loader of the export's ONNX Runtime encoder (None for PyTorch)."""
    if cfg.get("runtime", "torch") == "torch":
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
    quiet_runtime()
    try:
        app = build(cfg)
    except (RetrievalError, CatalogNotFoundError, FileNotFoundError, ConfigError) as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]fashion-serve:[/bold red] {err}")
        sys.exit(2)
    import uvicorn

    log.info("serving %s on http://%s:%s/ (API docs at /docs)", cfg.index_dir, cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=cfg.log_level, access_log=False)


if __name__ == "__main__":
    main()
