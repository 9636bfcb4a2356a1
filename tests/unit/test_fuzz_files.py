"""Property-based fuzzing of the files the project reads from elsewhere (issue 19): an index folder's
``manifest.json``, ``items.csv`` and ``parts.npz``, and a catalog's ``styles.csv``.

Whatever the content, reading it ends in a valid load or in the project's one-line error
(:class:`IndexIntegrityError`, :class:`CatalogFormatError`), never in another exception and never in a hang.
Derandomised with a fixed small budget, so the whole file runs in well under 30 s and is the same in CI.
Whoever writes a manifest also writes its checksums, so damaged files are re-checksummed first: the
checks under test are the ones that do not trust the manifest.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fashion_lightning.data.catalog import DataReport, clean_styles, parse_styles
from fashion_lightning.data.schema import STYLES_HEADER
from fashion_lightning.data.source import CatalogFormatError
from fashion_lightning.retrieval import IndexIntegrityError, build_index, load_index
from fashion_lightning.retrieval.manifest import MANIFEST_FILE, sha256_file
from fashion_lightning.utils.bounded import walk

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

MODEL_INFO = {"checkpoint": None, "embedding_name": "random", "module_class": "None", "tasks": ["articleType"]}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid index folder; each example works on a copy."""
    path = tmp_path_factory.mktemp("fuzz") / "idx"
    vectors = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    meta = pd.DataFrame(
        {
            "id": np.arange(6, dtype=np.int64) + 10,
            "productDisplayName": ['Men, "Navy" Shirt', "Café\nline", "", "plain", "x", "y"],
            "year": np.arange(6) + 2010,
            "price": np.linspace(0, 1, 6),
            "inStock": [True, False] * 3,
        }
    )
    build_index(vectors, meta, path, MODEL_INFO, extra_vectors={"image_embedding": vectors[:, :2]})
    return path


@contextmanager
def copy_of(template: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "idx"
        shutil.copytree(template, path)
        yield path


def rechecksum(path: Path, name: str) -> None:
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"][name] = {"bytes": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


def loads_or_refuses(path: Path) -> None:
    """The property: a valid load, or one short line of IndexIntegrityError."""
    try:
        index = load_index(path)
    except IndexIntegrityError as err:
        message = str(err)
        assert message and "\n" not in message and len(message) < 1000, message[:300]
        return
    assert len(index.items) == index.n and index.items["id"].is_unique


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["flat", "ivf", "items.csv", "vectors.faiss", "../x", "/etc/passwd", "0" * 64, "id", "str"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _set(tree: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return tree


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_fuzz_manifest_fields(template, data):
    manifest = json.loads((template / MANIFEST_FILE).read_text())
    paths = [p for p, _ in walk(manifest)]
    shallow = [p for p in paths if len(p) <= 2]  # structure first: a whole section or record replaced
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(shallow) | st.sampled_from(paths), label="path")
        try:
            manifest = _set(manifest, path, data.draw(json_values, label="value"), data.draw(st.booleans()))
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed or replaced the parent
            continue
    with copy_of(template) as path:
        (path / MANIFEST_FILE).write_text(json.dumps(manifest))
        loads_or_refuses(path)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_bytes(template, data):
    raw = bytearray((template / MANIFEST_FILE).read_bytes())
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(raw)), label="at")
        chunk = data.draw(st.binary(max_size=6) | st.sampled_from([b"[", b"{", b"}", b'"', b"NaN", b"1e999", b"\\"]))
        cut = data.draw(st.integers(0, 4), label="cut")
        raw[at : at + cut] = chunk
    with copy_of(template) as path:
        (path / MANIFEST_FILE).write_bytes(bytes(raw))
        loads_or_refuses(path)


csv_text = st.lists(
    st.sampled_from([*'ab1-9.,"\n\r\t ;\x00é[]', "True", "nan", "1e400", "10", "99999999999999999999"]), max_size=60
).map("".join)


@FUZZ
@given(data=st.data())
def test_fuzz_items_csv(template, data):
    text = (template / "items.csv").read_text(encoding="utf-8")
    lines = text.split("\n")
    mode = data.draw(st.sampled_from(["arbitrary", "line", "cell"]), label="mode")
    if mode == "arbitrary":
        new = data.draw(csv_text, label="items.csv")
    elif mode == "line":
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        lines[i] = data.draw(csv_text, label="replacement")
        new = "\n".join(lines)
    else:
        i = data.draw(st.integers(1, len(lines) - 2), label="row")
        cells = lines[i].split(",")
        j = data.draw(st.integers(0, len(cells) - 1), label="cell")
        cells[j] = data.draw(csv_text, label="value")
        lines[i] = ",".join(cells)
        new = "\n".join(lines)
    with copy_of(template) as path:
        (path / "items.csv").write_bytes(new.encode("utf-8", errors="surrogatepass"))
        rechecksum(path, "items.csv")
        loads_or_refuses(path)


@FUZZ
@given(data=st.data())
def test_fuzz_parts_npz(template, data):
    raw = bytearray((template / "parts.npz").read_bytes())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.integers(0, len(raw)), label="at")
        raw[at : at + data.draw(st.integers(0, 8))] = data.draw(st.binary(max_size=8), label="bytes")
    with copy_of(template) as path:
        (path / "parts.npz").write_bytes(bytes(raw))
        rechecksum(path, "parts.npz")
        loads_or_refuses(path)


STYLES_ROW = st.lists(
    st.lists(st.sampled_from([*'ab1-9 ,"\n\r\x00é', "Men", "NA", "2012", "Apparel", "", "1e400"]), max_size=4).map(
        "".join
    ),
    max_size=13,
)


def _styles_or_refused(raw: bytes) -> None:
    """The property for styles.csv: parsed and cleaned, or one short line of CatalogFormatError."""
    report = DataReport()
    try:
        frame = clean_styles(parse_styles(raw, report, where="styles.csv"), report)
    except CatalogFormatError as err:
        message = str(err)
        assert message.startswith("styles.csv") and "\n" not in message and len(message) < 1000, message[:300]
        return
    assert frame["id"].is_unique and report.rows_read >= len(frame)


@FUZZ
@given(rows=st.lists(STYLES_ROW, max_size=8), header=st.sampled_from([STYLES_HEADER, STYLES_HEADER + ",extra", "id,x"]))
def test_fuzz_styles_rows(rows, header):
    text = header + "\n" + "\n".join(",".join(row) for row in rows)
    _styles_or_refused(text.encode("utf-8", errors="surrogatepass"))


@FUZZ
@given(raw=st.binary(max_size=400), prefix=st.booleans())
def test_fuzz_styles_bytes(raw, prefix):
    _styles_or_refused((STYLES_HEADER.encode() + b"\n" if prefix else b"") + raw)


def test_fuzzers_reach_both_outcomes(template):
    """The properties are not vacuous: an untouched folder loads, a damaged one is refused."""
    with copy_of(template) as path:
        loads_or_refuses(path)
        assert load_index(path).n == 6
        manifest = copy.deepcopy(json.loads((path / MANIFEST_FILE).read_text()))
        manifest["items"] = []
        (path / MANIFEST_FILE).write_text(json.dumps(manifest))
        with pytest.raises(IndexIntegrityError):
            load_index(path)
