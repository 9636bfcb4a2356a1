"""Qdrant backend: the vectors in a Qdrant collection, everything else in the index folder as before.

Why a vector database: past one machine's RAM or one process's QPS, a shop keeps its vectors in a
service that shards and replicates. The index folder stays the unit the rest of the package knows
(manifest, ``items.csv``, ``parts.npz``, ``model/``); its manifest names the collection instead of a
``vectors.faiss``, so :class:`~fashion_lightning.retrieval.recommender.Recommender` and fashion-serve answer
from either backend through the same interface, with the same explanations and duplicate-photo exclusion.

* Point id = item id, so an upsert is idempotent: a rerun after a crash overwrites what the dead run wrote
  and never duplicates it, and the living catalog (``retrieval.update``) upserts and deletes in place.
* Payload = the catalog fields of the schema, the item's content hash and the identity of the model that
  made the vector; the filter fields get keyword payload indexes, so filters run inside Qdrant.
* Searches are exact by default (``exact: true``: Qdrant scores every allowed point, like FAISS flat);
  ``exact: false`` uses Qdrant's HNSW with ``hnsw_ef``.

Local mode (``path=``) runs qdrant-client's in-process engine. It stores points with pickle, so a
local-mode folder is code as much as data: it is opened only when the caller says it trusts it
(``allow_qdrant_local``; fashion-index trusts the path named on its own command line).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd

from fashion_lightning.data.schema import COLUMNS, FILTER_FIELDS
from fashion_lightning.retrieval.manifest import (
    ITEMS_FILE,
    MANIFEST_FILE,
    PARTS_FILE,
    VECTORS_FILE,
    IndexManifest,
    RetrievalError,
    file_record,
)
from fashion_lightning.retrieval.queries import UnknownItemError
from fashion_lightning.retrieval.search import LoadedIndex, RowFilter, take_unique
from fashion_lightning.retrieval.writer import column_kind
from fashion_lightning.utils.atomic import atomic_path, atomic_write_text

if TYPE_CHECKING:
    from qdrant_client import QdrantClient

#: payload keys besides the catalog fields: what a rerun / update compares, and which model made a point
HASH_KEY = "content_hash"
MODEL_KEY = "model_identity"
#: catalog fields copied into each point's payload (the schema's columns, and the photo's hash)
PAYLOAD_FIELDS: tuple[str, ...] = (*[c for c in COLUMNS if c != "id"], "image_sha1")
INSTALL_HINT = 'the Qdrant backend needs qdrant-client: pip install -e ".[qdrant]"'
ENGINES = ("client", "edge")


def _point_ids(ids: np.ndarray) -> np.ndarray:
    """Item ids as Qdrant point ids (unsigned: a negative id is refused, not wrapped)."""
    ids = np.asarray(ids, dtype=np.int64)
    if (ids < 0).any():
        raise QdrantError(f"Qdrant point ids are unsigned; item ids {ids[ids < 0][:5].tolist()} are negative")
    return ids


def _in_order(ids: np.ndarray, points: Sequence[Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Retrieved points' vectors in the order of ``ids`` (zeros where absent), and a mask of the found ones."""
    by_id = {int(p.id): p.vector for p in points}
    out = np.zeros((len(ids), dim), np.float32)
    found = np.zeros(len(ids), bool)
    for i, item in enumerate(ids):
        vector = by_id.get(int(item))
        if vector is not None:
            out[i], found[i] = np.asarray(vector, dtype=np.float32), True
    return out, found


class QdrantError(RetrievalError):
    """The Qdrant side cannot be used as asked (unreachable, another dimension or model, not installed)."""


