"""fashion-index: model + catalog -> FAISS index folder (vectors, items, the model, manifest with checksums).

The model (a training run's ``model/`` artefact, or a .ckpt) is copied into ``<index>/model/`` as
safetensors + typed JSON, so the folder is self-contained and loading it never unpickles anything.

With ``trainer=ddp`` every rank embeds its share into shards; a rerun of the same command after a crash
skips the items already in complete shards (see ``retrieval.predict_writer``).

``index.backend=qdrant`` upserts the vectors into a Qdrant collection instead (``retrieval.qdrant``);
``index.update_from=<index dir>`` embeds only what changed since that index (``retrieval.update``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import faiss
import hydra
import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from torch.utils.data import Subset, default_collate

from fashion_lightning.data.schema import COLUMNS
from fashion_lightning.models.artifact import (
    artifact_identity,
    copy_artifact,
    is_artifact,
    model_identity,
    save_artifact,
)
from fashion_lightning.models.base import CheckpointError, FashionModule, load_module
from fashion_lightning.retrieval.manifest import (
    BACKENDS,
    MANIFEST_FILE,
    MODEL_DIR,
    PARTS_FILE,
    IndexManifest,
    IndexParams,
    RetrievalError,
    model_record,
    read_items,
    read_manifest,
    read_parts,
    verified_model,
)
from fashion_lightning.retrieval.predict_writer import (
    METADATA_DROP,
    VECTOR_KEYS,
    IndexPredictionWriter,
    completed_ids,
)
from fashion_lightning.retrieval.qdrant import (
    FolderItems,
    QdrantIndexWriter,
    QdrantTarget,
    connect,
    open_store,
    payloads,
)
from fashion_lightning.retrieval.search import load_index
from fashion_lightning.retrieval.update import (
    EmbeddingCollector,
    UpdateError,
    catalog_frame,
    check_same_model,
    diff_catalog,
    merged_rows,
    parent_record,
    with_content_hash,
)
from fashion_lightning.retrieval.writer import IndexWriter
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log
from fashion_lightning.utils.atomic import atomic_dir, atomic_write_text, remove_dead_temps
from fashion_lightning.utils.config_check import ConfigError, one_line_errors
from fashion_lightning.utils.runtime import engine_of
from fashion_lightning.utils.task_wrapper import task_wrapper


@task_wrapper
def build(cfg: DictConfig) -> Path:
    """Returns the index folder."""
    L.seed_everything(cfg.seed, workers=True)
    index_cfg = cast(dict[str, Any], OmegaConf.to_container(cfg.index, resolve=True))  # a DictConfig node
    shard_rows = index_cfg.pop("shard_rows", 65536)
    backend, qdrant_cfg = index_cfg.pop("backend", "faiss"), index_cfg.pop("qdrant", None) or {}
    update_from = index_cfg.pop("update_from", None)
    if backend not in BACKENDS:
        raise ConfigError(f"index.backend must be one of {BACKENDS}, got {backend!r}")
    out_dir = Path(cfg.index_dir or Path(cfg.paths.output_dir) / "index")
    if update_from:
        return update(cfg, Path(update_from).expanduser(), out_dir, qdrant_cfg)
    if not cfg.ckpt_path:
        raise ConfigError("missing value for ckpt_path: set it on the command line, e.g. ckpt_path=<run>/model")
    source = Path(cfg.ckpt_path).expanduser().resolve()
    module = load_module(source)
    onnx = _onnx_loader(cfg, module, source)  # runtime=onnx: checked before anything is written
    if onnx is not None and backend != "faiss":
        raise ConfigError("runtime=onnx builds FAISS folders; build a Qdrant collection with runtime=torch")
    target = QdrantTarget(**qdrant_cfg) if backend == "qdrant" else None
    if target is not None and target.engine == "client":
        connect(target).close()  # an unreachable server: refused before any work
    datamodule = instantiate(cfg.data, vocabs=module.vocabs.to_dict(), tasks=module.vocabs.tasks)
    datamodule.setup("predict")
    store = None
    if target is not None:  # a collection of another dimension or model: refused before anything is written
        dim = _embedding_dim(module, datamodule)
        store = open_store(target, dim, model_identity(source, module), create=True)
    model = _place_model(module, source, out_dir) if cfg.get("copy_model", True) else source
    model_info = {
        **model_record(model, out_dir),
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "embedding_name": module.embedding_name,
        "tasks": module.vocabs.tasks,
        "catalog": str(datamodule.catalog.source.root),
    }
    frame = with_content_hash(datamodule.predict_frame)
    make_writer = None
    if store is not None:
        make_writer = lambda: QdrantIndexWriter(out_dir, model_info, store.target, store.dim, store)  # noqa: E731
    writer = IndexPredictionWriter(
        out_dir, frame, model_info, IndexParams(**index_cfg), shard_rows=shard_rows, make_writer=make_writer
    )
    done = completed_ids(out_dir)
    if onnx is not None:
        if len(done):
            raise ConfigError(f"{out_dir} holds shards of an interrupted build: resume it with runtime=torch")
        model_info["runtime"] = f"onnxruntime {cfg.get('onnx_precision') or 'fp32'} ({cfg.onnx_dir})"
        manifest = _embed_with_onnx(onnx(), datamodule, frame, out_dir, model_info, IndexParams(**index_cfg))
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
    if store is not None:
        store.close()  # local mode: releases the folder's lock for the next client
    if trainer.is_global_zero:
        m = writer.manifest
        assert m is not None  # rank 0's on_predict_end / merge() wrote it
        where = f"Qdrant collection {m.index['collection']!r}" if m.backend == "qdrant" else m.index["type"]
        Console().print(
            f"[bold]index[/bold] {out_dir}: {m.count} items x {m.dim} dims, {where}, "
            f"{m.bytes_per_item:.0f} bytes/item ({module.embedding_name})"
        )
        log.info("index written to %s", out_dir)
    return out_dir


def update(cfg: DictConfig, parent_dir: Path, out_dir: Path, qdrant_cfg: dict[str, Any]) -> Path:
    """A new index folder for today's catalog from ``parent_dir``, embedding only new or changed items.

    Every refusal (another model, a parent without hashes or exact vectors, an unreachable or
    mismatched Qdrant collection, an existing output folder) comes before anything is written."""
    parent = read_manifest(parent_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UpdateError(f"{out_dir} exists and is not empty; an update writes a new index folder")
    parent_model = verified_model(parent.model, parent_dir)
    if parent_model is None or not parent_model.exists():
        raise UpdateError(f"{parent_dir}: the model that built it is not in the folder; do a full build")
    given = Path(cfg.ckpt_path) if cfg.ckpt_path else None
    identity = check_same_model(parent, model_identity(given.expanduser().resolve()) if given else None, parent_dir)
    if check_same_model(parent, model_identity(parent_model), parent_dir) != identity:  # the folder's own copy
        raise UpdateError(f"{parent_model} does not hold the model {parent_dir}'s manifest names")
    store = None
    if parent.backend == "qdrant":  # the collection is checked (reachable, dimension, model) before any work
        target = QdrantTarget.from_record(parent.index)
        named = qdrant_cfg.get("path")
        trusted = named is not None and Path(named).expanduser().resolve() == Path(str(target.path)).resolve()
        if target.engine == "client" and target.path is not None and not (trusted or cfg.get("allow_qdrant_local")):
            raise UpdateError(
                f"{parent_dir} keeps its vectors in Qdrant local storage {target.path} (read with pickle): name "
                f"it again with index.qdrant.path={target.path} (or allow_qdrant_local=true) to update it"
            )
        store = open_store(target, parent.dim, identity, create=False)
    elif parent.index.get("type") == "ivfpq" and "vectors.f32" not in parent.files:
        raise UpdateError(f"{parent_dir} is IVF-PQ without exact vectors (index.rerank=0): do a full build")
    try:
        module = load_module(parent_model)
        datamodule = instantiate(cfg.data, vocabs=module.vocabs.to_dict(), tasks=module.vocabs.tasks)
        frame, source = catalog_frame(datamodule)  # today's catalog, hashed without decoding a photo
        old = load_index(parent_dir) if store is None else None  # FAISS: the parent's vectors
        parent_items = old.items if old is not None else read_items(parent_dir / "items.csv", parent)
        diff = diff_catalog(frame, parent_items)
        log.info("update from %s: %s", parent_dir, diff.summary())
        collector = EmbeddingCollector()
        if len(diff.todo):
            todo = frame.iloc[diff.todo].reset_index(drop=True)
            embedded = _embed_only(cfg, module, source, todo, collector)
            if len(embedded) < len(todo):  # photos that do not decode: a full build drops them too
                frame = frame[~frame["id"].isin(np.setdiff1d(todo["id"], embedded))].reset_index(drop=True)
                diff = diff_catalog(frame, parent_items)
        new = collector.by_id(frame["id"].to_numpy()[diff.todo])
        parts = old.parts if old is not None else (read_parts(parent_dir / PARTS_FILE, parent) if parent.parts else {})
        record = {**parent_record(parent_dir, parent), "embedded": len(diff.todo), "retired": len(diff.retired)}
        with atomic_dir(out_dir, prefix=".updating-") as tmp:
            model_info = {**parent.model, **model_record(copy_artifact(parent_model, tmp / MODEL_DIR), tmp)}
            model_info["catalog"] = str(source.root)
            if store is not None:  # in place: upsert the embedded items, delete the retired ones, then the folder
                if len(diff.todo):
                    vectors = np.array(new["embedding"], dtype=np.float32)
                    faiss.normalize_L2(vectors)
                    todo = frame.iloc[diff.todo].reset_index(drop=True)
                    store.upsert(todo["id"].to_numpy(), vectors, payloads(todo, identity))
                store.delete(diff.retired)
                folder = FolderItems(tmp)
                for _, meta, extra in merged_rows(frame, diff, new, None, parts, parent.dim):
                    folder.add(meta, extra or None)
                manifest = folder.finalize(parent.dim, dict(parent.index), model_info, parent=record)
            else:
                assert old is not None
                params = IndexParams.from_record(parent.index)
                with IndexWriter(tmp, model_info, params, normalize=False, expected_count=len(frame)) as fw:
                    for unit, meta, extra in merged_rows(frame, diff, new, old.vectors, parts, parent.dim):
                        assert unit is not None  # FAISS: every vector comes out (the parent's or a new one)
                        fw.add(unit, meta, extra or None)
                    manifest = fw.finalize()
                manifest.normalized, manifest.parent = parent.normalized, record
                atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2) + "\n")
    finally:
        if store is not None:
            store.close()  # local mode: releases the folder's lock
    Console().print(f"[bold]index[/bold] {out_dir}: {manifest.count} items from {parent_dir} ({diff.summary()})")
    return out_dir


def _embed_only(
    cfg: DictConfig, module: FashionModule, source: Any, rows: pd.DataFrame, collector: EmbeddingCollector
) -> np.ndarray:
    """Embed just ``rows``: they are written as a small catalog of their own (cleaned fields, their photos'
    bytes) and run through the usual datamodule and ``trainer.predict``, so only these photos are decoded.
    Returns the ids embedded (a photo that does not decode is dropped, as a full build drops it)."""
    with tempfile.TemporaryDirectory(prefix="fl-update-") as scratch:
        root = Path(scratch) / "catalog"
        (root / "images").mkdir(parents=True)
        rows[[c for c in COLUMNS if c in rows.columns]].to_csv(root / "styles.csv", index=False)
        for item in rows["id"].tolist():
            (root / "images" / f"{item}.jpg").write_bytes(source.image_bytes(item))
        datamodule = instantiate(
            cfg.data, root=str(root), cache_dir=str(Path(scratch) / "cache"), output_dir=None, max_items=None,
            splits_path=None, split="all", vocabs=module.vocabs.to_dict(), tasks=module.vocabs.tasks,
        )  # fmt: skip
        datamodule.setup("predict")
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[collector])
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        return datamodule.predict_frame["id"].to_numpy()


def _embedding_dim(module: FashionModule, datamodule: Any) -> int:
    """The width of the vectors this model writes, from one catalog item."""
    batch = default_collate([datamodule.datasets[datamodule.hparams.split][0]])
    with torch.no_grad():
        return int(module.predict_step(batch)["embedding"].shape[1])


def _onnx_loader(cfg: DictConfig, module: FashionModule, source: Path) -> Callable[[], Any] | None:
    """``runtime=onnx``: the export's encoder loader, after checking it was exported from this model."""
    if engine_of(cfg) == "torch":
        return None
    from fashion_lightning.deploy.onnx_encoder import encoder_loader

    return encoder_loader(cfg, model_identity(source, module))


def _embed_with_onnx(
    encoder: Any, datamodule: Any, frame: pd.DataFrame, out_dir: Path, model_info: dict[str, Any], params: IndexParams
) -> IndexManifest:
    """The catalog (``frame``: the predict split with content hashes) through ONNX Runtime in loader batches,
    into the same streaming writer (same folder)."""
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
    remove_dead_temps(out_dir)  # a scratch copy a killed build left
    if artifact_identity(target) != model_identity(source, module, scratch_dir=out_dir):
        raise CheckpointError(f"{target} holds another model than {source}; use a new index_dir")
    return target


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="index")
def main(cfg: DictConfig) -> None:
    from fashion_lightning.retrieval.manifest import ModelLoadError  # a bad export folder (runtime=onnx)

    with one_line_errors(CheckpointError, FileNotFoundError, RetrievalError, ModelLoadError, app="fashion-index"):
        build(cfg)


if __name__ == "__main__":
    main()
