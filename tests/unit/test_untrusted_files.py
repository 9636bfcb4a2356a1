"""Small files that cost a lot (issue 19, item 2, the file parts): manifests, items.csv, styles.csv,
parts.npz and flat vectors.faiss from elsewhere are refused in one line before anything big is allocated.

The manifest's writer also writes its checksums, so every damage here is re-checksummed: the checks
under test are the ones that do not trust the manifest.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fashion_lightning.data.catalog import DataReport, load_catalog, parse_styles
from fashion_lightning.data.schema import STYLES_HEADER
from fashion_lightning.data.source import CatalogFormatError, CatalogSource
from fashion_lightning.retrieval import IndexIntegrityError, IndexParams, build_index, load_index
from fashion_lightning.retrieval.manifest import MANIFEST_FILE, sha256_file
from fashion_lightning.utils.bounded import CsvLimits, LimitError, check_csv_bytes
from fashion_lightning.utils.config_check import one_line_errors

MODEL_INFO = {"checkpoint": None, "embedding_name": "random", "module_class": "None", "tasks": ["articleType"]}
N, D = 40, 8


def build(path: Path, params: IndexParams | None = None, n: int = N) -> Path:
    vectors = np.random.default_rng(0).standard_normal((n, D)).astype(np.float32)
    meta = pd.DataFrame({"id": np.arange(n, dtype=np.int64) + 1, "productDisplayName": [f"item {i}" for i in range(n)]})
    build_index(vectors, meta, path, MODEL_INFO, params=params, extra_vectors={"image_embedding": vectors[:, :4]})
    return path


@pytest.fixture
def index_dir(tmp_path: Path) -> Path:
    return build(tmp_path / "idx")


def manifest_of(path: Path) -> dict:
    return json.loads((path / MANIFEST_FILE).read_text())


def write_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def replace_file(path: Path, name: str, data: bytes) -> None:
    """Replace one file and record its new size and sha256, as whoever wrote the manifest could."""
    (path / name).write_bytes(data)
    manifest = manifest_of(path)
    manifest["files"][name] = {"bytes": len(data), "sha256": sha256_file(path / name)}
    write_manifest(path, manifest)


def refused(path: Path, *words: str) -> str:
    with pytest.raises(IndexIntegrityError) as caught:
        load_index(path)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message[:300]
    for word in words:
        assert word in message, message
    return message


# -- items.csv -------------------------------------------------------------------------------------------------------
def test_items_csv_with_a_million_columns(index_dir):
    """Fails on old main: pandas parsed the whole header and the refusal quoted all of it (megabytes)."""
    header = "id,productDisplayName," + ",".join(f"c{i}" for i in range(1_000_000))
    replace_file(index_dir, "items.csv", (header + "\n1,x\n").encode())
    refused(index_dir, "items.csv", "columns (limit max_columns = 1024)")


def test_items_csv_with_a_huge_line(index_dir):
    """Fails on old main: the line went to pandas (a 1 GB one ends in MemoryError); 2 MiB shows the check."""
    text = (index_dir / "items.csv").read_text()
    replace_file(index_dir, "items.csv", (text + "99," + "x" * (2 * 2**20) + "\n").encode())
    refused(index_dir, "items.csv", "line longer than 1048576 bytes")


def test_items_csv_size_is_checked_before_reading(index_dir, monkeypatch):
    from fashion_lightning.retrieval import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "DEFAULT_CSV_LIMITS", CsvLimits(max_bytes=100))
    monkeypatch.setattr(manifest_module.read_items, "__defaults__", (None, CsvLimits(max_bytes=100)))
    refused(index_dir, "items.csv", "(limit 100)")


def test_items_csv_bad_values_are_one_line(index_dir):
    text = (index_dir / "items.csv").read_text().replace("\n2,", "\n99999999999999999999999,", 1)
    replace_file(index_dir, "items.csv", text.encode())
    refused(index_dir, "items.csv", "bad values")


# -- manifest.json ---------------------------------------------------------------------------------------------------
MANIFEST_DAMAGE = {
    "items is a list": (lambda m: m.update(items=[]), "items must be an object"),
    "files entry not an object": (lambda m: m["files"].update({"items.csv": 5}), "files.items.csv must be an object"),
    "file outside the folder": (
        lambda m: m["files"].update({"../outside.bin": {"bytes": 1, "sha256": "0" * 64}}),
        "plain file name inside the index folder",
    ),
    "absolute items file": (lambda m: m["items"].update(file="/etc/passwd"), "items.file must be a plain file name"),
    "count is text": (lambda m: m.update(count="40"), "count must be an integer"),
    "dim is a bool": (lambda m: m.update(dim=True), "dim must be an integer"),
    "dim enormous": (lambda m: m.update(dim=10**12), "dim must be an integer in [1, 65536]"),
    "nprobe is text": (lambda m: m["index"].update(nprobe="16"), "index.nprobe must be an integer"),
    "index type unknown": (lambda m: m["index"].update(type="Flat,IDMap"), "index.type must be one of"),
    "column kind unknown": (lambda m: m["items"]["columns"].update(id="object"), "has kind 'object'"),
    "parts dim negative": (lambda m: m["parts"].update(image_embedding=-4), "parts.'image_embedding' must be"),
    "sha256 not hex": (lambda m: m["files"]["items.csv"].update(sha256="zz"), "sha256 must be 64 lowercase hex"),
    "bytes is a float": (lambda m: m["files"]["items.csv"].update(bytes=1.5), "files.items.csv.bytes must be"),
    "checkpoint not a path": (lambda m: m["model"].update(checkpoint=1), "model.checkpoint must be a string"),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE), ids=list(MANIFEST_DAMAGE))
def test_malformed_manifest_fields_are_one_line(index_dir, damage):
    """Fails on old main for most: AttributeError / TypeError tracebacks, or a file outside the folder read."""
    change, words = MANIFEST_DAMAGE[damage]
    manifest = manifest_of(index_dir)
    change(manifest)
    write_manifest(index_dir, manifest)
    refused(index_dir, MANIFEST_FILE, words)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested more than 32 levels deep"),
        ('{"count": NaN}', "not valid JSON"),
        ("\xff\xfe garbage", "not UTF-8"),
        ("[1, 2, 3]", "expected a JSON object"),
    ],
    ids=["deep", "nan", "binary", "list"],
)
def test_unparseable_manifests_are_one_line(index_dir, text, words):
    """Fails on old main for the deep one: RecursionError from json.loads."""
    (index_dir / MANIFEST_FILE).write_bytes(text.encode("latin-1"))
    refused(index_dir, MANIFEST_FILE, words)


def test_huge_manifest_is_refused_before_reading(index_dir):
    with open(index_dir / MANIFEST_FILE, "ab") as fh:
        fh.truncate(64 * 2**20)  # sparse: 64 MiB of zeros cost nothing on disk
    refused(index_dir, MANIFEST_FILE, "bytes (limit 16777216)")


# -- parts.npz, vectors.faiss, vectors.f32 ----------------------------------------------------------------------
def _npy(shape: tuple[int, ...], data: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def test_parts_member_declaring_an_enormous_shape(index_dir):
    """Fails on old main: numpy allocated the declared 2^40 x 4 array (MemoryError) before reading."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("image_embedding.npy", _npy((2**40, 4), b"\0" * 64))
    replace_file(index_dir, "parts.npz", buf.getvalue())
    refused(index_dir, "parts.npz", "declares shape (1099511627776, 4)")