@dataclass(frozen=True)
class QdrantTarget:
    """Where the collection lives and how it is searched (``index.qdrant.*`` in conf/index.yaml)."""

    collection: str = "fashion"
    url: str | None = None  # a Qdrant server, e.g. http://localhost:6333
    path: str | None = None  # Qdrant local mode: an in-process engine storing into this folder
    api_key_env: str | None = None  # name of the environment variable holding the server's API key
    timeout_s: float = 10.0
    batch_size: int = 256  # points per upsert request
    exact: bool = True  # exhaustive scoring (same top-k as FAISS flat) or HNSW
    hnsw_ef: int = 128
    engine: str = "client"  # with path: qdrant-client's local mode, or "edge" (qdrant-edge-py's Rust shard)

    def __post_init__(self) -> None:
        if (self.url is None) == (self.path is None):
            raise QdrantError("index.qdrant needs exactly one of url (a Qdrant server) or path (local mode)")
        if self.engine not in ENGINES or (self.engine == "edge" and self.path is None):
            raise QdrantError(f"index.qdrant.engine must be one of {ENGINES} ('edge' with a path), got {self.engine!r}")
        if not 1 <= int(self.batch_size) <= 65536:
            raise QdrantError(f"index.qdrant.batch_size must be in [1, 65536], got {self.batch_size}")

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> QdrantTarget:
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})

    def record(self) -> dict[str, Any]:
        """What the manifest keeps (``index`` section): enough to reconnect, never the API key."""
        out = asdict(self)
        if self.path is not None and self.path != ":memory:":
            out["path"] = str(Path(self.path).expanduser().resolve())
        return out

    @property
    def where(self) -> str:
        if self.url:
            return f"Qdrant at {self.url}"
        return f"Qdrant {'edge shard' if self.engine == 'edge' else 'local storage'} {self.path}"


def connect(target: QdrantTarget) -> QdrantClient:
    """A client that has answered once (an unreachable server is refused here, in one line)."""
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise QdrantError(INSTALL_HINT) from None
    try:
        if target.url is not None:
            key = os.environ.get(target.api_key_env) if target.api_key_env else None
            client = QdrantClient(
                url=target.url, api_key=key, timeout=int(max(1, target.timeout_s)), check_compatibility=False
            )
        else:
            where = cast(str, target.path)  # ":memory:" keeps the collection in this process only (benchmarks)
            client = (
                QdrantClient(location=where)
                if where == ":memory:"
                else QdrantClient(path=str(Path(where).expanduser()))
            )
        client.get_collections()
    except Exception as err:  # connection refused, DNS, TLS, auth, a locked local folder: all one line
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise QdrantError(f"{target.where} is unreachable ({reason})") from None
    return client


def payloads(frame: pd.DataFrame, model_identity: str) -> list[dict[str, Any]]:
    """Each row's payload: schema fields (JSON scalars; missing values left out), content hash, model."""
    fields = [c for c in (*PAYLOAD_FIELDS, HASH_KEY) if c in frame.columns]
    out = []
    for record in frame[fields].to_dict(orient="records"):
        payload = {k: _plain(v) for k, v in record.items() if not _missing(v)}
        payload[MODEL_KEY] = model_identity
        out.append(payload)
    return out


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


