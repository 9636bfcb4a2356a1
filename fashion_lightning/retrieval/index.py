"""Vector index folders: build (streaming), verify, load and search.

An index folder holds everything a recommender needs, and nothing it cannot check:

``vectors.faiss``   the FAISS index (inner product; flat by default, IVF / HNSW / IVF-PQ by parameter);
                    faiss label ``i`` is row ``i`` of the items file
``items.csv``       item metadata (catalog columns, ``id`` first); CSV so no parquet engine is needed
``parts.npz``       optional extra per-item vectors (e.g. the image / text halves of a fused embedding)
``manifest.json``   format version, counts, dimension, metric, index parameters, the model that made the
                    vectors, item column types, and size + sha256 of every file above

The manifest is written last, so a build that died half-way leaves a folder that :func:`load_index`
refuses instead of a silently short index.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd

FORMAT = "fashion-lightning-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.faiss"
ITEMS_FILE = "items.csv"
PARTS_FILE = "parts.npz"
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")

# faiss >= 1.15 switches its exhaustive search (flat indexes, IVF coarse assignment, k-means) from the
# per-query SIMD loop to BLAS when nq * d reaches this (older faiss: when nq reaches it). The shipped 128000
# (nq >= 250 at d = 512) leaves mid-size batches on the SIMD loop: 44k x 512, 2 cores, idle, SIMD vs BLAS
# took 30 vs 12 ms at nq = 16 and 129 vs 23 ms at nq = 64, with the crossover near nq = 8 (single-threaded
# near nq = 3). scripts/bench_retrieval.py prints the sweep.
BLAS_THRESHOLD_NQ_TIMES_D = 4096
BLAS_THRESHOLD_NQ_LEGACY = 8
SHIPPED_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold

# Flat indexes: a single query is one fp32 matrix-vector pass with numpy's BLAS (memory-bound; faiss's scan
# measured ~2x slower); from two queries on, the certified bf16 GEMM (see _FlatSearcher) or faiss's BLAS
# path. Measured at 44k x 512: nq = 2..32 took 10-17 ms in bf16 vs 25-40 ms as fp32 numpy or faiss.
BATCH_MIN_QUERIES = 2
_QUERY_BLOCK = 256


class RetrievalError(Exception):
    """Base of every error the retrieval layer raises on bad input or bad files (apps exit non-zero on it)."""


class IndexIntegrityError(RetrievalError):
    """The index folder is missing, corrupt, truncated or inconsistent (message names the file)."""


@dataclass(frozen=True)
class IndexParams:
    """FAISS index choice. ``0`` means "pick from the catalog size" (see :meth:`resolved`)."""

    type: str = "flat"
    nlist: int = 0  # IVF lists; 0 -> 4 * sqrt(N)
    nprobe: int = 16  # IVF lists visited per query
    hnsw_m: int = 32  # HNSW graph degree
    ef_construction: int = 80
    ef_search: int = 128
    pq_m: int = 0  # IVF-PQ bytes per vector (sub-quantizers); 0 -> dim // 8
    pq_nbits: int = 8
    train_size: int = 0  # vectors sampled to train IVF / PQ; 0 -> min(N, 256 * nlist)

    def resolved(self, n: int, dim: int) -> IndexParams:
        """Fill the automatic values and validate against the catalog size and dimension."""
        if self.type not in INDEX_TYPES:
            raise ValueError(f"index type {self.type!r} is not one of {INDEX_TYPES}")
        p = self
        if p.type in ("ivf", "ivfpq"):
            nlist = p.nlist or int(round(4 * math.sqrt(n)))
            nlist = max(1, min(nlist, n // 39 or 1))  # faiss wants >= 39 training points per list
            p = replace(p, nlist=nlist, train_size=p.train_size or min(n, 256 * nlist))
        if p.type == "ivfpq":
            pq_m = p.pq_m or max(1, dim // 8)
            if dim % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide the dimension {dim}")
            if min(n, p.train_size) < 2**p.pq_nbits:
                raise ValueError(f"IVF-PQ with pq_nbits={p.pq_nbits} needs >= {2**p.pq_nbits} vectors, got {n}")
            p = replace(p, pq_m=pq_m, train_size=max(p.train_size, min(n, 256 * 2**p.pq_nbits)))
        return p

    def factory_string(self) -> str:
        return {
            "flat": "Flat",
            "ivf": f"IVF{self.nlist},Flat",
            "hnsw": f"HNSW{self.hnsw_m},Flat",
            # "np": no polysemous training (only used by polysemous filtering, and minutes of annealing)
            "ivfpq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}np",
        }[self.type]


@dataclass
class IndexManifest:
    """What ``manifest.json`` says; :func:`load_index` checks the folder against it."""

    count: int
    dim: int
    index: dict[str, Any]
    model: dict[str, Any]
    items: dict[str, Any]  # {"file": ..., "columns": {name: "int" | "float" | "bool" | "str"}}
    parts: dict[str, int]  # extra vector name -> its dimension
    files: dict[str, dict[str, Any]]  # file name -> {"bytes": int, "sha256": str}
    metric: str = "inner_product"
    normalized: bool = True
    created_at: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def bytes_per_item(self) -> float:
        return self.files[VECTORS_FILE]["bytes"] / max(1, self.count)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = MANIFEST_FILE) -> IndexManifest:
        if not isinstance(data, Mapping):
            raise IndexIntegrityError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise IndexIntegrityError(f"{where}: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexIntegrityError(
                f"{where}: format_version {data.get('format_version')!r} is not supported "
                f"(this version reads {FORMAT_VERSION}); rebuild the index with fashion-index"
            )
        names = {f.name for f in cls.__dataclass_fields__.values()}
        missing = sorted(n for n in ("count", "dim", "index", "model", "items", "parts", "files") if n not in data)
        if missing:
            raise IndexIntegrityError(f"{where}: missing keys {missing}")
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in names})
            manifest.count, manifest.dim = int(manifest.count), int(manifest.dim)
        except (TypeError, ValueError) as err:
            raise IndexIntegrityError(f"{where}: malformed ({err})") from err
        for name in (VECTORS_FILE, manifest.items.get("file", ITEMS_FILE)):
            if name not in manifest.files:
                raise IndexIntegrityError(f"{where}: lists no checksum for {name}")
        return manifest


def configure_threads(num_threads: int | None = None) -> int:
    """Pin faiss's OpenMP pool to the CPUs this process may use and set the BLAS switch-over.

    ``os.cpu_count()`` overcounts in containers and under ``taskset``; oversubscribed OpenMP threads spin
    and can make a search several times slower, so the affinity mask is the right default.
    """
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = max(1, int(num_threads))
    faiss.omp_set_num_threads(n)
    product_rule = SHIPPED_BLAS_THRESHOLD > 1000  # shipped 128000 (nq * d rule) vs 20 (nq rule)
    threshold = BLAS_THRESHOLD_NQ_TIMES_D if product_rule else BLAS_THRESHOLD_NQ_LEGACY
    faiss.cvar.distance_compute_blas_threshold = threshold
    return n


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _column_kind(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    return "str"


class IndexWriter:
    """Streaming index builder: ``add`` chunks of (vectors, metadata), then ``finalize``.

    Metadata goes to disk as it arrives. Flat and HNSW vectors go straight into the FAISS index, so the
    only copy held is the index itself; IVF types keep the vectors until ``finalize``, which trains the
    coarse quantizer (and PQ codebooks) on a uniform random sample of the whole catalog, then adds them.
    """

    def __init__(
        self,
        out_dir: str | Path,
        model_info: Mapping[str, Any],
        params: IndexParams | None = None,
        normalize: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # the old index is invalid from now on
        self.model_info = json.loads(json.dumps(dict(model_info), default=str))
        self.params = params or IndexParams()
        self.normalize = normalize
        self._index: faiss.Index | None = None  # flat / hnsw: filled as chunks arrive
        self._pending: list[np.ndarray] = []  # ivf / ivfpq: held until finalize trains on a sample
        self._dim: int | None = None
        self._ids: list[np.ndarray] = []
        self._parts: dict[str, list[np.ndarray]] | None = None
        self._columns: dict[str, str] | None = None
        self._items_path = self.out_dir / (ITEMS_FILE + ".partial")
        self._items_fh = open(self._items_path, "w", encoding="utf-8", newline="")

    @property
    def count(self) -> int:
        return sum(len(i) for i in self._ids)

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
            self._parts[name].append(part)
        if self._columns is None:
            columns = ["id", *[c for c in metadata.columns if c != "id"]]
            self._columns = {c: _column_kind(metadata[c]) for c in columns}
        elif set(metadata.columns) != set(self._columns):
            raise ValueError(
                f"metadata columns {list(metadata.columns)} differ from earlier chunks' {list(self._columns)}"
            )
        frame = metadata[list(self._columns)]
        frame.to_csv(self._items_fh, header=not self._ids, index=False)
        self._ids.append(frame["id"].to_numpy(dtype=np.int64))
        self._dim = vectors.shape[1]
        if self.normalize:
            faiss.normalize_L2(vectors)
        if self.params.type in ("ivf", "ivfpq"):
            self._pending.append(vectors)
            return
        if self._index is None:
            configure_threads()
            self._index = _new_faiss(self._dim, self.params.resolved(0, self._dim))
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
        params = self.params.resolved(n, dim)
        configure_threads()
        index = self._index if self._index is not None else _train_and_fill(self._pending, params)
        self._pending = []
        _apply_search_params(index, params)
        out = self.out_dir
        os.replace(self._items_path, out / ITEMS_FILE)
        faiss.write_index(index, str(out / VECTORS_FILE))
        files = [VECTORS_FILE, ITEMS_FILE]
        parts = {k: np.concatenate(v) for k, v in (self._parts or {}).items()}
        if parts:
            np.savez(out / PARTS_FILE, **parts)
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
            files={f: {"bytes": (out / f).stat().st_size, "sha256": sha256_file(out / f)} for f in files},
            normalized=self.normalize,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        tmp = out / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out / MANIFEST_FILE)
        return manifest

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._items_fh.closed:
            self._items_fh.close()
        if exc_type is not None:
            self._items_path.unlink(missing_ok=True)


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
    with IndexWriter(out_dir, model_info, params, normalize) as writer:
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
    if params.type == "hnsw":
        index.hnsw.efConstruction = params.ef_construction
    return index


def _train_and_fill(chunks: list[np.ndarray], params: IndexParams) -> faiss.Index:
    """IVF / IVF-PQ: train on a uniform sample of all vectors, then add them chunk by chunk."""
    sizes = np.cumsum([0, *(len(c) for c in chunks)])
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(sizes[-1], size=min(int(sizes[-1]), params.train_size), replace=False))
    owner = np.searchsorted(sizes, sample, side="right") - 1
    index = _new_faiss(chunks[0].shape[1], params)
    index.train(np.concatenate([chunk[sample[owner == c] - sizes[c]] for c, chunk in enumerate(chunks)]))
    for chunk in chunks:
        index.add(chunk)
    return index


def _apply_search_params(index: faiss.Index, params: IndexParams) -> None:
    if params.type in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(params.nprobe, ivf.nlist)
        ivf.make_direct_map()  # reconstruct(row) for item queries and exact masked search
    elif params.type == "hnsw":
        index.hnsw.efSearch = params.ef_search


def load_index(path: str | Path, verify: bool = True) -> LoadedIndex:
    """Open an index folder, refusing anything that does not match its manifest.

    ``verify=False`` skips the sha256 pass (sizes, counts and dimensions are always checked).
    """
    root = Path(path)
    if not root.is_dir():
        raise IndexIntegrityError(f"{root}: index folder not found")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise IndexIntegrityError(
            f"{manifest_path}: missing, so {root} is not an index folder (or its build did not finish); "
            "rebuild it with fashion-index"
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexIntegrityError(f"{manifest_path}: not valid JSON ({err})") from err
    manifest = IndexManifest.from_dict(data, str(manifest_path))
    for name, expected in manifest.files.items():
        _verify_file(root / name, expected, verify)
    try:
        index = faiss.read_index(str(root / VECTORS_FILE))
    except RuntimeError as err:
        reason = str(err).splitlines()[0]
        raise IndexIntegrityError(f"{root / VECTORS_FILE}: faiss cannot read it ({reason})") from err
    if index.d != manifest.dim:
        raise IndexIntegrityError(
            f"{root / VECTORS_FILE}: holds {index.d}-d vectors but {MANIFEST_FILE} says dim={manifest.dim}"
        )
    if index.ntotal != manifest.count:
        raise IndexIntegrityError(
            f"{root / VECTORS_FILE}: holds {index.ntotal} vectors but {MANIFEST_FILE} says count={manifest.count}"
        )
    items = _read_items(root / manifest.items.get("file", ITEMS_FILE), manifest)
    parts = _read_parts(root / PARTS_FILE, manifest) if manifest.parts else {}
    params = IndexParams(**{k: v for k, v in manifest.index.items() if k in IndexParams.__dataclass_fields__})
    _apply_search_params(index, params)
    configure_threads()
    return LoadedIndex(root, manifest, index, items, parts)


def _verify_file(path: Path, expected: Mapping[str, Any], checksum: bool) -> None:
    if not path.is_file():
        raise IndexIntegrityError(f"{path}: listed in {MANIFEST_FILE} but missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise IndexIntegrityError(
            f"{path}: {size} bytes, but {MANIFEST_FILE} recorded {expected.get('bytes')} (truncated or replaced)"
        )
    if checksum:
        digest = sha256_file(path)
        if digest != expected.get("sha256"):
            raise IndexIntegrityError(
                f"{path}: sha256 {digest[:16]}... does not match {MANIFEST_FILE} "
                f"({str(expected.get('sha256'))[:16]}...): the file is corrupt or was modified"
            )


def _read_items(path: Path, manifest: IndexManifest) -> pd.DataFrame:
    columns: dict[str, str] = manifest.items.get("columns") or {}
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise IndexIntegrityError(f"{path}: unreadable CSV ({err})") from err
    if list(frame.columns) != list(columns):
        raise IndexIntegrityError(f"{path}: columns {list(frame.columns)} != {MANIFEST_FILE}'s {list(columns)}")
    if len(frame) != manifest.count:
        raise IndexIntegrityError(f"{path}: {len(frame)} item rows but the index holds {manifest.count} vectors")
    try:
        for name, kind in columns.items():
            if kind in ("int", "float"):
                frame[name] = pd.to_numeric(frame[name].replace("", np.nan))
            elif kind == "bool":
                frame[name] = frame[name] == "True"
        frame["id"] = frame["id"].astype(np.int64)
    except (ValueError, TypeError) as err:
        raise IndexIntegrityError(f"{path}: bad values ({err})") from err
    if frame["id"].duplicated().any():
        duplicated = frame["id"][frame["id"].duplicated()].head(3).tolist()
        raise IndexIntegrityError(f"{path}: duplicate ids, e.g. {duplicated}")
    return frame


def _read_parts(path: Path, manifest: IndexManifest) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            parts = {name: np.asarray(npz[name], dtype=np.float32) for name in manifest.parts}
    except (KeyError, ValueError, OSError) as err:
        raise IndexIntegrityError(f"{path}: unreadable or missing arrays {list(manifest.parts)} ({err})") from err
    for name, array in parts.items():
        if array.shape != (manifest.count, manifest.parts[name]):
            raise IndexIntegrityError(
                f"{path}: {name} has shape {array.shape}, expected ({manifest.count}, {manifest.parts[name]})"
            )
    return parts


@dataclass(eq=False)
class LoadedIndex:
    """A verified index in memory. Rows are faiss labels; ``items.iloc[row]`` describes vector ``row``."""

    path: Path
    manifest: IndexManifest
    faiss_index: faiss.Index
    items: pd.DataFrame
    parts: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = self.items["id"].to_numpy(dtype=np.int64)
        self._row_of = pd.Index(self.ids)
        kind = self.manifest.index.get("type", "flat")
        self.exact = kind in ("flat", "hnsw", "ivf")  # stored vectors are exact (PQ stores codes)
        self._flat = _FlatSearcher(_flat_view(self.faiss_index)) if kind == "flat" else None

    @property
    def n(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def model_info(self) -> dict[str, Any]:
        return self.manifest.model

    def rows_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Row of each item id, -1 where the index does not hold it."""
        return self._row_of.get_indexer(np.asarray(ids, dtype=np.int64))

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Stored vectors (exact, except IVF-PQ which gives its decoded approximation).

        For a flat index, ``vectors()`` is a read-only view of the index's own storage (no copy).
        """
        if self._flat is not None:
            return self._flat.vectors if rows is None else self._flat.vectors[np.asarray(rows, dtype=np.int64)]
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64)
        return self.faiss_index.reconstruct_batch(rows)

    def search(self, queries: np.ndarray, k: int, engine: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query by inner product: (scores [nq, k], rows [nq, k]), row -1 = none.

        ``engine``: "auto" (flat: numpy for few queries, certified bf16 GEMM for batches; others: faiss),
        "faiss", "numpy" (flat only; exact fp32) or "bf16" (flat only).
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self.dim}")
        k = max(1, min(int(k), self.n))
        if engine not in ("auto", "faiss", "numpy", "bf16"):
            raise ValueError(f"unknown search engine {engine!r}")
        if self._flat is None and engine in ("numpy", "bf16"):
            raise ValueError(f"engine {engine!r} needs a flat index")
        if engine == "numpy" or (self._flat is not None and engine == "auto" and len(queries) < BATCH_MIN_QUERIES):
            return self._flat.fp32(queries, k)
        if engine == "bf16" or (self._flat is not None and engine == "auto" and bf16_available()):
            return self._flat.bf16(queries, k)
        return self.faiss_index.search(queries, k)

    def search_filtered(
        self,
        query: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        exact_below: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` among ``allowed`` rows, keeping the best row of each ``groups`` value.

        Over-fetches from the index and widens 4x until ``k`` rows survive the mask and the de-duplication
        (the survivors of a complete top-``m`` are the true filtered top-``k``: every unseen row scores
        lower). Masks allowing at most ``exact_below`` rows (default: max(4096, N / 8)) skip the index and
        score the allowed rows directly, which is exact and cheaper than a scan that discards most rows.
        """
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        n_allowed = self.n if allowed is None else int(allowed.sum())
        k = min(int(k), n_allowed)
        if k <= 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        exact_below = max(4096, self.n // 8) if exact_below is None else exact_below
        if allowed is not None and n_allowed <= exact_below:
            rows = np.flatnonzero(allowed)
            return _take_unique(self.vectors(rows) @ query, rows, k, groups)
        fetch = min(self.n, 2 * k * self.n // n_allowed + 16)
        while True:
            scores, rows = self.search(query[None], fetch)
            scores, rows = scores[0], rows[0]
            valid = rows >= 0
            if allowed is not None:
                valid[valid] = allowed[rows[valid]]
            top_scores, top_rows = _take_unique(scores[valid], rows[valid], k, groups)
            if len(top_rows) >= k or fetch >= self.n:
                return top_scores, top_rows
            if (rows < 0).any():  # an approximate index ran out of candidates: score the mask directly
                cand = np.flatnonzero(allowed) if allowed is not None else np.arange(self.n)
                return _take_unique(self.vectors(cand) @ query, cand, k, groups)
            fetch = min(self.n, fetch * 4)


def _take_unique(
    scores: np.ndarray, rows: np.ndarray, k: int, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` (score desc), keeping only the first row of each group."""
    order = np.argsort(-scores, kind="stable")
    if groups is not None:
        _, first = np.unique(groups[rows[order]], return_index=True)
        order = order[np.sort(first)]
    order = order[:k]
    return scores[order].astype(np.float32), rows[order].astype(np.int64)


def _flat_view(index: faiss.Index) -> np.ndarray:
    """Zero-copy, read-only [N, D] float32 view of an IndexFlat's storage (lives as long as ``index``)."""
    flat = faiss.downcast_index(index)
    view = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
    view.flags.writeable = False
    return view


def _topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a [B, N] score matrix, sorted by score descending."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1).astype(np.int64)


class _FlatSearcher:
    """Exact inner-product search over a flat index's own float32 storage.

    * Few queries: ``V @ q`` with numpy's BLAS is one streaming pass over V, i.e. memory-bound, which is
      what a single query can at best be (faiss's scan measured ~1.5x slower here).
    * Batches are compute-bound, so a bf16 GEMM (2x the fp32 FLOP rate on AVX512-BF16 / AMX CPUs) proposes
      ``m`` candidates per query, which are re-scored in fp32. The result is *certified* exact. With
      q~, v~ the bf16-rounded vectors, <q, v> - <q~, v~> = <q - q~, v> + <q~, v - v~>, so by Cauchy-Schwarz
      every score is off by at most |q - q~| max|v| + |q~| max|v - v~| (both rounding errors are measured,
      not assumed), plus the fp32 accumulation (d 2^-24 |q~| max|v~|) and the bf16 rounding of the output
      (2^-8 of its magnitude). If the m-th approximate score plus that slack is below the k-th exact
      score, no unseen row can belong in the top k; rows that fail the test (dense near-ties) are redone
      in fp32. Without bf16 support, faiss's BLAS path is used.
    """

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors
        self._bf16 = None
        self._max_err = 0.0
        self._max_norm = float(np.sqrt(np.einsum("ij,ij->i", vectors, vectors).max())) if len(vectors) else 0.0

    def fp32(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(queries) == 1:  # matrix-vector product: BLAS's streaming kernel, not a 1-row GEMM
            return _topk_rows((self.vectors @ queries[0])[None], k)
        out_s, out_r = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), _QUERY_BLOCK):
            block = slice(start, start + _QUERY_BLOCK)
            out_s[block], out_r[block] = _topk_rows(queries[block] @ self.vectors.T, k)
        return out_s, out_r

    def _prepare_bf16(self) -> None:
        import torch

        self._bf16 = torch.empty(self.vectors.shape, dtype=torch.bfloat16)
        for start in range(0, len(self.vectors), 8192):  # chunked: no full-size fp32 temporary
            chunk = np.array(self.vectors[start : start + 8192])  # writable copy: torch wants one
            self._bf16[start : start + len(chunk)] = torch.from_numpy(chunk)
            err = chunk - self._bf16[start : start + len(chunk)].float().numpy()
            self._max_err = max(self._max_err, float(np.sqrt(np.einsum("ij,ij->i", err, err).max())))

    def bf16(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        if self._bf16 is None:
            self._prepare_bf16()
        n, d = self.vectors.shape
        m = min(n, max(4 * k, k + 48))
        out_s, out_r = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        with torch.inference_mode():
            for start in range(0, len(queries), _QUERY_BLOCK):
                q = queries[start : start + _QUERY_BLOCK]
                q16 = torch.from_numpy(q).to(torch.bfloat16)
                approx, cand = torch.topk(q16 @ self._bf16.T, m, dim=1)
                cand, approx_m = cand.numpy(), approx[:, -1].float().numpy().astype(np.float64)
                exact = np.matmul(self.vectors[cand], q[:, :, None])[..., 0]
                top_s, pos = _topk_rows(exact, k)
                top_r = np.take_along_axis(cand, pos, axis=1)
                q16_norm = np.linalg.norm(q16.float().numpy(), axis=1)
                slack = (
                    np.linalg.norm(q - q16.float().numpy(), axis=1) * self._max_norm
                    + q16_norm * self._max_err
                    + d * 2.0**-24 * q16_norm * (self._max_norm + self._max_err)
                    + 2.0**-8 * 1.01 * np.abs(approx_m)
                )
                redo = np.flatnonzero((approx_m + slack >= top_s[:, -1]) & (m < n))
                if len(redo):
                    top_s[redo], top_r[redo] = self.fp32(q[redo], k)
                out_s[start : start + len(q)], out_r[start : start + len(q)] = top_s, top_r
        return out_s, out_r


@functools.cache
def bf16_available() -> bool:
    """Whether torch can run bf16 GEMMs natively here (emulated bf16 would be slower than fp32)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
