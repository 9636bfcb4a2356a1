"""Lightning prediction writer that streams a catalog's embeddings into an index folder.

Images flow through ``trainer.predict`` batch by batch and are never held. On one device each
batch goes straight into the :class:`IndexWriter`; with several devices every rank writes a
shard of vectors and rank 0 merges them, so ``fashion-index trainer=ddp`` gives the same folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fashion_lightning.retrieval.manifest import IndexManifest, IndexParams
from fashion_lightning.retrieval.writer import IndexWriter

VECTOR_KEYS = ("embedding", "image_embedding", "text_embedding")
METADATA_DROP = ("cache_row",)


class IndexPredictionWriter(BasePredictionWriter):
    def __init__(self, out_dir: str | Path, catalog: pd.DataFrame, model_info: dict[str, Any], params: IndexParams) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.catalog = catalog.drop(columns=[c for c in METADATA_DROP if c in catalog]).set_index("id", drop=False)
        self.model_info = model_info
        self.params = params
        self.writer: IndexWriter | None = None
        self._shard: dict[str, list[np.ndarray]] = {}
        self.manifest: IndexManifest | None = None

    def _add(self, arrays: dict[str, np.ndarray]) -> None:
        if self.writer is None:
            self.writer = IndexWriter(self.out_dir, self.model_info, self.params)
        parts = {k: arrays[k] for k in VECTOR_KEYS[1:] if k in arrays}
        self.writer.add(arrays["embedding"], self.catalog.loc[arrays["id"]].reset_index(drop=True), parts or None)

    def write_on_batch_end(self, trainer, pl_module, prediction: dict, batch_indices, batch, batch_idx, dataloader_idx=0):
        arrays = {k: torch.as_tensor(v).cpu().numpy() for k, v in prediction.items() if k in (*VECTOR_KEYS, "id")}
        if trainer.world_size == 1:
            self._add(arrays)
        else:
            for key, value in arrays.items():
                self._shard.setdefault(key, []).append(value)

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.world_size > 1:
            self._merge_shards(trainer)
        if trainer.is_global_zero:
            self.manifest = self.writer.finalize()

    def _merge_shards(self, trainer) -> None:
        shard_dir = self.out_dir / ".shards"
        shard_dir.mkdir(parents=True, exist_ok=True)
        np.savez(shard_dir / f"rank{trainer.global_rank}.npz", **{k: np.concatenate(v) for k, v in self._shard.items()})
        trainer.strategy.barrier("index-shards")
        if not trainer.is_global_zero:
            return
        shards = [dict(np.load(p)) for p in sorted(shard_dir.glob("rank*.npz"))]
        merged = {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}
        _, first = np.unique(merged["id"], return_index=True)  # distributed samplers pad with repeats
        keep = np.sort(first)
        self._add({k: v[keep] for k, v in merged.items()})
        for p in shard_dir.glob("rank*.npz"):
            p.unlink()
        shard_dir.rmdir()