class QdrantStore:
    """One collection: created or checked against the dimension and model, then upserts, deletes, reads."""

    def __init__(self, client: QdrantClient, target: QdrantTarget, dim: int, model_identity: str) -> None:
        self.client, self.target, self.dim, self.model_identity = client, target, int(dim), model_identity
        self.name = target.collection
        self._params: Any = None  # local mode always scores every point (and warns about params)
        if target.url is not None:
            from qdrant_client import models

            self._params = models.SearchParams(exact=target.exact, hnsw_ef=target.hnsw_ef)

    def ensure(self, create: bool = True) -> QdrantStore:
        """Create the collection (dot product on unit vectors, keyword indexes on the filter fields), or
        refuse one of another dimension, distance or model. Nothing is written before these checks."""
        from qdrant_client import models

        where = f"{self.target.where}: collection {self.name!r}"
        if not self.client.collection_exists(self.name):
            if not create:
                raise QdrantError(f"{where} does not exist")
            self.client.create_collection(
                self.name, vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.DOT)
            )
        else:
            vectors = self.client.get_collection(self.name).config.params.vectors
            if not isinstance(vectors, models.VectorParams):
                raise QdrantError(f"{where} has named vectors; this index writes one unnamed vector per point")
            if vectors.size != self.dim or vectors.distance != models.Distance.DOT:
                raise QdrantError(
                    f"{where} holds {vectors.size}-d {vectors.distance.value} vectors, but this model makes "
                    f"{self.dim}-d unit vectors scored by dot product; use another index.qdrant.collection"
                )
            foreign = self.client.count(
                self.name,
                count_filter=models.Filter(
                    must_not=[models.FieldCondition(key=MODEL_KEY, match=models.MatchValue(value=self.model_identity))]
                ),
                exact=True,
            ).count
            if foreign:
                raise QdrantError(
                    f"{where} holds {foreign} points made by another model (model_identity differs); "
                    "use another index.qdrant.collection"
                )
        if self.target.url is not None:  # local mode scans every point anyway (and warns about indexes)
            for field in (*FILTER_FIELDS, HASH_KEY):
                self.client.create_payload_index(self.name, field, models.PayloadSchemaType.KEYWORD)
        return self

    def upsert(self, ids: np.ndarray, vectors: np.ndarray, payload: Sequence[Mapping[str, Any]]) -> None:
        """Batches of ``batch_size`` points, each acknowledged before the next (``wait``)."""
        from qdrant_client import models

        ids = _point_ids(ids)
        step = self.target.batch_size
        for start in range(0, len(ids), step):
            self.client.upsert(
                self.name,
                points=models.Batch(
                    ids=[int(i) for i in ids[start : start + step]],
                    vectors=np.asarray(vectors[start : start + step], dtype=np.float32).tolist(),
                    payloads=[dict(p) for p in payload[start : start + step]],
                ),
                wait=True,
            )

    def delete(self, ids: Sequence[int] | np.ndarray) -> None:
        from qdrant_client import models

        ids = [int(i) for i in ids]
        for start in range(0, len(ids), self.target.batch_size):
            chunk = ids[start : start + self.target.batch_size]
            self.client.delete(self.name, points_selector=models.PointIdsList(points=chunk), wait=True)  # type: ignore[arg-type]

    def hashes(self) -> dict[int, str]:
        """Every point's content hash (what a resumed build or an update compares against)."""
        out: dict[int, str] = {}
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.name, limit=4096, offset=offset, with_payload=[HASH_KEY], with_vectors=False
            )
            for p in points:
                out[int(p.id)] = str((p.payload or {}).get(HASH_KEY, ""))
            if offset is None:
                return out

    def count(self) -> int:
        return int(self.client.count(self.name, exact=True).count)

    def close(self) -> None:
        self.client.close()

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored vectors of ``ids`` in that order, and a mask of the ids the collection holds."""
        got = self.client.retrieve(self.name, ids=[int(i) for i in ids], with_vectors=True, with_payload=False)
        return _in_order(ids, got, self.dim)

    def search(
        self, query: np.ndarray, limit: int, filters: Mapping[str, Sequence[str]], exclude_ids: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``limit`` (scores, ids) for one query: filters as payload matches, exclusions by id."""
        from qdrant_client import models

        must: list[Any] = [models.FieldCondition(key=k, match=models.MatchAny(any=list(v))) for k, v in filters.items()]
        must_not: list[Any] = [models.HasIdCondition(has_id=[int(i) for i in exclude_ids])] if len(exclude_ids) else []
        flt = models.Filter(must=must or None, must_not=must_not or None) if must or must_not else None
        points = self.client.query_points(
            self.name,
            query=np.asarray(query, dtype=np.float32).tolist(),
            query_filter=flt,
            limit=int(limit),
            search_params=self._params,
            with_payload=False,
            with_vectors=False,
        ).points
        return np.asarray([p.score for p in points], np.float32), np.asarray([int(p.id) for p in points], np.int64)


