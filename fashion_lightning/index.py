"""fashion-index: model + catalog -> FAISS index folder (vectors, items, the model, manifest with checksums).

The model (a training run's ``model/`` artefact, or a .ckpt) is copied into ``<index>/model/`` as
safetensors + typed JSON, so the folder is self-contained and loading it never unpickles anything.

With ``trainer=ddp`` every rank embeds its share into shards; a rerun of the same command after a crash
skips the items already in complete shards (see ``retrieval.predict_writer``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.utils.data import Subset

from fashion_lightning.models.artifact import artifact_identity, copy_artifact, is_artifact, save_artifact
from fashion_lightning.models.base import CheckpointError, FashionModule, load_module
from fashion_lightning.retrieval.manifest import MODEL_DIR, IndexManifest, IndexParams, model_record
from fashion_lightning.retrieval.predict_writer import (
    METADATA_DROP,
    VECTOR_KEYS,
    IndexPredictionWriter,
    completed_ids,
)
from fashion_lightning.retrieval.writer import IndexWriter
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log, quiet_runtime
from fashion_lightning.utils.config_check import ConfigError, one_line_errors
from fashion_lightning.utils.task_wrapper import task_wrapper


@task_wrapper
def build(cfg: DictConfig) -> Path:
    """Returns the index folder."""
    L.seed_everything(cfg.seed, workers=True)
    source = Path(cfg.ckpt_path).expanduser().resolve()
    module = load_module(source)
    onnx = _onnx_loader(cfg, module, source)  # runtime=onnx: checked before anything is written
    datamodule = instantiate(cfg.data, vocabs=module.vocabs.to_dict(), tasks=module.vocabs.tasks)
    datamodule.setup("predict")
    out_dir = Path(cfg.index_dir or Path(cfg.paths.output_dir) / "index")
    model = _place_model(module, source, out_dir) if cfg.get("copy_model", True) else source
    model_info = {
        **model_record(model, out_dir),
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
    if onnx is not None:
        if len(done):
            raise ConfigError(f"{out_dir} holds shards of an interrupted build: resume it with runtime=torch")
        model_info["runtime"] = f"onnxruntime {cfg.get('onnx_precision') or 'fp32'} ({cfg.onnx_dir})"
        manifest = _embed_with_onnx(onnx(), datamodule, out_dir, model_info, IndexParams(**index_cfg))
        Console().print(f"[bold]index[/bold] {out_dir}: {manifest.count} items x {manifest.dim} dims (ONNX Runtime)")
        return out_dir
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


def _onnx_loader(cfg: DictConfig, module: FashionModule, source: Path) -> Callable[[], Any] | None:
    """``runtime=onnx``: the export's encoder loader, after checking it was exported from this model."""
    if cfg.get("runtime", "torch") == "torch":
        return None
    from fashion_lightning.deploy.onnx_encoder import encoder_loader
    from fashion_lightning.deploy.onnx_export import model_identity

    return encoder_loader(cfg, model_identity(module, source))


def _embed_with_onnx(
    encoder: Any, datamodule: Any, out_dir: Path, model_info: dict[str, Any], params: IndexParams
) -> IndexManifest:
    """The catalog through ONNX Runtime in loader batches, into the same streaming writer (same folder)."""
    frame = datamodule.predict_frame
    catalog = frame.drop(columns=[c for c in METADATA_DROP if c in frame]).set_index("id", drop=False)
    with IndexWriter(out_dir, model_info, params, expected_count=len(catalog)) as writer:
        for batch in datamodule.predict_dataloader():
            ids = batch["id"].numpy()
            texts = [str(t) for t in batch["text"]] if "text" in batch else None
            out = encoder.embed_items(batch["image"].numpy(), texts)
            parts = {k: out[k] for k in VECTOR_KEYS[1:] if k in out}
            writer.add(out["embedding"], catalog.loc[ids].reset_index(drop=True), parts or None)
        return writer.finalize()


def _place_model(module: FashionModule, source: Path, out_dir: Path) -> Path:
    """The model artefact inside the index folder (``<index>/model``): copied from an artefact, written from
    a .ckpt. A resumed build keeps an existing copy only if it holds the same weights."""
    target = out_dir / MODEL_DIR
    if not target.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        return copy_artifact(source, target) if is_artifact(source) else save_artifact(module, target)
    if is_artifact(source):
        ours = artifact_identity(source)
    else:  # the artefact this .ckpt would give, written aside to compare its weights' sha256
        with tempfile.TemporaryDirectory(prefix=".tmp-model-", dir=out_dir) as scratch:
            ours = artifact_identity(save_artifact(module, Path(scratch) / MODEL_DIR))
    if artifact_identity(target) != ours:
        raise CheckpointError(f"{target} holds another model than {source}; use a new index_dir")
    return target


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="index")
def main(cfg: DictConfig) -> None:
    quiet_runtime()
    from fashion_lightning.retrieval.queries import ModelLoadError  # a bad export folder (runtime=onnx)

    with one_line_errors(CheckpointError, FileNotFoundError, ModelLoadError):
        build(cfg)


if __name__ == "__main__":
    main()
