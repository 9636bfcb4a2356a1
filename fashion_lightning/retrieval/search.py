"""Searching a verified index folder: exact flat engines, FAISS engines with selectors, exact re-ranking.

:class:`LoadedIndex` owns the search policy of a recommendation query (:meth:`LoadedIndex.top_k`): one row per
distinct photo (byte-identical product photos count once), excluded rows and every copy of their photos left
out, a few exclusions over-fetched rather than masked, small masks scored exactly. Callers bring a query vector
and a :class:`RowFilter`; a backend with its own payload filters (Qdrant) overrides ``top_k`` alone.

``load_index`` verifies the folder (``manifest``), opens the FAISS index memory-mapped when it is large
(FAISS's ``IO_FLAG_MMAP`` for IVF lists, ``IO_FLAG_MMAP_IFC`` for flat / HNSW storage: pages are shared
between processes and a server starts without reading the whole file) and reads only the item columns
asked for. Filtered search hands the mask to FAISS as an ``IDSelector`` (bitmap, or a batch of ids for
sparse masks), so the index itself skips disallowed rows instead of over-fetching and discarding them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pandas as pd

from fashion_lightning.retrieval.flat import (
    BATCH_MIN_QUERIES,
    FlatSearcher,
    bf16_available,
    flat_view,
)
from fashion_lightning.retrieval.manifest import (
    EXACT_FILE,
    ITEMS_FILE,
    IVF_TYPES,
    MANIFEST_FILE,
    PARTS_FILE,
    VECTORS_FILE,
    IndexIntegrityError,
    IndexManifest,
    IndexParams,
    ModelLoadError,
    model_path,
    read_items,
    read_manifest,
    read_parts,
    sha256_file,
    verified_model,
)
from fashion_lightning.utils import runtime

# FAISS switches its exhaustive search (flat indexes, IVF coarse assignment, k-means) from a per-query SIMD
# loop to BLAS at ``distance_compute_blas_threshold`` (faiss >= 1.15: compared with nq * d; older: with nq).
# The shipped value leaves mid-size query batches on the slower SIMD loop; BLAS wins from about 8 queries
# (scripts/bench_retrieval.py prints the sweep and README has the figures).
BLAS_THRESHOLD_NQ_TIMES_D = 4096
BLAS_THRESHOLD_NQ_LEGACY = 8
SHIPPED_BLAS_THRESHOLD = faiss.cvar.distance_compute_blas_threshold

# Vectors files at least this large are memory-mapped by default (small ones load faster in full).
MMAP_MIN_BYTES = 64 << 20

MAX_OVERFETCH = 256  # excluded rows up to which an unfiltered query over-fetches instead of masking


@dataclass(frozen=True, eq=False)
class RowFilter:
    """Which rows a query may return.

    ``mask``: the rows matching the query's filters (None: no filters were given); ``filters``: the same
    condition by value, for backends that filter on their own payload; ``exclude``: rows never returned (the
    query item, a history), nor any other row showing the same photo.
    """

    mask: np.ndarray | None = None
    filters: Mapping[str, Sequence[str]] = field(default_factory=dict)
    exclude: Sequence[int] | np.ndarray = ()


@functools.cache
def set_blas_threshold() -> int:
    """Set faiss's BLAS switch-over, once per process: the one place that writes this global knob (every
    index shares it). The value is the app's ``runtime.faiss_blas_threshold`` (``conf/runtime/``): ``auto``
    is ours above, ``null`` FAISS's shipped value, an int that value."""
    setting = runtime.current().faiss_blas_threshold
    if setting is None:
        threshold = SHIPPED_BLAS_THRESHOLD
    elif setting == "auto":
        product_rule = SHIPPED_BLAS_THRESHOLD > 1000  # shipped 128000 (nq * d rule) vs 20 (nq rule)
        threshold = BLAS_THRESHOLD_NQ_TIMES_D if product_rule else BLAS_THRESHOLD_NQ_LEGACY
    else:
        threshold = int(setting)
    faiss.cvar.distance_compute_blas_threshold = threshold
    return threshold


def configure_threads(num_threads: int | None = None) -> int:
    """Pin faiss's OpenMP pool to the CPUs this process may use (and set the BLAS switch-over once).

    ``os.cpu_count()`` overcounts in containers and under ``taskset``; oversubscribed OpenMP threads spin
    and can make a search several times slower, so the affinity mask is the right default.
    """
    if num_threads is None:
        num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = max(1, int(num_threads))
    faiss.omp_set_num_threads(n)
    set_blas_threshold()
    return n


