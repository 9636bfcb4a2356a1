"""fashion-recommend: answer one query (photo, text, item, history) from an index folder.

Prints a table, and writes ``recommendations.json`` and ``gallery.png`` into the run dir.
A bad query, a damaged index or checkpoint ends with a one-line error and exit status 2.
Item and history queries stay light: they import neither torch nor Lightning (start-up is most of
a CLI query's time); the model is loaded only for photo and text queries.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from fashion_lightning.data.images import to_native
from fashion_lightning.data.source import CatalogNotFoundError, CatalogSource
from fashion_lightning.retrieval import RecommendationResult, Recommender, RetrievalError
from fashion_lightning.retrieval.gallery import render_gallery, results_table
from fashion_lightning.retrieval.queries import check_k
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log
from fashion_lightning.utils.config_check import ConfigError, one_line_errors
from fashion_lightning.utils.runtime import engine_of
from fashion_lightning.utils.task_wrapper import task_wrapper

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from fashion_lightning.retrieval import Encoder


@task_wrapper
def recommend(cfg: DictConfig) -> RecommendationResult:
    k = check_k(cfg.k)  # before the index loads: k=abc or k=2.5 is a typo, not a query
    recommender = Recommender.from_dir(
        cfg.index_dir,
        allow_external_model=bool(cfg.allow_external_model),
        allow_qdrant_local=bool(cfg.get("allow_qdrant_local", False)),
    )
    if engine_of(cfg) == "onnx":  # the export's ONNX Runtime encoder, checked before the query
        from fashion_lightning.deploy.onnx_encoder import encoder_loader

        loader = encoder_loader(cfg, recommender.index.model_info.get("model_identity"))
        recommender = Recommender(recommender.index, encoder_loader=cast("Callable[[], Encoder]", loader))
    query = cast(dict[str, Any], OmegaConf.to_container(cfg.query, resolve=True))  # a DictConfig node: a dict
    all_filters = cast(dict[str, Any], OmegaConf.to_container(cfg.filters, resolve=True))
    filters = {k: v for k, v in all_filters.items() if v is not None}
    result = recommender.recommend(
        image=query["image"], text=query["text"], item_id=query["item_id"], history=query["history"],
        disliked=query["disliked"], half_life=query["half_life"], k=k, filters=filters,
    )  # fmt: skip
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "recommendations.json")
    Console().print(results_table(result))
    if cfg.gallery:
        root = cfg.catalog_root or recommender.index.model_info.get("catalog")
        if root is None:
            raise ConfigError("gallery=true needs catalog_root=...: the index does not record its catalog")
        source = CatalogSource(root)

        def load(item_id: int) -> np.ndarray:
            data = source.image_bytes(item_id)
            if data is None:  # not in this catalog: the gallery draws a placeholder
                raise KeyError(item_id)
            return to_native(data)

        images = query["image"]
        render_gallery(
            result, out / "gallery.png", load,
            query_images=[images] if isinstance(images, str) else images, query_text=query["text"],
        )  # fmt: skip
    log.info("recommendations.json%s written to %s", " and gallery.png" if cfg.gallery else "", out)
    return result


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="recommend")
def main(cfg: DictConfig) -> None:
    with one_line_errors(RetrievalError, CatalogNotFoundError, FileNotFoundError, app="fashion-recommend"):
        recommend(cfg)


if __name__ == "__main__":
    main()
