"""fashion-index: checkpoint + catalog -> FAISS index folder (vectors, items, manifest with checksums).

With ``trainer=ddp`` every rank embeds its share into shards; a rerun of the same command after a crash
skips the items already in complete shards (see ``retrieval.predict_writer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.utils.data import Subset

from fashion_lightning.models.base import CheckpointError, load_module
from fashion_lightning.retrieval.manifest import IndexParams, checkpoint_record
from fashion_lightning.retrieval.predict_writer import IndexPredictionWriter, completed_ids
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
        **checkpoint_record(ckpt, out_dir),
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "embedding_name": module.embedding_name,
        "tasks": module.vocabs.tasks,
        "catalog": str(datamodule.catalog.source.root),
    }
    index_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.index, resolve=True))  # a DictConfig node
    shard_rows = index_cfg.pop("shard_rows", 65536)
    frame = datamodule.predict_frame
    writer = IndexPredictionWriter(out_dir, frame, model_info, IndexParams(**index_cfg), shard_rows=shard_rows)
    done = completed_ids(out_dir)
    if len(done):  # resume: embed only what no complete shard holds
        split = datamodule.hparams.split
        todo = np.flatnonzero(~np.isin(frame["id"].to_numpy(), done))
        log.info("resuming: %d of %d items already embedded in %s", len(frame) - len(todo), len(frame), out_dir)
        datamodule.datasets[split] = Subset(datamodule.datasets[split], todo.tolist())
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[writer])
    if len(done) and len(done) >= len(frame):
        writer.merge()
    else:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if trainer.is_global_zero:
        m = writer.manifest
        assert m is not None  # rank 0's on_predict_end / merge() wrote it
        Console().print(
            f"[bold]index[/bold] {out_dir}: {m.count} items x {m.dim} dims, {m.index['type']}, "
            f"{m.bytes_per_item:.0f} bytes/item ({module.embedding_name})"
        )
        log.info("index written to %s", out_dir)
    return out_dir


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="index")
def main(cfg: DictConfig) -> None:
    quiet_runtime()
    with one_line_errors(CheckpointError, FileNotFoundError):
        build(cfg)


if __name__ == "__main__":
    main()
