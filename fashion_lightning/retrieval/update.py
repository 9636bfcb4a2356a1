"""A living catalog: today's index from yesterday's, embedding only what changed.

A shop adds and retires products every day; re-embedding the whole catalog for each change costs a full
forward pass per item. Every index row carries a ``content_hash`` (sha256 of the photo's sha1 and the
catalog fields), so an update compares today's catalog with the parent index's items and embeds only
new items and items whose photo or metadata changed; retired ids are dropped. The rest of the vectors
are copied from the parent, so the result equals a full rebuild of today's catalog (same rows, same
order, same vectors) at a fraction of its cost.

* FAISS parent: a NEW index folder, written under a temporary name and renamed into place
  (``utils.atomic.atomic_dir``), whose manifest records its ``parent``.
* Qdrant parent: the collection is upserted and deleted in place (point id = item id), then the new
  folder is written the same way.

Everything that can refuse the update does so before anything is written: another model than the
parent's, a parent without content hashes or exact vectors, a collection of another dimension or model,
an unreachable Qdrant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from fashion_lightning.data.schema import COLUMNS
from fashion_lightning.retrieval.manifest import MANIFEST_FILE, IndexManifest, RetrievalError, sha256_file

HASH_COLUMN = "content_hash"
#: what the hash covers: the photo (by its bytes' sha1) and every catalog field of the schema
HASHED_FIELDS: tuple[str, ...] = ("image_sha1", *[c for c in COLUMNS if c != "id"])
VECTOR_KEYS = ("embedding", "image_embedding", "text_embedding")


class UpdateError(RetrievalError):
    """The update cannot be made from this parent (another model, no content hashes, no exact vectors)."""


def content_hashes(frame: pd.DataFrame) -> pd.Series:
    """sha256 (first 32 hex) of each row's photo hash and catalog fields, as canonical JSON."""
    fields = [c for c in HASHED_FIELDS if c in frame.columns]
    values = frame[fields].astype(object).where(frame[fields].notna(), None).to_numpy().tolist()
    digests = [
        hashlib.sha256(json.dumps([_canonical(v) for v in row], ensure_ascii=False).encode()).hexdigest()[:32]
        for row in values
    ]
    return pd.Series(digests, index=frame.index, name=HASH_COLUMN)


def _canonical(value: Any) -> Any:
    """One spelling per value: numpy scalars as Python ones, whole floats as ints (2012.0 == 2012)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def with_content_hash(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(**{HASH_COLUMN: content_hashes(frame)})


@dataclass(frozen=True)
class CatalogDiff:
    """Today's catalog against the parent's items."""

    parent_rows: np.ndarray  # per catalog row: the parent row holding the same content, -1 = embed it
    retired: np.ndarray  # parent ids not in today's catalog
    new: int
    changed: int

    @property
    def todo(self) -> np.ndarray:
        """Catalog positions to embed (new or changed)."""
        return np.flatnonzero(self.parent_rows < 0)

    def summary(self) -> str:
        kept = int((self.parent_rows >= 0).sum())
        return f"{kept} unchanged, {self.changed} changed, {self.new} new, {len(self.retired)} retired"


def diff_catalog(frame: pd.DataFrame, parent_items: pd.DataFrame) -> CatalogDiff:
    if HASH_COLUMN not in parent_items.columns:
        raise UpdateError(
            "the parent index has no content_hash column (built by an older fashion-index); rebuild it once "
            "with this version, then update from that"
        )
    ids = frame["id"].to_numpy(dtype=np.int64)
    parent_ids = parent_items["id"].to_numpy(dtype=np.int64)
    rows = pd.Index(parent_ids).get_indexer(ids)
    known = rows >= 0
    same = np.zeros(len(ids), bool)
    same[known] = parent_items[HASH_COLUMN].to_numpy()[rows[known]] == frame[HASH_COLUMN].to_numpy()[known]
    parent_rows = np.where(same, rows, -1)
    retired = np.setdiff1d(parent_ids, ids)
    return CatalogDiff(parent_rows, retired, new=int((~known).sum()), changed=int((known & ~same).sum()))


def parent_record(parent_dir: Path, manifest: IndexManifest) -> dict[str, Any]:
    """What a child's manifest says about its parent: where, which version, what changed is in the log."""
    digest = sha256_file(parent_dir / MANIFEST_FILE)
    return {
        "path": str(parent_dir.resolve()),
        "manifest_sha256": digest,
        "version": digest[:12],
        "created_at": manifest.created_at,
        "count": manifest.count,
    }


