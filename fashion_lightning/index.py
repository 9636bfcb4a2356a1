"""fashion-index: checkpoint + catalog -> FAISS index folder (vectors, items, manifest with checksums)."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console

from fashion_lightning.models.base import CheckpointError, load_module
from fashion_lightning.retrieval.manifest import IndexParams
from fashion_lightning.retrieval.predict_writer import IndexPredictionWriter
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log, quiet_runtime
from fashion_lightning.utils.config_check import one_line_errors
from fashion_lightning.utils.task_wrapper import task_wrapper


@task_wrapper
def build(cfg: DictConfig) -> Path:
    """Returns the index folder."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt = str(Path(cfg.ckpt_path).expanduser().resolve())
    module = load_module(ckpt)
    datamodule = instantiate(cfg.data, vocabs=module.vocabs.to_dict(), tasks=module.vocabs.tasks)
    datamodule.setup("predict")
    out_dir = Path(cfg.index_dir or Path(cfg.paths.output_dir) / "index")
    model_info = {
        "checkpoint": ckpt,
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "embedding_name": module.embedding_name,
        "tasks": module.vocabs.tasks,
        "catalog": str(datamodule.catalog.source.root),
    }
    writer = IndexPredictionWriter(out_dir, datamodule.predict_frame, model_info, IndexParams(**cfg.index))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if trainer.is_global_zero:
        m = writer.manifest
        Console().print(f"[bold]index[/bold] {out_dir}: {m.count} items x {m.dim} dims, {m.index['type']}, "
                        f"{m.bytes_per_item:.0f} bytes/item ({module.embedding_name})")
        log.info("index written to %s", out_dir)
    return out_dir


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="index")
def main(cfg: DictConfig) -> None:
    quiet_runtime()
    with one_line_errors(CheckpointError, FileNotFoundError):
        build(cfg)


if __name__ == "__main__":
    main()
