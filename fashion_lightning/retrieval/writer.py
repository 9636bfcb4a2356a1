"""Streaming index builds with memory bounded independently of the catalog size.

* Flat and HNSW add every chunk straight into the FAISS index, whose float32 storage is the only copy;
  they refuse up front (or as soon as the running count crosses it) a catalog over
  ``index.max_memory_gb``, suggesting ivfpq.
* IVF and IVF-PQ stream each chunk to a raw float32 file on disk and keep a seeded reservoir sample
  (``index.train_size`` vectors, uniform over the whole stream whatever its order). ``finalize`` trains
  the coarse quantiser (and PQ codebooks) on the sample, then reads the file back chunk by chunk into
  the lists, so peak memory is sample + one chunk + the codes. With ``index.rerank > 0`` the file stays
  in the folder as ``vectors.f32`` for exact re-ranking; otherwise it is deleted.

Every file is written under a temporary name and renamed (``utils.atomic``); the manifest comes last.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pandas as pd

from fashion_lightning.retrieval.manifest import (
    EXACT_FILE,
    INDEX_TYPES,
    ITEMS_FILE,
    IVF_TYPES,
    MANIFEST_FILE,
    PARTS_FILE,
    VECTORS_FILE,
    IndexManifest,
    IndexParams,
    file_record,
    model_record,
)
from fashion_lightning.retrieval.search import configure_threads
from fashion_lightning.utils.atomic import atomic_path, atomic_write_text


def column_kind(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    return "str"


class _Reservoir:
    """Seeded uniform sample of ``capacity`` rows from a stream (Algorithm R, vectorised per chunk).

    Row ``i`` of the stream replaces slot ``floor(u_i * (i + 1))`` when that is below ``capacity``; one
    uniform double per row, so the sample depends on the seed and the stream, not on how it was chunked.
    """

    def __init__(self, capacity: int, dim: int, seed: int) -> None:
        self.capacity, self.seen = int(capacity), 0
        self.rng = np.random.default_rng(seed)
        self.rows = np.empty((self.capacity, dim), np.float32)  # untouched pages cost no RSS

    def add(self, chunk: np.ndarray) -> None:
        start, n = self.seen, len(chunk)
        fill = max(0, min(n, self.capacity - start))
        self.rows[start : start + fill] = chunk[:fill]
        if fill < n:
            pos = np.arange(start + fill, start + n)
            slot = np.floor(self.rng.random(len(pos)) * (pos + 1)).astype(np.int64)
            hit = np.flatnonzero(slot < self.capacity)
            # later rows win a slot drawn twice in one chunk, as in the sequential algorithm
            _, last = np.unique(slot[hit][::-1], return_index=True)
            keep = hit[::-1][last]
            self.rows[slot[keep]] = chunk[keep + fill]
        self.seen += n

    def sample(self, size: int) -> np.ndarray:
        held = self.rows[: min(self.seen, self.capacity)]
        if size >= len(held):
            return held
        return held[np.sort(self.rng.choice(len(held), size=size, replace=False))]


class IndexWriter:
    """Streaming index builder: ``add`` chunks of (vectors, metadata), then ``finalize``.

    ``expected_count`` (when the caller knows the catalog size) lets flat / HNSW refuse an over-budget
    build before embedding anything.
    """

    def __init__(
        self,
        out_dir: str | Path,
        model_info: Mapping[str, Any],
        params: IndexParams | None = None,
        normalize: bool = True,
        expected_count: int | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        info = dict(model_info)
        model = info.get("model") or info.get("checkpoint")
        if model and "model_files" not in info and "checkpoint_file" not in info and Path(model).exists():
            info.update(model_record(model, self.out_dir))  # what load_index will check it against
        self.model_info = json.loads(json.dumps(info, default=str))
        self.params = params or IndexParams()
        if self.params.type not in INDEX_TYPES:
            raise ValueError(f"index type {self.params.type!r} is not one of {INDEX_TYPES}")
        self.expected_count = expected_count
        self.normalize = normalize
        self._index: faiss.Index | None = None  # flat / hnsw: filled as chunks arrive
        self._reservoir: _Reservoir | None = None  # ivf / ivfpq: training sample
        self._dim: int | None = None
        self._count = 0
        self._ids: list[np.ndarray] = []
        self._parts: dict[str, list[np.ndarray]] | None = None
        self._columns: dict[str, str] | None = None
        (self.out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # the old index is invalid from now on
        self._files = contextlib.ExitStack()  # temporary files, renamed into place on success only
        items_tmp = self._files.enter_context(atomic_path(self.out_dir / ITEMS_FILE))
        self._items_fh = open(items_tmp, "w", encoding="utf-8", newline="")  # noqa: SIM115 - open across add() calls
        self._files.callback(self._items_fh.close)
        self._exact_fh = None
        self._exact_path = self.out_dir / f".{EXACT_FILE}.partial"
        self._exact_path.unlink(missing_ok=True)  # a killed build's spill (the run-dir claim makes this folder ours)
        if self.params.type in IVF_TYPES:
            self._exact_fh = open(self._exact_path, "wb")  # noqa: SIM115 - appended to by every add()

    @property
    def count(self) -> int:
        return self._count

    def add(
        self,
        embeddings: np.ndarray,
        metadata: pd.DataFrame,
        extra_vectors: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        vectors = _as_matrix(embeddings, "embeddings")
        if len(metadata) != len(vectors):
            raise ValueError(f"metadata has {len(metadata)} rows but embeddings {len(vectors)}")
        if "id" not in metadata.columns:
            raise ValueError("metadata needs an 'id' column")
        if self._dim is not None and vectors.shape[1] != self._dim:
            raise ValueError(f"embedding dim {vectors.shape[1]} != {self._dim} of earlier chunks")
        extra = {k: _as_matrix(v, k) for k, v in (extra_vectors or {}).items()}
        if self._parts is None:
            self._parts = {k: [] for k in extra}
        if set(extra) != set(self._parts):
            raise ValueError(f"extra vectors {sorted(extra)} differ from earlier chunks' {sorted(self._parts)}")
        for name, part in extra.items():
            if len(part) != len(vectors):
                raise ValueError(f"extra vector {name!r} has {len(part)} rows but embeddings {len(vectors)}")
        dim = vectors.shape[1]
        self.params.check_memory(max(self._count + len(vectors), self.expected_count or 0), dim)
        if self._columns is None:
            columns = ["id", *[c for c in metadata.columns if c != "id"]]
            self._columns = {c: column_kind(metadata[c]) for c in columns}
        elif set(metadata.columns) != set(self._columns):
            raise ValueError(
                f"metadata columns {list(metadata.columns)} differ from earlier chunks' {list(self._columns)}"
            )
        for name, part in extra.items():
            self._parts[name].append(part)
        frame = metadata[list(self._columns)]
        frame.to_csv(self._items_fh, header=not self._ids, index=False)
        self._ids.append(frame["id"].to_numpy(dtype=np.int64))
        self._dim, self._count = dim, self._count + len(vectors)
        if self.normalize:
            faiss.normalize_L2(vectors)
        if self._exact_fh is not None:
            self._exact_fh.write(vectors.tobytes())
            if self._reservoir is None:
                self._reservoir = _Reservoir(self.params.reservoir_size, dim, self.params.seed)
            self._reservoir.add(vectors)
            return
        if self._index is None:
            configure_threads()
            self._index = _new_faiss(dim, self.params.resolved(0, dim))
        self._index.add(vectors)

    def finalize(self) -> IndexManifest:
        """Finish the FAISS index, write every file, then the manifest (last)."""
        self._items_fh.close()
        if not self._ids:
            raise ValueError("no vectors were added")
        ids = np.concatenate(self._ids)
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate item ids, e.g. {uniq[counts > 1][:5].tolist()}")
        n, dim = len(ids), self._dim
        assert dim is not None  # set by the first add()
        params = self.params.resolved(n, dim)
        configure_threads()
        out = self.out_dir
        files = [VECTORS_FILE, ITEMS_FILE]
        if self._index is not None:
            index = self._index
        else:  # ivf / ivfpq: the spill file was opened in __init__, the reservoir filled by add()
            assert self._exact_fh is not None and self._reservoir is not None
            self._exact_fh.close()
            index = _train_ivf(self._reservoir.sample(params.train_size), params)
            self._reservoir = None
            _fill_from_file(index, self._exact_path, dim, params.add_chunk)
            if params.rerank > 0:
                files.append(EXACT_FILE)
        self._index = None
        apply_build_params(index, params)
        with atomic_path(out / VECTORS_FILE) as tmp:
            faiss.write_index(index, str(tmp))
        del index
        if EXACT_FILE in files:
            with atomic_path(out / EXACT_FILE) as tmp:
                os.replace(self._exact_path, tmp)
        else:
            self._exact_path.unlink(missing_ok=True)
            (out / EXACT_FILE).unlink(missing_ok=True)
        self._files.close()  # items.csv renamed into place
        parts = {k: np.concatenate(v) for k, v in (self._parts or {}).items()}
        if parts:
            with atomic_path(out / PARTS_FILE, suffix=".npz") as tmp:
                np.savez(tmp, **parts)  # type: ignore[arg-type]  # numpy's stub: **kwds could be allow_pickle
            files.append(PARTS_FILE)
        else:
            (out / PARTS_FILE).unlink(missing_ok=True)
        manifest = IndexManifest(
            count=n,
            dim=dim,
            index={**asdict(params), "faiss_factory": params.factory_string(), "faiss_version": faiss.__version__},
            model=self.model_info,
            items={"file": ITEMS_FILE, "columns": self._columns},
            parts={k: int(v.shape[1]) for k, v in parts.items()},
            files={f: file_record(out / f) for f in files},
            normalized=self.normalize,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2) + "\n")
        return manifest

    def __enter__(self) -> IndexWriter:  # (typing.Self is Python >= 3.11; the package supports 3.10)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._exact_fh is not None:
            self._exact_fh.close()
        if exc_type is not None:
            self._exact_path.unlink(missing_ok=True)
        self._files.__exit__(exc_type, exc, tb)  # on error: temporary files removed, old files untouched


def build_index(
    embeddings: np.ndarray,
    metadata: pd.DataFrame,
    out_dir: str | Path,
    model_info: Mapping[str, Any],
    extra_vectors: Mapping[str, np.ndarray] | None = None,
    params: IndexParams | None = None,
    normalize: bool = True,
) -> IndexManifest:
    """One-shot :class:`IndexWriter` for vectors already in memory."""
    with IndexWriter(out_dir, model_info, params, normalize, expected_count=len(embeddings)) as writer:
        writer.add(embeddings, metadata, extra_vectors)
        return writer.finalize()


def _as_matrix(array: np.ndarray, name: str) -> np.ndarray:
    """A private float32 copy (the caller may reuse its buffer for the next batch)."""
    matrix = np.array(array, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} contains NaN or inf")
    return matrix


def _new_faiss(dim: int, params: IndexParams) -> faiss.Index:
    index = faiss.index_factory(dim, params.factory_string(), faiss.METRIC_INNER_PRODUCT)
    if params.type == "hnsw":  # index_factory returns the concrete class (SWIG downcast); faiss's stub says Index
        cast(faiss.IndexHNSW, index).hnsw.efConstruction = params.ef_construction
    return index


def _train_ivf(sample: np.ndarray, params: IndexParams) -> faiss.Index:
    """IVF / IVF-PQ trained on the sample, with the seed in every k-means (coarse lists and codebooks)."""
    index = _new_faiss(sample.shape[1], params)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = params.seed
    if params.type == "ivfpq":
        cast(faiss.IndexIVFPQ, faiss.downcast_index(index)).pq.cp.seed = params.seed
    index.train(np.ascontiguousarray(sample))
    return index


def _fill_from_file(index: faiss.Index, path: Path, dim: int, chunk_rows: int) -> None:
    """Add the spilled float32 vectors one chunk at a time (plain reads: no mapped pages in RSS)."""
    with open(path, "rb") as fh:
        while (chunk := np.fromfile(fh, dtype=np.float32, count=chunk_rows * dim)).size:
            index.add(chunk.reshape(-1, dim))


def apply_build_params(index: faiss.Index, params: IndexParams) -> None:
    """Search-time settings stored inside the written index."""
    if params.type in IVF_TYPES:
        faiss.extract_index_ivf(index).nprobe = params.nprobe
    elif params.type == "hnsw":
        cast(faiss.IndexHNSW, index).hnsw.efSearch = params.ef_search