def load_index(
    path: str | Path,
    verify: bool = True,
    mmap: bool | None = None,
    columns: list[str] | None = None,
    allow_external_model: bool = False,
    allow_qdrant_local: bool = False,
    reuse_qdrant: Any = None,
) -> LoadedIndex:
    """Open an index folder, refusing anything that does not match its manifest.

    ``verify=False`` skips the sha256 pass (sizes, counts and dimensions are always checked). ``mmap``:
    memory-map the FAISS index (default: IVF types whose file is at least ``MMAP_MIN_BYTES``, since a query
    touches only ``nprobe`` lists; flat / HNSW scans over mapped pages are slower, so they load into RAM
    unless asked). ``columns``: read
    only these item columns (plus ``id``) from ``items.csv``, for catalogs of millions of rows.
    ``allow_external_model``: trust a model the manifest names outside the folder (refused by default).
    A Qdrant-backed folder answers from its collection (``retrieval.qdrant``); ``allow_qdrant_local``
    trusts a local-mode storage folder (read with pickle by qdrant-client); ``reuse_qdrant``: a running
    index's ``QdrantStore`` whose client is reused if it talks to the same place (local mode admits one client).
    """
    root = Path(path)
    manifest = read_manifest(root, verify, allow_external_model)
    version = sha256_file(root / MANIFEST_FILE)[:12]
    if manifest.backend == "qdrant":
        from fashion_lightning.retrieval.qdrant import open_qdrant_index

        items = read_items(root / manifest.items.get("file", ITEMS_FILE), manifest, columns)
        parts = read_parts(root / PARTS_FILE, manifest) if manifest.parts else {}
        base = LoadedIndex(root, manifest, cast(Any, None), items, parts, None, allow_external_model, version)
        return open_qdrant_index(base, allow_qdrant_local, reuse_qdrant)
    kind = manifest.index.get("type", "flat")
    vectors_path = root / VECTORS_FILE
    if mmap is None:  # flat scans read every page: mapped 4 KiB file pages measured ~4x slower than RAM
        mmap = kind in IVF_TYPES and vectors_path.stat().st_size >= MMAP_MIN_BYTES
    flags = (faiss.IO_FLAG_MMAP if kind in IVF_TYPES else faiss.IO_FLAG_MMAP_IFC) if mmap else 0
    try:
        index = faiss.read_index(str(vectors_path), flags | (faiss.IO_FLAG_READ_ONLY if mmap else 0))
    except RuntimeError as err:
        reason = str(err).splitlines()[0]
        raise IndexIntegrityError(f"{vectors_path}: faiss cannot read it ({reason})") from err
    if index.d != manifest.dim:
        raise IndexIntegrityError(
            f"{vectors_path}: holds {index.d}-d vectors but manifest.json says dim={manifest.dim}"
        )
    if index.ntotal != manifest.count:
        raise IndexIntegrityError(
            f"{vectors_path}: holds {index.ntotal} vectors but manifest.json says count={manifest.count}"
        )
    items = read_items(root / manifest.items.get("file", ITEMS_FILE), manifest, columns)
    parts = read_parts(root / PARTS_FILE, manifest) if manifest.parts else {}
    exact = None
    if EXACT_FILE in manifest.files:
        exact = np.memmap(root / EXACT_FILE, dtype=np.float32, mode="r", shape=(manifest.count, manifest.dim))
    params = IndexParams.from_record(manifest.index)
    if kind in IVF_TYPES:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(params.nprobe, ivf.nlist)
        if exact is None:
            ivf.make_direct_map()  # reconstruct(row) for item queries and exact masked search
    elif kind == "hnsw":  # read_index returns the concrete class (SWIG downcast); faiss's stub says Index
        cast(faiss.IndexHNSW, index).hnsw.efSearch = params.ef_search
    configure_threads()
    return LoadedIndex(root, manifest, index, items, parts, exact, allow_external_model, version)