def check_same_model(parent: IndexManifest, identity: str | None, where: Path) -> str:
    """The parent's model identity; an update with another model would mix two embedding spaces."""
    theirs = parent.model.get("model_identity")
    if not isinstance(theirs, str) or not theirs:
        raise UpdateError(f"{where}: its manifest records no model identity; rebuild it with fashion-index")
    if identity is not None and identity != theirs:
        raise UpdateError(
            f"{where} was built by another model (identity {theirs[:12]}..., this checkpoint's is "
            f"{identity[:12]}...): its vectors and new ones would not be comparable; do a full build instead"
        )
    return theirs


class EmbeddingCollector(BasePredictionWriter):
    """Keeps the predicted vectors of the (few) items an update embeds, by id, in memory."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.arrays: dict[str, list[np.ndarray]] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for key, value in prediction.items():
            if key in (*VECTOR_KEYS, "id"):
                self.arrays.setdefault(key, []).append(torch.as_tensor(value).cpu().numpy())

    def by_id(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Each collected array in the order of ``ids`` (all must have been embedded)."""
        if not self.arrays:
            return {}
        got = np.concatenate(self.arrays["id"]).astype(np.int64)
        pos = pd.Index(got).get_indexer(np.asarray(ids, dtype=np.int64))
        if (pos < 0).any():
            raise RuntimeError(f"items {np.asarray(ids)[pos < 0][:5].tolist()} were not embedded")
        return {k: np.concatenate(v)[pos] for k, v in self.arrays.items() if k != "id"}


def merged_rows(
    frame: pd.DataFrame,
    diff: CatalogDiff,
    new: Mapping[str, np.ndarray],
    parent_vectors: Callable[[np.ndarray], np.ndarray] | None,
    parent_parts: Mapping[str, np.ndarray],
    dim: int,
    chunk: int = 65536,
) -> Iterator[tuple[np.ndarray | None, pd.DataFrame, dict[str, np.ndarray]]]:
    """Today's catalog in order, chunk by chunk: (unit vectors, metadata, parts). Unchanged rows come from
    the parent bit for bit, embedded ones normalised as the index writer normalises them. Without
    ``parent_vectors`` (Qdrant: the collection keeps them) the vectors are None."""
    import faiss

    slot = np.full(len(frame), -1, np.int64)
    slot[diff.todo] = np.arange(len(diff.todo))
    fresh = {k: np.array(v, dtype=np.float32) for k, v in new.items()}
    if "embedding" in fresh:
        faiss.normalize_L2(fresh["embedding"])
    sources: dict[str, Callable[[np.ndarray], np.ndarray]] = {k: v.__getitem__ for k, v in parent_parts.items()}
    dims = {k: v.shape[1] for k, v in parent_parts.items()}
    if parent_vectors is not None:
        sources, dims = {"embedding": parent_vectors, **sources}, {"embedding": dim, **dims}
    for start in range(0, len(frame), chunk):
        rows, slots = diff.parent_rows[start : start + chunk], slot[start : start + chunk]
        kept = rows >= 0
        out: dict[str, np.ndarray] = {}
        for key, old in sources.items():
            block = np.empty((len(rows), dims[key]), np.float32)
            if kept.any():
                block[kept] = old(rows[kept])
            if (~kept).any():
                block[~kept] = fresh[key][slots[~kept]]
            out[key] = block
        yield out.pop("embedding", None), frame.iloc[start : start + chunk].reset_index(drop=True), out
