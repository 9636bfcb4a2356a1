"""Non-flat FAISS files from elsewhere: read first in a memory-capped child, every id checked (issue 19).

The attacker here wrote the whole folder, manifest and sha256 included, so only the structure check stands
between a crafted ``vectors.faiss`` and faiss's C++ reader in the serving process.
"""

from __future__ import annotations

import json
import struct

import faiss
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fashion_lightning.retrieval import IndexIntegrityError, IndexParams, build_index, load_index
from fashion_lightning.retrieval.faiss_probe import ProbeError, check_structure, probe
from fashion_lightning.retrieval.manifest import MANIFEST_FILE, VECTORS_FILE, sha256_file

N, D = 600, 8
PARAMS = {
    "ivf": IndexParams("ivf", nlist=8, nprobe=8, train_size=600),
    "ivfpq": IndexParams("ivfpq", nlist=4, pq_m=4, pq_nbits=4, train_size=600),
    "hnsw": IndexParams("hnsw", hnsw_m=8),
}


def vectors(n: int = N, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(path, kind: str):
    meta = pd.DataFrame({"id": np.arange(N, dtype=np.int64) + 1, "articleType": ["Shirts"] * N})
    build_index(vectors(), meta, path, {"checkpoint": None, "embedding_name": "random"}, params=PARAMS[kind])
    return path


def swap_vectors(path, data: bytes) -> None:
    """Replace vectors.faiss and re-sign the manifest, as whoever wrote the folder could."""
    (path / VECTORS_FILE).write_bytes(data)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"][VECTORS_FILE] = {"bytes": len(data), "sha256": sha256_file(path / VECTORS_FILE)}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_sound_files_pass_and_search_as_before(tmp_path, kind):
    index = load_index(build(tmp_path, kind))
    scores, rows = index.search(vectors(3, seed=1), 5)
    assert rows.shape == (3, 5) and rows.min() >= 0 and rows.max() < N


def test_ivf_lists_holding_ids_outside_the_index_are_refused(tmp_path):
    path = build(tmp_path, "ivf")
    quantizer = faiss.IndexFlatIP(D)
    crafted = faiss.IndexIVFFlat(quantizer, D, 8, faiss.METRIC_INNER_PRODUCT)
    crafted.train(vectors())
    crafted.add_with_ids(vectors(), np.arange(N, dtype=np.int64) + 10**9)  # labels beyond every row
    swap_vectors(path, faiss.serialize_index(crafted).tobytes())
    with pytest.raises(IndexIntegrityError, match="ids outside"):
        load_index(path)


def test_hnsw_links_outside_the_graph_are_refused_in_the_child():
    index = faiss.IndexHNSWFlat(D, 8, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors())
    check_structure(index, "hnsw", D, N)
    neighbors = faiss.vector_to_array(index.hnsw.neighbors)
    neighbors[neighbors.argmax()] = N + 7
    faiss.copy_array_to_vector(neighbors, index.hnsw.neighbors)
    with pytest.raises(ValueError, match="outside"):
        check_structure(index, "hnsw", D, N)


def test_a_declared_terabyte_is_refused_without_allocating_it(tmp_path):
    path = build(tmp_path, "ivf")
    data = bytearray((path / VECTORS_FILE).read_bytes())
    # the first 8-byte size field after the IVF header: the coarse quantizer's float count
    at = data.index(b"IxF") + 4 + 4 + 8 + 8 + 8 + 1 + 4
    struct.pack_into("<Q", data, at, 2**31)  # 8 GiB of floats: below faiss's own cap, above the child's
    swap_vectors(path, bytes(data))
    with pytest.raises(IndexIntegrityError, match="vectors.faiss"):
        load_index(path)


def test_the_wrong_kind_for_the_manifest_is_refused(tmp_path):
    path = build(tmp_path, "hnsw")
    with pytest.raises(ProbeError):
        probe(path / VECTORS_FILE, "ivf", D, N)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
def test_fuzzed_files_are_refused_or_answer_inside_the_index(tmp_path_factory, kind, edits):
    """Whatever the bytes, the parent never crashes: a one-line refusal, or searches that stay in range."""
    path = build(tmp_path_factory.mktemp(kind), kind)
    data = bytearray((path / VECTORS_FILE).read_bytes())
    for where, patch in edits:
        at = int(where * (len(data) - len(patch)))
        data[at : at + len(patch)] = patch
    swap_vectors(path, bytes(data))
    try:
        index = load_index(path)
    except IndexIntegrityError as err:
        assert "\n" not in str(err)
        return
    _, rows = index.search(vectors(4, seed=2), 5)
    assert rows.max() < N and rows.min() >= -1