@dataclass(eq=False)
class LoadedIndex:
    """A verified index. Rows are faiss labels; ``items.iloc[row]`` describes vector ``row``.

    ``groups``: one id per distinct photo (``image_sha1``), None without that column. Backends that filter on
    their own payload (Qdrant) override :meth:`top_k`; ``faiss_index`` is None for them.
    """

    path: Path
    manifest: IndexManifest
    faiss_index: faiss.Index
    items: pd.DataFrame
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    exact_vectors: np.ndarray | None = None  # memory-mapped float32 copy (IVF types with rerank > 0)
    allow_external_model: bool = False  # the user trusts a model outside the folder (see verified_model)
    version: str = ""  # first 12 hex of the manifest's sha256: which index version answered a query

    def __post_init__(self) -> None:
        self.ids = self.items["id"].to_numpy(dtype=np.int64)
        self._row_of = pd.Index(self.ids)
        self.kind = self.manifest.index.get("type", "flat")
        self.params = IndexParams.from_record(self.manifest.index)
        # stored vectors are exact (PQ stores codes unless the float32 copy was kept)
        self.exact = self.kind in ("flat", "hnsw", "ivf") or self.exact_vectors is not None
        self._flat = FlatSearcher(flat_view(self.faiss_index)) if self.kind == "flat" else None
        self.groups = duplicate_groups(self.items)

    @property
    def n(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def model_info(self) -> dict[str, Any]:
        """The manifest's model record, with the model path resolved against the index folder."""
        info = dict(self.manifest.model)
        path = model_path(info, self.path)
        if path is not None:
            info["model" if info.get("model") else "checkpoint"] = str(path)
        return info

    def model_path(self) -> Path | None:
        """The model to load (artefact folder, or an old index's checkpoint), checked against the manifest
        right now (size + sha256 of its files; outside the folder only with ``allow_external_model``).

        None when the manifest names no model; ModelLoadError when it is gone. A swapped or edited file, or a
        model outside the folder the user did not trust, raises the manifest's IndexIntegrityError before
        anything reads it.
        """
        model = verified_model(self.manifest.model, self.path, allow_external=self.allow_external_model)
        if model is not None and not model.exists():
            raise ModelLoadError(f"the index was built from {model}, which no longer exists; pass encoder=")
        return model

    def rows_of(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Row of each item id, -1 where the index does not hold it."""
        return self._row_of.get_indexer(np.asarray(ids, dtype=np.int64))

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Stored vectors (exact, except IVF-PQ without its float32 copy: the decoded approximation).

        For a flat index, ``vectors()`` is a read-only view of the index's own storage (no copy).
        """
        if self._flat is not None:
            return self._flat.vectors if rows is None else self._flat.vectors[np.asarray(rows, dtype=np.int64)]
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.exact_vectors is not None:
            return np.asarray(self.exact_vectors[rows])
        return self.faiss_index.reconstruct_batch(rows)

    def search(self, queries: np.ndarray, k: int, engine: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query by inner product: (scores [nq, k], rows [nq, k]), row -1 = none.

        ``engine``: "auto" (flat: numpy for few queries, certified bf16 GEMM for batches; others: faiss,
        re-ranked exactly when the index keeps float32 vectors), "faiss", "numpy" (flat only; exact fp32)
        or "bf16" (flat only).
        """
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self.dim}")
        k = max(1, min(int(k), self.n))
        if engine not in ("auto", "faiss", "numpy", "bf16"):
            raise ValueError(f"unknown search engine {engine!r}")
        flat = self._flat
        if flat is None and engine in ("numpy", "bf16"):
            raise ValueError(f"engine {engine!r} needs a flat index")
        if flat is not None and (engine == "numpy" or (engine == "auto" and len(queries) < BATCH_MIN_QUERIES)):
            return flat.fp32(queries, k)
        if flat is not None and (engine == "bf16" or (engine == "auto" and bf16_available())):
            return flat.bf16(queries, k)
        return self._faiss_search(queries, k)

    def _faiss_search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS search (with the mask as an IDSelector), re-ranked exactly from ``exact_vectors``."""
        exact = self.exact_vectors if self.params.rerank > 0 else None  # None: no re-ranking
        fetch = min(self.n, max(k, self.params.rerank)) if exact is not None else k
        params, keep_alive = self._search_params(allowed, fetch)
        scores, rows = self.faiss_index.search(queries, fetch, params=params)
        del keep_alive
        if exact is not None:
            scores, rows = _rerank(exact, queries, rows, k)
        return scores, rows

    def _search_params(self, allowed: np.ndarray | None, fetch: int) -> tuple[Any, Any]:
        """SearchParameters carrying the mask (and the index's own nprobe / efSearch, which they override)."""
        if allowed is None:
            return None, None
        n_allowed = int(allowed.sum())
        data: np.ndarray
        selector: faiss.IDSelector
        params: faiss.SearchParameters
        if n_allowed * 64 < self.n:  # sparse: a hash set of ids is smaller than an N-bit bitmap
            data = np.flatnonzero(allowed).astype(np.int64)
            selector = faiss.IDSelectorBatch(len(data), faiss.swig_ptr(data))
        else:
            data = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(data))
        if self.kind in IVF_TYPES:
            # faiss's stub lacks the keyword constructors (and SearchParametersHNSW) its Python wrapper provides
            nprobe = faiss.extract_index_ivf(self.faiss_index).nprobe
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)  # type: ignore[call-arg]
        elif self.kind == "hnsw":
            ef_search = max(self.params.ef_search, fetch)
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search)  # type: ignore[attr-defined]
        else:
            params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
        return params, (data, selector)

    def search_filtered(
        self,
        query: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        exact_below: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` among ``allowed`` rows, keeping the best row of each ``groups`` value.

        The mask goes to FAISS as a selector (flat indexes: one masked exact pass). Only the group
        de-duplication can need more candidates: the search widens 4x until ``k`` groups survive (the
        survivors of a complete top-``m`` are the true top-``k``: every unseen row scores lower). Masks
        allowing at most ``exact_below`` rows (default: max(4096, N / 8)) are scored directly, exactly.
        """
        query = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))
        n_allowed = self.n if allowed is None else int(allowed.sum())
        k = min(int(k), n_allowed)
        if k <= 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        exact_below = max(4096, self.n // 8) if exact_below is None else exact_below
        if allowed is not None and n_allowed <= exact_below:
            return self._score_rows(query[0], np.flatnonzero(allowed), k, groups)
        fetch = min(n_allowed, k + 16 if groups is not None else k)
        while True:
            if self._flat is not None:
                scores, rows = self._flat.masked(query[0], fetch, allowed)
            else:
                scores, rows = (a[0] for a in self._faiss_search(query, fetch, allowed))
            valid = rows >= 0
            top_scores, top_rows = take_unique(scores[valid], rows[valid], k, groups)
            if len(top_rows) >= k or fetch >= n_allowed:
                return top_scores, top_rows
            if not valid.all():  # an approximate index ran out of candidates: score the mask directly
                cand = np.flatnonzero(allowed) if allowed is not None else np.arange(self.n)
                return self._score_rows(query[0], cand, k, groups)
            fetch = min(n_allowed, fetch * 4)

    def close(self) -> None:
        """Release what the backend holds open (a Qdrant client; nothing for a FAISS folder)."""

    def photo_copies(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Mask of ``rows`` and every other row showing the same photo."""
        copies = np.zeros(self.n, dtype=bool)
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            copies[rows] = True
            if self.groups is not None:
                copies |= np.isin(self.groups, self.groups[rows])
        return copies

    def top_k(self, query: np.ndarray, k: int, where: RowFilter) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` (scores, rows) of one query among the rows ``where`` allows, one row per photo.

        A mask that only drops a few excluded rows (the query item, its photo's copies, a history) is cheaper
        as an over-fetch of the unmasked search: each excluded row takes at most one slot, so the top
        ``k + excluded`` unique rows hold the exact answer.
        """
        excluded = self.photo_copies(where.exclude)
        allowed = ~excluded if where.mask is None else where.mask & ~excluded
        if allowed.all():
            return self.search_filtered(query, k, None, self.groups)
        n_excluded = int(excluded.sum())
        if where.mask is None and n_excluded <= MAX_OVERFETCH:
            scores, rows = self.search_filtered(query, k + n_excluded, None, self.groups)
            keep = allowed[rows]
            return scores[keep][:k], rows[keep][:k]
        return self.search_filtered(query, k, allowed, self.groups)

    def _score_rows(self, query: np.ndarray, rows: np.ndarray, k: int, groups: np.ndarray | None):
        return take_unique(self.vectors(rows) @ query, rows, k, groups)


def _rerank(exact: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query's candidates (read from the mapped float32 file), top ``k``."""
    out_s = np.full((len(queries), k), -np.inf, np.float32)
    out_r = np.full((len(queries), k), -1, np.int64)
    for i, (q, cand) in enumerate(zip(queries, rows)):
        cand = np.sort(cand[cand >= 0])  # ascending rows: sequential reads from the mapped file
        if not len(cand):
            continue
        scores = np.asarray(exact[cand]) @ q
        top = np.argsort(-scores, kind="stable")[:k]
        out_s[i, : len(top)], out_r[i, : len(top)] = scores[top], cand[top]
    return out_s, out_r


def duplicate_groups(items: pd.DataFrame) -> np.ndarray | None:
    """One group id per distinct image (by ``image_sha1``); rows without a hash are their own group."""
    if "image_sha1" not in items.columns:
        return None
    sha = items["image_sha1"].astype(str).str.strip()
    blank = sha.isin(["", "nan", "None"]).to_numpy()
    codes, uniques = pd.factorize(sha)
    codes = codes.astype(np.int64)
    codes[blank] = len(uniques) + np.arange(blank.sum())
    return codes


def take_unique(
    scores: np.ndarray, rows: np.ndarray, k: int, groups: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` (score desc), keeping only the first row of each group."""
    order = np.argsort(-scores, kind="stable")
    if groups is not None:
        _, first = np.unique(groups[rows[order]], return_index=True)
        order = order[np.sort(first)]
    order = order[:k]
    return scores[order].astype(np.float32), rows[order].astype(np.int64)
