"""Lightning prediction writer that streams a catalog's embeddings into an index folder.

Images flow through ``trainer.predict`` batch by batch and are never held. On one device each batch goes
straight into the :class:`IndexWriter`. With several devices (``trainer=ddp``, any number of nodes)
every rank writes shards of at most ``shard_rows`` vectors into ``<index>/.shards/``; each shard is a set
of ``.npy`` files plus a JSON record of their sizes and sha256, written last. Rank 0 then merges the
complete shards in catalog order, so the folder equals the single-device one, and removes them.

A rerun after a crash keeps every shard whose record still matches its files: :func:`completed_ids`
tells the app which items to skip, and only the rest are embedded again.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fashion_lightning.retrieval.manifest import (
    IndexIntegrityError,
    IndexManifest,
    IndexParams,
    file_record,
    verify_file,
)
from fashion_lightning.retrieval.writer import IndexWriter
from fashion_lightning.utils.atomic import atomic_path, atomic_write_text

VECTOR_KEYS = ("embedding", "image_embedding", "text_embedding")
METADATA_DROP = ("cache_row",)
SHARD_DIR = ".shards"
MERGE_CHUNK = 65536


def complete_shards(out_dir: str | Path) -> list[dict[str, Any]]:
    """Shards whose record matches every file (size + sha256), oldest first; damaged ones are skipped."""
    shard_dir = Path(out_dir) / SHARD_DIR
    shards = []
    for record_path in sorted(shard_dir.glob("*.json")):
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            for name, expected in record["files"].items():
                verify_file(shard_dir / name, expected, listed_in=record_path.name)
        except (OSError, ValueError, KeyError, TypeError, IndexIntegrityError):
            continue  # its items are embedded again
        shards.append({**record, "dir": shard_dir})
    return shards


def completed_ids(out_dir: str | Path) -> np.ndarray:
    """Item ids already embedded in complete shards (a resumed run skips them)."""
    ids = [np.load(s["dir"] / s["files_by_key"]["id"]) for s in complete_shards(out_dir)]
    return np.unique(np.concatenate(ids)) if ids else np.empty(0, np.int64)


class IndexPredictionWriter(BasePredictionWriter):
    def __init__(
        self,
        out_dir: str | Path,
        catalog: pd.DataFrame,
        model_info: dict[str, Any],
        params: IndexParams,
        shard_rows: int = 65536,
        make_writer: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.catalog = catalog.drop(columns=[c for c in METADATA_DROP if c in catalog]).set_index("id", drop=False)
        self.model_info = model_info
        self.params = params
        self.shard_rows = int(shard_rows)
        self.make_writer = make_writer  # another backend's writer (Qdrant), with IndexWriter's add / finalize
        self.writer: Any = None  # IndexWriter, or make_writer's
        self._shard: dict[str, list[np.ndarray]] = {}
        self._sharded = (self.out_dir / SHARD_DIR).is_dir()  # a resumed run merges what is already there
        self.manifest: IndexManifest | None = None

    def _writer(self) -> IndexWriter:
        if self.writer is None and self.make_writer is not None:
            self.writer = self.make_writer()
        if self.writer is None:
            self.writer = IndexWriter(self.out_dir, self.model_info, self.params, expected_count=len(self.catalog))
        return self.writer

    def _add(self, arrays: dict[str, np.ndarray]) -> None:
        parts = {k: arrays[k] for k in VECTOR_KEYS[1:] if k in arrays}
        self._writer().add(arrays["embedding"], self.catalog.loc[arrays["id"]].reset_index(drop=True), parts or None)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._sharded = self._sharded or trainer.world_size > 1

    def write_on_batch_end(
        self, trainer, pl_module, prediction: dict, batch_indices, batch, batch_idx, dataloader_idx=0
    ):
        arrays = {k: torch.as_tensor(v).cpu().numpy() for k, v in prediction.items() if k in (*VECTOR_KEYS, "id")}
        if not self._sharded:
            self._add(arrays)
            return
        for key, value in arrays.items():
            self._shard.setdefault(key, []).append(value)
        if sum(len(v) for v in self._shard["id"]) >= self.shard_rows:
            self._flush(trainer.global_rank)

    def _flush(self, rank: int) -> None:
        """Write the buffered rows as one shard: arrays first, the record (sizes + sha256) last."""
        if not self._shard:
            return
        shard_dir = self.out_dir / SHARD_DIR
        name = f"rank{rank:04d}-{uuid.uuid4().hex[:12]}"
        files = {}
        for key, values in self._shard.items():
            path = shard_dir / f"{name}.{key}.npy"
            with atomic_path(path) as tmp:
                np.save(tmp, np.concatenate(values))
            files[key] = path.name
        self._shard = {}
        record = {
            "rank": rank,
            "count": len(np.load(shard_dir / files["id"])),
            "files_by_key": files,
            "files": {f: file_record(shard_dir / f) for f in files.values()},
        }
        atomic_write_text(shard_dir / f"{name}.json", json.dumps(record, indent=1))

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._sharded:
            self._flush(trainer.global_rank)
            if trainer.world_size > 1:
                trainer.strategy.barrier("index-shards")
            if not trainer.is_global_zero:
                return
            self.merge()
            return
        if trainer.is_global_zero:
            self.manifest = self._writer().finalize()

    def merge(self) -> IndexManifest:
        """Add every complete shard's rows in catalog order (streaming: one chunk gathered at a time)."""
        shards = complete_shards(self.out_dir)
        maps = [{k: np.load(s["dir"] / f, mmap_mode="r") for k, f in s["files_by_key"].items()} for s in shards]
        if not maps:
            raise ValueError(f"{self.out_dir / SHARD_DIR}: no complete shards to merge")
        ids = np.concatenate([m["id"] for m in maps])
        owner = np.concatenate([np.full(len(m["id"]), i) for i, m in enumerate(maps)])
        row = np.concatenate([np.arange(len(m["id"])) for m in maps])
        position = pd.Index(self.catalog["id"].to_numpy()).get_indexer(ids)
        if (position < 0).any():
            raise ValueError(f"shards hold ids not in the catalog, e.g. {ids[position < 0][:5].tolist()}")
        _, first = np.unique(position, return_index=True)  # samplers pad with repeats; reruns may overlap
        if len(first) != len(self.catalog):
            missing = np.setdiff1d(np.arange(len(self.catalog)), position)
            raise ValueError(
                f"shards cover {len(first)} of {len(self.catalog)} items (missing rows {missing[:5].tolist()})"
            )
        order = first[np.argsort(position[first], kind="stable")]
        keys = list(maps[0])
        for start in range(0, len(order), MERGE_CHUNK):
            take = order[start : start + MERGE_CHUNK]
            chunk = {}
            for key in keys:
                sample = maps[0][key]
                out = np.empty((len(take), *sample.shape[1:]), sample.dtype)
                for i in np.unique(owner[take]):
                    hit = owner[take] == i
                    out[hit] = maps[i][key][row[take[hit]]]
                chunk[key] = out
            self._add(chunk)
        self.manifest = self._writer().finalize()
        del maps
        shutil.rmtree(self.out_dir / SHARD_DIR)  # our own scratch files, merged into the index
        return self.manifest