def test_parts_member_that_inflates_beyond_its_shape(index_dir):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("image_embedding.npy", _npy((N, 4), b"\0" * (64 * 2**20)))  # 64 MiB -> ~64 KiB zipped
    replace_file(index_dir, "parts.npz", buf.getvalue())
    refused(index_dir, "parts.npz", "bytes unpacked")


def test_flat_faiss_header_is_checked_against_the_file(index_dir):
    data = bytearray((index_dir / "vectors.faiss").read_bytes())
    struct.pack_into("<Q", data, 37, 2**39)  # the float count: a reader would size its buffer from it
    replace_file(index_dir, "vectors.faiss", bytes(data))
    refused(index_dir, "vectors.faiss", "header declares 549755813888 floats")
    replace_file(index_dir, "vectors.faiss", b"not a faiss file at all, but long enough for a header....")
    refused(index_dir, "vectors.faiss", "not a flat FAISS index")


def test_exact_vectors_size_must_match_count_and_dim(tmp_path):
    """Fails on old main: np.memmap of a short vectors.f32 raised a ValueError traceback."""
    path = build(tmp_path / "ivf", IndexParams("ivf", nlist=2, rerank=10), n=200)
    data = (path / "vectors.f32").read_bytes()
    replace_file(path, "vectors.f32", data[: len(data) // 2])
    refused(path, "vectors.f32 is recorded as", "not count x dim x 4")


# -- styles.csv ------------------------------------------------------------------------------------------
ROW = "1001,Men,Apparel,Topwear,Tshirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt"


def _styles_refused(raw: bytes, *words: str) -> str:
    with pytest.raises(CatalogFormatError) as caught:
        parse_styles(raw, DataReport(), where="styles.csv")
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600 and "styles.csv" in message, message[:300]
    for word in words:
        assert word in message, message
    return message


def test_styles_with_a_field_beyond_the_csv_field_limit():
    """Fails on old main: csv.Error ('field larger than field limit') traceback."""
    raw = f'{STYLES_HEADER}\n{ROW}\n1002,Men,Apparel,Topwear,Tshirts,Red,Fall,2011,Casual,"{"x" * 200_000}"\n'
    _styles_refused(raw.encode(), "unreadable CSV", "field larger than field limit")


def test_styles_with_a_million_columns():
    """Fails on old main: the refusal quoted the whole million-column header."""
    raw = f"{STYLES_HEADER}," + ",".join(f"c{i}" for i in range(1_000_000)) + f"\n{ROW}\n"
    _styles_refused(raw.encode(), "columns (limit max_columns = 1024)")


def test_styles_with_a_huge_line_or_repeated_columns():
    _styles_refused(f"{STYLES_HEADER}\n{ROW}{'x' * (2 * 2**20)}\n".encode(), "line longer than 1048576 bytes")
    _styles_refused(f"{STYLES_HEADER},id\n{ROW},1\n".encode(), "repeats column(s) ['id']")
    _styles_refused(b"id,name\n1,x\n", "lacks column(s)")


def test_styles_size_is_checked_before_reading(tmp_path, kit):
    root = kit.write(tmp_path / "cat", f"{STYLES_HEADER}\n{ROW}\n", {1001: kit.jpeg()})
    source = CatalogSource(root)
    with pytest.raises(CatalogFormatError, match=r"styles\.csv is \d+ bytes \(limit max_bytes = 10\)"):
        source.read_styles(CsvLimits(max_bytes=10))
    zipped = CatalogSource(kit.zip(root, tmp_path / "cat.zip"))
    with pytest.raises(CatalogFormatError, match=r"cat\.zip:styles\.csv is \d+ bytes"):
        zipped.read_styles(CsvLimits(max_bytes=10))


def test_a_bad_catalog_is_one_line_and_exit_2_in_apps(tmp_path, kit):
    root = kit.write(tmp_path / "cat", f'{STYLES_HEADER}\n{ROW}\n"{"x" * 200_000}\n', {1001: kit.jpeg()})
    with pytest.raises(SystemExit) as exited, one_line_errors(FileNotFoundError):  # as train / eval / index / eda
        load_catalog(root)
    assert exited.value.code == 2


def test_csv_limits_scan_lines_across_chunks():
    limits = CsvLimits(max_line=10)
    check_csv_bytes(b"a,b\n" + b"0123456789\r\n" * 3 + b"0123456789", limits)
    for bad in (b"a,b\n" + b"01234567890\n", b"a,b\n" + b"0123456789\n" + b"01234567890", b"x" * 11):
        with pytest.raises(LimitError, match="line longer than 10 bytes"):
            check_csv_bytes(bad, limits)


def test_recommend_app_exits_2_on_a_damaged_items_file(index_dir, tmp_path):
    header = "id,productDisplayName," + ",".join(f"c{i}" for i in range(5000))
    replace_file(index_dir, "items.csv", (header + "\n1,x\n").encode())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "fashion_lightning.apps.recommend", f"index_dir={index_dir}", "query.item_id=1",
         "gallery=false", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "fashion-recommend:" in line]
    assert len(lines) == 1 and "max_columns" in lines[0] and "Traceback" not in proc.stderr