class EdgeStore(QdrantStore):
    """The same calls on qdrant-edge-py's in-process Rust engine: one ``EdgeShard`` folder per collection
    (``<path>/<collection>``). Its files are Qdrant's own segment format, parsed by Rust (no pickle), and
    filters use real payload indexes, so it is the local engine for more than a few thousand items."""

    def __init__(self, target: QdrantTarget, dim: int, model_identity: str) -> None:
        self.client: Any = None  # the open EdgeShard
        self.client_dim = int(dim)  # the width it was opened with (checked against its segments)
        self.target, self.dim, self.model_identity = target, int(dim), model_identity
        self.name = target.collection
        self._params: Any = None

    def ensure(self, create: bool = True) -> EdgeStore:
        try:
            import qdrant_edge as qe
        except ImportError:
            raise QdrantError("index.qdrant.engine=edge needs qdrant-edge-py: pip install qdrant-edge-py") from None
        folder = Path(cast(str, self.target.path)).expanduser() / self.name
        where = f"{self.target.where}: collection {self.name!r}"
        config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=self.dim, distance=qe.Distance.Dot))
        if self.client is not None and self.client_dim != self.dim:  # a shared shard, asked for another width
            raise QdrantError(f"{where} holds {self.client_dim}-d vectors, but this model makes {self.dim}-d ones")
        if self.client is None:
            try:
                if folder.is_dir() and any(folder.iterdir()):
                    self.client = qe.EdgeShard.load(str(folder), config)
                elif create:
                    self.client = qe.EdgeShard.create(str(folder), config)
                else:
                    raise QdrantError(f"{where} does not exist")
            except QdrantError:
                raise
            except Exception as err:  # another dimension or distance, damaged or locked segments: one line
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                raise QdrantError(f"{where}: {reason}; use another index.qdrant.collection") from None
            self.client_dim = self.dim
        ours = qe.Filter(must_not=[qe.FieldCondition(key=MODEL_KEY, match=qe.MatchValue(self.model_identity))])
        foreign = self.client.count(qe.CountRequest(exact=True, filter=ours))
        if foreign:
            raise QdrantError(
                f"{where} holds {foreign} points made by another model (model_identity differs); "
                "use another index.qdrant.collection"
            )
        for field in (*FILTER_FIELDS, HASH_KEY):
            self.client.update(qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword))
        if self.target.exact or self.target.hnsw_ef:
            self._params = qe.SearchParams(exact=self.target.exact, hnsw_ef=self.target.hnsw_ef)
        return self

    def upsert(self, ids: np.ndarray, vectors: np.ndarray, payload: Sequence[Mapping[str, Any]]) -> None:
        import qdrant_edge as qe

        ids = _point_ids(ids)
        step = self.target.batch_size
        for start in range(0, len(ids), step):
            points = [
                qe.Point(id=int(i), vector=np.asarray(v, dtype=np.float32).tolist(), payload=dict(p))
                for i, v, p in zip(
                    ids[start : start + step], vectors[start : start + step], payload[start : start + step]
                )
            ]
            self.client.update(qe.UpdateOperation.upsert_points(points))
            self.client.flush()  # on disk before the next batch: a crash loses at most the batch in flight

    def delete(self, ids: Sequence[int] | np.ndarray) -> None:
        import qdrant_edge as qe

        points: list[Any] = [int(i) for i in ids]
        for start in range(0, len(points), self.target.batch_size):
            self.client.update(qe.UpdateOperation.delete_points(points[start : start + self.target.batch_size]))
        self.client.flush()

    def hashes(self) -> dict[int, str]:
        import qdrant_edge as qe

        out: dict[int, str] = {}
        offset = None
        while True:
            points, offset = self.client.scroll(
                qe.ScrollRequest(offset=offset, limit=4096, with_payload=True, with_vector=False)
            )
            for p in points:
                out[int(p.id)] = str((p.payload or {}).get(HASH_KEY, ""))
            if offset is None:
                return out

    def count(self) -> int:
        import qdrant_edge as qe

        return int(self.client.count(qe.CountRequest(exact=True)))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        got = self.client.retrieve([int(i) for i in ids], with_payload=False, with_vector=True)
        return _in_order(ids, got, self.dim)

    def search(
        self, query: np.ndarray, limit: int, filters: Mapping[str, Sequence[str]], exclude_ids: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        import qdrant_edge as qe

        must: list[Any] = [qe.FieldCondition(key=k, match=qe.MatchAny(any=list(v))) for k, v in filters.items()]
        must_not: list[Any] = [qe.HasIdCondition({int(i) for i in exclude_ids})] if len(exclude_ids) else []
        flt = qe.Filter(must=must or None, must_not=must_not or None) if must or must_not else None
        points = self.client.query(
            qe.QueryRequest(
                limit=int(limit),
                query=qe.Query.Nearest(np.asarray(query, dtype=np.float32).tolist()),
                filter=flt,
                params=self._params,
                with_payload=False,
                with_vector=False,
            )
        )
        return np.asarray([p.score for p in points], np.float32), np.asarray([int(p.id) for p in points], np.int64)


class QdrantIndex(LoadedIndex):
    """An index folder whose vectors live in Qdrant: the :class:`LoadedIndex` interface the recommender uses
    (rows are ``items.csv`` rows, ``vectors(rows)``, filtered top-k), served by the collection.

    Ids the collection returns that this folder's items do not hold (an in-place update by a newer
    version, see ``retrieval.update``) are skipped, so an old version keeps answering until it is reloaded.
    """

    def __init__(self, base: LoadedIndex, store: QdrantStore) -> None:
        vars(self).update(vars(base))
        self.store = store
        self.kind = "qdrant"
        self.exact = store.target.exact

    def close(self) -> None:
        self.store.close()

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        rows = np.arange(self.n) if rows is None else np.asarray(rows, dtype=np.int64)
        vectors, found = self.store.vectors(self.ids[rows])
        if not found.all():
            gone = self.ids[rows][~found][:10].tolist()
            raise UnknownItemError(
                f"item(s) {gone} are no longer in {self.store.target.where}'s collection {self.store.name!r} "
                "(a newer index version removed them); reload the index"
            )
        return vectors

    def search(self, queries: np.ndarray, k: int, engine: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = max(1, min(int(k), self.n))
        out_s, out_r = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        for i, q in enumerate(queries):
            scores, rows = self._search_store(q, k, {}, np.empty(0, np.int64), None)
            out_s[i, : len(rows)], out_r[i, : len(rows)] = scores, rows
        return out_s, out_r

    def top_k(self, query: np.ndarray, k: int, where: RowFilter) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`LoadedIndex.top_k` with the filters as payload matches inside Qdrant (not a row mask) and the
        excluded rows, with their photos' copies, left out by id."""
        excluded = np.flatnonzero(self.photo_copies(where.exclude))
        return self._search_store(query, k, where.filters, excluded, self.groups)

    def _search_store(
        self,
        query: np.ndarray,
        k: int,
        filters: Mapping[str, Sequence[str]],
        excluded: np.ndarray,
        groups: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows matching ``filters`` minus ``excluded`` rows, one row per ``groups`` value; widens
        4x until ``k`` groups survive or the collection has no more matches (as ``search_filtered``)."""
        exclude = self.ids[np.asarray(excluded, dtype=np.int64)]
        fetch = k + 16 if groups is not None else k
        while True:
            scores, ids = self.store.search(query, fetch, filters, exclude)
            rows = self.rows_of(ids)
            known = rows >= 0
            top_scores, top_rows = take_unique(scores[known], rows[known], k, groups)
            if len(top_rows) >= k or len(ids) < fetch:
                return top_scores, top_rows
            fetch *= 4


def open_qdrant_index(base: LoadedIndex, allow_local: bool, reuse: QdrantStore | None = None) -> QdrantIndex:
    """The folder's collection, connected and checked against the manifest's dimension and model."""
    manifest = base.manifest
    target = QdrantTarget.from_record(manifest.index)
    if target.path is not None and target.engine == "client" and not allow_local:
        raise QdrantError(
            f"{base.path} keeps its vectors in Qdrant local storage {target.path}, which qdrant-client reads "
            "with pickle (code in that folder would run); pass allow_qdrant_local=true if you made it, or "
            "serve from a Qdrant server (index.qdrant.url)"
        )
    identity = str(manifest.model.get("model_identity", ""))
    return QdrantIndex(base, open_store(target, manifest.dim, identity, create=False, reuse=reuse))


def open_store(
    target: QdrantTarget, dim: int, identity: str, create: bool, reuse: QdrantStore | None = None
) -> QdrantStore:
    """The collection behind ``target``, checked (and created when ``create``): a server or qdrant-client's
    local mode, or qdrant-edge-py's shard. ``reuse``: a running store whose connection (or open shard) is
    shared when it is the same place, since a local folder admits one opener at a time."""
    place = (target.engine, target.url, target.path, target.collection)
    if reuse is not None and (reuse.target.engine, reuse.target.url, reuse.target.path, reuse.name) == place:
        shared = copy.copy(reuse)
        shared.target, shared.dim, shared.model_identity = target, int(dim), identity
        return shared.ensure(create)
    if target.engine == "edge":
        return EdgeStore(target, dim, identity).ensure(create)
    return QdrantStore(connect(target), target, dim, identity).ensure(create)


class QdrantIndexWriter:
    """:class:`~fashion_lightning.retrieval.writer.IndexWriter`'s interface (``add`` chunks, ``finalize``)
    for a Qdrant-backed folder: each chunk is upserted as it arrives (memory stays one chunk), the items
    and parts go to the folder, the manifest comes last. ``finalize`` also deletes points of ids the
    catalog no longer holds, so a full build leaves the collection equal to the folder."""

    def __init__(
        self,
        out_dir: str | Path,
        model_info: Mapping[str, Any],
        target: QdrantTarget,
        dim: int | None = None,
        store: QdrantStore | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.target = target
        self.model_info = dict(model_info)
        self.identity = str(self.model_info.get("model_identity", ""))
        self._store, self._dim = store, dim
        self.folder = FolderItems(self.out_dir)

    @property
    def count(self) -> int:
        return self.folder.count

    def store(self, dim: int) -> QdrantStore:
        if self._store is None:
            self._store = open_store(self.target, dim, self.identity, create=True)
        return self._store

    def add(
        self,
        embeddings: np.ndarray | None,
        metadata: pd.DataFrame,
        extra_vectors: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Upsert ``embeddings`` (normalised here, as the FAISS writer does) with the metadata as payload;
        ``None`` only records the items (their points are already in the collection: an update)."""
        import faiss

        if embeddings is not None:
            vectors = np.array(embeddings, dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(metadata) or not np.isfinite(vectors).all():
                raise ValueError(f"embeddings must be a finite [{len(metadata)}, D] array, got {vectors.shape}")
            if self._dim is not None and vectors.shape[1] != self._dim:
                raise ValueError(f"embedding dim {vectors.shape[1]} != {self._dim} of earlier chunks")
            self._dim = vectors.shape[1]
            faiss.normalize_L2(vectors)
            self.store(self._dim).upsert(metadata["id"].to_numpy(), vectors, payloads(metadata, self.identity))
        self.folder.add(metadata, extra_vectors)

    def finalize(self, parent: Mapping[str, Any] | None = None) -> Any:
        if self._dim is None:
            raise ValueError("no vectors were added and no dimension was given")
        store = self.store(self._dim)
        stale = sorted(set(store.hashes()) - set(self.folder.ids().tolist()))
        if stale:
            store.delete(stale)
        index = {**self.target.record(), "backend": "qdrant", "type": "qdrant", "distance": "dot"}
        return self.folder.finalize(self._dim, index, self.model_info, parent=parent)

    def __enter__(self) -> QdrantIndexWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.folder.__exit__(exc_type, exc, tb)


class FolderItems:
    """The folder side of a Qdrant index: ``items.csv`` streamed under a temporary name, the parts
    gathered, then both renamed into place and the manifest written last (as ``IndexWriter`` does)."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # the old index is invalid from now on
        self.out_dir = out_dir
        self._files = contextlib.ExitStack()
        self._items_fh = open(
            self._files.enter_context(atomic_path(out_dir / ITEMS_FILE)), "w", encoding="utf-8", newline=""
        )  # noqa: SIM115
        self._files.callback(self._items_fh.close)
        self._ids: list[np.ndarray] = []
        self._columns: dict[str, str] | None = None
        self._parts: dict[str, list[np.ndarray]] | None = None
        self.count = 0

    def ids(self) -> np.ndarray:
        return np.concatenate(self._ids) if self._ids else np.empty(0, np.int64)

    def add(self, metadata: pd.DataFrame, extra_vectors: Mapping[str, np.ndarray] | None) -> None:
        extra = {k: np.asarray(v, dtype=np.float32) for k, v in (extra_vectors or {}).items()}
        if self._parts is None:
            self._parts = {k: [] for k in extra}
        if set(extra) != set(self._parts) or any(len(v) != len(metadata) for v in extra.values()):
            raise ValueError(f"extra vectors {sorted(extra)} differ from earlier chunks' or from the rows")
        if self._columns is None:
            self._columns = {c: column_kind(metadata[c]) for c in ["id", *[c for c in metadata if c != "id"]]}
        elif set(metadata.columns) != set(self._columns):
            raise ValueError(f"metadata columns {list(metadata.columns)} differ from {list(self._columns)}")
        frame = metadata[list(self._columns)]
        frame.to_csv(self._items_fh, header=not self._ids, index=False)
        self._ids.append(frame["id"].to_numpy(dtype=np.int64))
        for name, part in extra.items():
            self._parts[name].append(part)
        self.count += len(frame)

    def finalize(
        self, dim: int, index: dict[str, Any], model: Mapping[str, Any], parent: Mapping[str, Any] | None = None
    ) -> IndexManifest:
        ids = self.ids()
        if not len(ids):
            raise ValueError("no items were added")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate item ids, e.g. {uniq[counts > 1][:5].tolist()}")
        self._items_fh.close()
        self._files.close()  # items.csv renamed into place
        out, files = self.out_dir, [ITEMS_FILE]
        parts = {k: np.concatenate(v) for k, v in (self._parts or {}).items()}
        if parts:
            with atomic_path(out / PARTS_FILE, suffix=".npz") as tmp:
                np.savez(tmp, **parts)  # type: ignore[arg-type]
            files.append(PARTS_FILE)
        else:
            (out / PARTS_FILE).unlink(missing_ok=True)
        (out / VECTORS_FILE).unlink(missing_ok=True)  # a FAISS file left here would not be this index
        manifest = IndexManifest(
            count=len(ids),
            dim=int(dim),
            index=index,
            model=json.loads(json.dumps(dict(model), default=str)),
            items={"file": ITEMS_FILE, "columns": self._columns},
            parts={k: int(v.shape[1]) for k, v in parts.items()},
            files={f: file_record(out / f) for f in files},
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            parent=dict(parent) if parent else None,
        )
        atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2) + "\n")
        return manifest

    def __exit__(self, exc_type, exc, tb) -> None:
        self._files.__exit__(exc_type, exc, tb)  # on error: the temporary items file is removed
