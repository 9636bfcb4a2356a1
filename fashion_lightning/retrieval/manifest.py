"""Index folder format: what ``manifest.json`` records and how a folder is checked against it.

An index folder holds everything a recommender needs, and nothing it cannot check:

``vectors.faiss``   the FAISS index (inner product; flat by default, IVF / HNSW / IVF-PQ by parameter);
                    faiss label ``i`` is row ``i`` of the items file
``vectors.f32``     optional raw float32 ``[count, dim]`` copy of the vectors (IVF types with
                    ``rerank > 0``): memory-mapped at query time to re-rank a short list exactly
``items.csv``       item metadata (catalog columns, ``id`` first); CSV so no parquet engine is needed
``parts.npz``       optional extra per-item vectors (e.g. the image / text halves of a fused embedding)
``model/``          the model artefact that made the vectors (``model.json`` + ``model.safetensors``), so the
                    folder is self-contained; a model outside the folder is refused unless explicitly trusted
``manifest.json``   format version, counts, dimension, metric, index parameters, the model that made the
                    vectors (path, identity, size and sha256 of its files), item column types, and size + sha256 of
                    every file above; an updated index also records its ``parent`` (``retrieval.update``)

With ``index.backend = "qdrant"`` the vectors live in a Qdrant collection instead of ``vectors.faiss``
(``retrieval.qdrant``); the folder keeps the items, parts, model and manifest, which names the collection.

The manifest is written last, so a build that died half-way leaves a folder that ``load_index`` refuses
instead of a silently short index.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from fashion_lightning.models.artifact import ARTIFACT_DIR
from fashion_lightning.models.artifact import FILES as ARTIFACT_FILES
from fashion_lightning.retrieval.faiss_probe import ProbeError, probe
from fashion_lightning.utils.bounded import DEFAULT_CSV_LIMITS, CsvLimits, LimitError, check_csv_file, load_json

FORMAT = "fashion-lightning-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.faiss"
EXACT_FILE = "vectors.f32"
ITEMS_FILE = "items.csv"
PARTS_FILE = "parts.npz"
MODEL_DIR = ARTIFACT_DIR  # the model artefact copied into the folder (models/artifact.py)
MODEL_FILES = ARTIFACT_FILES
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
BACKENDS = ("faiss", "qdrant")
IVF_TYPES = ("ivf", "ivfpq")
COLUMN_KINDS = ("int", "float", "bool", "str")
MAX_DIM = 65_536  # far above any embedding; bounds what a manifest may ask a reader to allocate per row
MAX_COUNT = 2**40
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Default ceiling of the IVF / PQ training sample: 256 per list is what faiss's k-means uses at most, and
# 2^18 float32 vectors (512 MiB at d = 512) keeps a streaming build's memory independent of N.
TRAIN_SIZE_CAP = 2**18


class RetrievalError(Exception):
    """Base of every error the retrieval layer raises on bad input or bad files (apps exit non-zero on it)."""


class IndexIntegrityError(RetrievalError):
    """The index folder is missing, corrupt, truncated or inconsistent (message names the file)."""


class IndexMemoryError(RetrievalError, ValueError):
    """An in-memory index type would not fit the configured memory budget."""


class ModelLoadError(RetrievalError):
    """The model the index names cannot be loaded (missing or damaged checkpoint)."""


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
    train_size: int = 0  # vectors reservoir-sampled to train IVF / PQ; 0 -> min(256 * nlist, 2^18)
    seed: int = 0  # reservoir sample and k-means seed
    rerank: int = 0  # IVF types: keep float32 vectors on disk and re-rank this many candidates exactly
    max_memory_gb: float | None = 8.0  # flat / hnsw refuse catalogs whose float32 vectors exceed this
    add_chunk: int = 65536  # IVF types: vectors per faiss.add while filling the lists

    def resolved(self, n: int, dim: int) -> IndexParams:
        """Fill the automatic values and validate against the catalog size and dimension."""
        if self.type not in INDEX_TYPES:
            raise ValueError(f"index type {self.type!r} is not one of {INDEX_TYPES}")
        p = self
        if p.type in IVF_TYPES:
            nlist = p.nlist or round(4 * math.sqrt(n))
            floor = 256 * 2**p.pq_nbits if p.type == "ivfpq" else 0  # k-means of each PQ codebook
            train = min(n, p.train_size or min(max(256 * nlist, floor), TRAIN_SIZE_CAP))
            nlist = max(1, min(nlist, train // 39 or 1))  # faiss wants >= 39 training points per list
            p = replace(p, nlist=nlist, train_size=train)
        if p.type == "ivfpq":
            pq_m = p.pq_m or max(1, dim // 8)
            if dim % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide the dimension {dim}")
            if p.train_size < 2**p.pq_nbits:
                raise ValueError(f"IVF-PQ with pq_nbits={p.pq_nbits} needs >= {2**p.pq_nbits} vectors, got {n}")
            p = replace(p, pq_m=pq_m)
        return p

    @property
    def reservoir_size(self) -> int:
        """Training vectors a streaming build keeps (before N is known): at most this many, ever."""
        return self.train_size or TRAIN_SIZE_CAP

    def check_memory(self, n: int, dim: int) -> None:
        """Flat and HNSW hold every float32 vector in RAM: refuse before building past the budget."""
        if self.type in IVF_TYPES or self.max_memory_gb is None:
            return
        need = n * dim * 4 + (n * self.hnsw_m * 2 * 4 if self.type == "hnsw" else 0)
        if need > self.max_memory_gb * 2**30:
            raise IndexMemoryError(
                f"index.type={self.type} needs ~{need / 2**30:.1f} GiB of RAM for {n:,} x {dim} float32 vectors, "
                f"over index.max_memory_gb={self.max_memory_gb:g}; use index.type=ivfpq (bounded-memory build, "
                "~pq_m bytes per item) or raise index.max_memory_gb"
            )

    def factory_string(self) -> str:
        return {
            "flat": "Flat",
            "ivf": f"IVF{self.nlist},Flat",
            "hnsw": f"HNSW{self.hnsw_m},Flat",
            # "np": no polysemous training (only used by polysemous filtering, and minutes of annealing)
            "ivfpq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}np",
        }[self.type]

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> IndexParams:
        return cls(**{k: v for k, v in record.items() if k in cls.__dataclass_fields__})


@dataclass
class IndexManifest:
    """What ``manifest.json`` says; ``load_index`` checks the folder against it."""

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
    parent: dict[str, Any] | None = None  # the index this one was updated from (path, manifest sha256, version)

    @property
    def backend(self) -> str:
        return str(self.index.get("backend", "faiss"))

    @property
    def bytes_per_item(self) -> float:
        record = self.files.get(VECTORS_FILE)
        return record["bytes"] / max(1, self.count) if record else 4.0 * self.dim

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
        _check_record(data, where)
        manifest = cls(**{k: v for k, v in data.items() if k in names})
        needed = [VECTORS_FILE] if manifest.backend == "faiss" else []
        for name in (*needed, manifest.items.get("file", ITEMS_FILE)):
            if name not in manifest.files:
                raise IndexIntegrityError(f"{where}: lists no checksum for {name}")
        exact = manifest.files.get(EXACT_FILE)
        if exact is not None and exact["bytes"] != manifest.count * manifest.dim * 4:
            raise IndexIntegrityError(
                f"{where}: {EXACT_FILE} is recorded as {exact['bytes']} bytes, not count x dim x 4 = "
                f"{manifest.count * manifest.dim * 4}"
            )
        return manifest


def _check_record(data: Mapping[str, Any], where: str) -> None:
    """Types and ranges of every manifest field a reader uses, so a hand-written manifest is refused in one
    line instead of failing somewhere inside pandas / numpy / faiss. File names must be bare names: the
    folder is checked, never a path it points to."""

    def fail(what: str) -> NoReturn:
        raise IndexIntegrityError(f"{where}: {what}"[:500])

    def integer(value: Any, name: str, low: int, high: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            fail(f"{name} must be an integer in [{low}, {high}], got {_short(value)}")

    integer(data["count"], "count", 0, MAX_COUNT)
    integer(data["dim"], "dim", 1, MAX_DIM)
    for key in ("index", "model", "items", "parts", "files"):
        if not isinstance(data[key], Mapping):
            fail(f"{key} must be an object, got {type(data[key]).__name__}")
    for key, kind in (("metric", str), ("normalized", bool), ("created_at", str)):
        if key in data and not isinstance(data[key], kind):
            fail(f"{key} must be a {kind.__name__}, got {_short(data[key])}")
    model = data["model"]  # what the model record means is verified_checkpoint's; here only its shape
    for key in ("checkpoint", "catalog", "embedding_name"):
        if model.get(key) is not None and not isinstance(model[key], str):
            fail(f"model.{key} must be a string, got {_short(model[key])}")
    if model.get("checkpoint_file") is not None and not isinstance(model["checkpoint_file"], Mapping):
        fail(f"model.checkpoint_file must be an object, got {_short(model['checkpoint_file'])}")
    if data.get("parent") is not None and not isinstance(data["parent"], Mapping):
        fail(f"parent must be an object, got {_short(data['parent'])}")
    index = data["index"]
    backend = index.get("backend", "faiss")
    if backend not in BACKENDS:
        fail(f"index.backend must be one of {BACKENDS}, got {_short(backend)}")
    if backend == "qdrant":
        _check_qdrant_record(index, fail)
    elif index.get("type", "flat") not in INDEX_TYPES:
        fail(f"index.type must be one of {INDEX_TYPES}, got {_short(index.get('type'))}")
    for name in IndexParams.__dataclass_fields__:
        value = index.get(name)
        if name == "type" or value is None:
            continue
        if name == "max_memory_gb":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 2**40:
                fail(f"index.max_memory_gb must be a non-negative number, got {_short(value)}")
        else:
            integer(value, f"index.{name}", 0, 2**31 - 1)
    items = data["items"]
    bare_name(items.get("file", ITEMS_FILE), "items.file", fail)
    columns = items.get("columns")
    if not isinstance(columns, Mapping) or list(columns)[:1] != ["id"]:
        fail("items.columns must be an object of column name -> kind whose first column is 'id'")
    for name, kind in columns.items():
        if kind not in COLUMN_KINDS:
            fail(f"items.columns.{_short(name)} has kind {_short(kind)}, not one of {COLUMN_KINDS}")
    for name, dim in data["parts"].items():
        integer(dim, f"parts.{_short(name)}", 1, MAX_DIM)
    for name, record in data["files"].items():
        bare_name(name, "a files entry", fail)
        if not isinstance(record, Mapping):
            fail(f"files.{name} must be an object with bytes and sha256")
        integer(record.get("bytes"), f"files.{name}.bytes", 0, 2**62)
        if not isinstance(record.get("sha256"), str) or not _SHA256.fullmatch(record["sha256"]):
            fail(f"files.{name}.sha256 must be 64 lowercase hex digits, got {_short(record.get('sha256'))}")


_COLLECTION = re.compile(r"[A-Za-z0-9_.-]{1,255}")


def _check_qdrant_record(index: Mapping[str, Any], fail: Any) -> None:
    """A Qdrant index record: a plain collection name, where the collection lives, the search mode."""
    name = index.get("collection")
    if not isinstance(name, str) or not _COLLECTION.fullmatch(name):
        fail(f"index.collection must be a plain collection name, got {_short(name)}")
    url, path = index.get("url"), index.get("path")
    where = url if url is not None else path
    if (url is None) == (path is None) or not isinstance(where, str) or "\x00" in where:
        fail("index needs exactly one of url (a Qdrant server) and path (Qdrant local mode), as strings")
    if index.get("engine", "client") not in ("client", "edge"):
        fail(f"index.engine must be 'client' or 'edge', got {_short(index.get('engine'))}")
    if not isinstance(index.get("exact", True), bool):
        fail(f"index.exact must be true or false, got {_short(index.get('exact'))}")


def bare_name(name: Any, what: str, fail: Any) -> None:
    """A file name inside the index folder: no folders, no ``..``, nothing hidden or absolute."""
    if (
        not isinstance(name, str)
        or not name
        or name != os.path.basename(name)
        or name.startswith(".")
        or ("\\" in name or "\x00" in name or len(name) > 255)
    ):
        fail(f"{what} must be a plain file name inside the index folder, got {_short(name)}")


def _short(value: Any, limit: int = 60) -> str:
    """A value for an error message: repr, cut short (the message stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """Size + sha256 of one file, the unit every integrity check compares."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def verify_file(path: Path, expected: Mapping[str, Any], checksum: bool = True, listed_in: str = MANIFEST_FILE) -> None:
    if not path.is_file():
        raise IndexIntegrityError(f"{path}: listed in {listed_in} but missing")
    size = path.stat().st_size
    if size != expected.get("bytes"):
        raise IndexIntegrityError(
            f"{path}: {size} bytes, but {listed_in} recorded {expected.get('bytes')} (truncated or replaced)"
        )
    if checksum:
        digest = sha256_file(path)
        if digest != expected.get("sha256"):
            raise IndexIntegrityError(
                f"{path}: sha256 {digest[:16]}... does not match {listed_in} "
                f"({str(expected.get('sha256'))[:16]}...): the file is corrupt or was modified"
            )


def model_record(model: str | Path, index_dir: str | Path, identity: str | None = None) -> dict[str, Any]:
    """The manifest's record of the model that made the vectors: its path (relative when inside the index
    folder, so the folder moves with it), the size + sha256 of its files and its identity (the weights'
    sha256: what "the same model" means for updates, collections and reloads).

    ``model`` is an artefact folder (``model.json`` + ``model.safetensors``) or, for indexes of older
    releases, a ``.ckpt`` file; :func:`verified_model` checks the record before anything loads it."""
    path, root = Path(model).resolve(), Path(index_dir).resolve()
    shown = os.path.relpath(path, root) if path.is_relative_to(root) else str(path)
    if path.is_dir():
        files = {name: file_record(path / name) for name in MODEL_FILES}
        if identity is None:
            from fashion_lightning.models.artifact import artifact_identity

            identity = artifact_identity(path)
        return {"model": shown, "model_files": files, "model_identity": identity}
    record = file_record(path)
    return {"checkpoint": shown, "checkpoint_file": record, "model_identity": identity or record["sha256"]}


def model_path(model: Mapping[str, Any], root: Path) -> Path | None:
    """The model (artefact folder, or an old index's checkpoint) the manifest names, resolved in the folder."""
    name = model.get("model") or model.get("checkpoint")
    if not name:
        return None
    if not isinstance(name, str) or "\x00" in name or len(name) > 4096:
        raise IndexIntegrityError(f"{root / MANIFEST_FILE}: the model path is not a valid path")
    return root / name if not Path(name).is_absolute() else Path(name)


def verified_model(
    model: Mapping[str, Any], root: Path, checksum: bool = True, allow_external: bool = False
) -> Path | None:
    """The model's path after checking it is what the index was built from (None if none named).

    A path outside the index folder (absolute, ``../``, or a link out of it) is refused unless
    ``allow_external`` says the user trusts it: whoever wrote the manifest also wrote its hashes, so a
    hash alone does not make a file elsewhere on the machine safe to load. A missing model is not an error
    here (item queries never need it); an edited manifest or a swapped file is.
    """
    path = model_path(model, root)
    if path is None:
        return None
    if not allow_external and not path.resolve().is_relative_to(root.resolve()):
        raise IndexIntegrityError(
            f"{root / MANIFEST_FILE}: names a model outside the index folder ({path}); refused. Rebuild the "
            "index with copy_model=true, or pass allow_external_model=true if you trust that file"
        )
    if not path.exists():
        return path
    where = f"{root / MANIFEST_FILE}'s model record"
    if "model" in model:
        files = model.get("model_files")
        if not isinstance(files, Mapping) or sorted(files) != sorted(MODEL_FILES):
            raise IndexIntegrityError(f"{where} does not list the size and sha256 of {list(MODEL_FILES)}")
        for name in MODEL_FILES:
            record = files[name]
            if not isinstance(record, Mapping):
                raise IndexIntegrityError(f"{where}: {name} has no size and sha256")
            verify_file(path / name, record, checksum, listed_in=where)
        return path
    record = model.get("checkpoint_file")
    if not isinstance(record, Mapping):
        raise IndexIntegrityError(
            f"{root / MANIFEST_FILE}: names checkpoint {path} without its size and sha256; rebuild the index"
        )
    verify_file(path, record, checksum, listed_in=where)
    return path


def read_manifest(root: Path, verify: bool = True, allow_external_model: bool = False) -> IndexManifest:
    """Parse ``manifest.json`` and check every listed file's size (and sha256 when ``verify``)."""
    if not root.is_dir():
        raise IndexIntegrityError(f"{root}: index folder not found")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise IndexIntegrityError(
            f"{manifest_path}: missing, so {root} is not an index folder (or its build did not finish); "
            "rebuild it with fashion-index"
        )
    try:
        data = load_json(manifest_path)
    except LimitError as err:  # too big, too deep, not UTF-8, not JSON: one line naming the file
        raise IndexIntegrityError(str(err)) from None
    manifest = IndexManifest.from_dict(data, str(manifest_path))
    for name, expected in manifest.files.items():
        verify_file(root / name, expected, verify)
    verified_model(manifest.model, root, verify, allow_external_model)
    kind = manifest.index.get("type", "flat")
    if manifest.backend == "faiss" and kind == "flat":
        check_flat_header(root / VECTORS_FILE, manifest)
    elif manifest.backend == "faiss":  # faiss's C++ reader: first in a memory-capped child (retrieval/faiss_probe)
        try:
            probe(root / VECTORS_FILE, kind, manifest.dim, manifest.count)
        except ProbeError as err:
            raise IndexIntegrityError(str(err)) from None
    return manifest


_FLAT_MAGICS = (b"IxFI", b"IxF2", b"IxFl")


def check_flat_header(path: Path, manifest: IndexManifest) -> None:
    """A flat FAISS file's header against the manifest and the file size, before faiss allocates anything.

    Layout (faiss ``write_index`` of an ``IndexFlat``): fourcc, int32 d, int64 ntotal, two int64 dummies,
    bool is_trained, int32 metric (+ float32 argument for metrics > 1), uint64 float count, the floats.
    """
    with open(path, "rb") as fh:
        head = fh.read(64)
    size = path.stat().st_size
    if len(head) < 49 or head[:4] not in _FLAT_MAGICS:
        raise IndexIntegrityError(f"{path}: not a flat FAISS index (header {head[:4]!r})")
    d, ntotal = struct.unpack_from("<iq", head, 4)
    metric = struct.unpack_from("<i", head, 33)[0]
    offset = 37 + (4 if metric > 1 else 0)
    floats = struct.unpack_from("<Q", head, offset)[0] if len(head) >= offset + 8 else -1
    if d != manifest.dim:
        raise IndexIntegrityError(f"{path}: holds {d}-d vectors but {MANIFEST_FILE} says dim={manifest.dim}")
    if ntotal != manifest.count:
        raise IndexIntegrityError(f"{path}: holds {ntotal} vectors but {MANIFEST_FILE} says count={manifest.count}")
    if floats != ntotal * d or size != offset + 8 + 4 * floats:
        raise IndexIntegrityError(f"{path}: header declares {floats} floats for {ntotal} x {d} vectors in {size} bytes")


def read_items(
    path: Path, manifest: IndexManifest, columns: list[str] | None = None, limits: CsvLimits = DEFAULT_CSV_LIMITS
) -> pd.DataFrame:
    """The items file with the manifest's column types; ``columns`` reads only those (plus ``id``).

    Size, line length and header width are checked (``limits``) before pandas allocates anything.
    """
    kinds: dict[str, str] = manifest.items.get("columns") or {}
    wanted = None if columns is None else ["id", *[c for c in kinds if c in set(columns) - {"id"}]]
    try:
        check_csv_file(path, limits)
    except LimitError as err:
        raise IndexIntegrityError(str(err)) from None
    try:
        header = pd.read_csv(path, dtype=str, nrows=0).columns.tolist()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise IndexIntegrityError(f"{path}: unreadable CSV ({_first_line(err)})") from None
    if header != list(kinds):
        raise IndexIntegrityError(
            f"{path}: columns {_short(header, 200)} != {MANIFEST_FILE}'s {_short(list(kinds), 200)}"
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[], usecols=wanted)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise IndexIntegrityError(f"{path}: unreadable CSV ({_first_line(err)})") from None
    if wanted is not None:
        frame = frame[wanted]
    if len(frame) != manifest.count:
        raise IndexIntegrityError(f"{path}: {len(frame)} item rows but the index holds {manifest.count} vectors")
    try:
        for name in frame.columns:
            kind = kinds[name]
            if kind in ("int", "float"):
                frame[name] = pd.to_numeric(frame[name].replace("", np.nan))
            elif kind == "bool":
                frame[name] = frame[name] == "True"
        frame["id"] = frame["id"].astype(np.int64)
    except (ValueError, TypeError, OverflowError) as err:
        raise IndexIntegrityError(f"{path}: bad values ({_first_line(err)})") from None
    if frame["id"].duplicated().any():
        duplicated = frame["id"][frame["id"].duplicated()].head(3).tolist()
        raise IndexIntegrityError(f"{path}: duplicate ids, e.g. {duplicated}")
    return frame


def read_parts(path: Path, manifest: IndexManifest) -> dict[str, np.ndarray]:
    """The extra vectors, each array's declared shape and size checked before it is read."""
    try:
        check_npz_headers(path, {name: (manifest.count, dim) for name, dim in manifest.parts.items()})
        with np.load(path, allow_pickle=False) as npz:
            return {name: np.asarray(npz[name], dtype=np.float32) for name in manifest.parts}
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise IndexIntegrityError(
            f"{path}: unreadable or missing arrays {_short(list(manifest.parts))} ({_first_line(err)})"
        ) from None


def check_npz_headers(path: Path, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Each ``.npy`` member's header (shape, dtype) and uncompressed size against ``shapes``, cheaply:
    a member declaring 10^12 rows, or a small compressed member that inflates to gigabytes, is refused
    before numpy allocates for it."""
    with zipfile.ZipFile(path) as archive:
        for name, shape in shapes.items():
            try:
                info = archive.getinfo(f"{name}.npy")
            except KeyError:
                raise IndexIntegrityError(f"{path}: no array {_short(name)}") from None
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read_header:
                    raise IndexIntegrityError(f"{path}: {_short(name)} has .npy format version {version}")
                declared, _, dtype = read_header[version](member)
                header_bytes = member.tell()
            if tuple(declared) != shape or dtype.kind != "f" or dtype.itemsize > 8:
                raise IndexIntegrityError(
                    f"{path}: {_short(name)} declares shape {_short(declared)} {dtype}, expected {shape} float"
                )
            if info.file_size != header_bytes + shape[0] * shape[1] * dtype.itemsize:
                raise IndexIntegrityError(
                    f"{path}: {_short(name)} is {info.file_size} bytes unpacked, not what shape {shape} needs"
                )


def _first_line(err: BaseException) -> str:
    return _short(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 200)
