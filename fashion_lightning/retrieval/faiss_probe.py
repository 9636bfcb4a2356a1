"""Open a non-flat FAISS file from elsewhere in a child process first, with a memory ceiling, and check its
structure against the manifest before the caller's process reads it.

Why: a flat file's header is simple enough to parse here (``manifest.check_flat_header``), but IVF, IVF-PQ
and HNSW files are read by faiss's C++ deserialiser, and a crafted file can declare terabyte vectors or
hold neighbour / list ids that point outside the index (read out of bounds at search time). The child
reads the file exactly as ``load_index`` will, under ``RLIMIT_AS``, and checks every id the search will
follow; a crash, a memory blow-up or a bad id in the child is a one-line refusal in the parent, which
then reads the same bytes knowing they are sound.

Run as ``python -m fashion_lightning.retrieval.faiss_probe <file> <kind> <dim> <count>``: prints one JSON
line ``{"ok": true}`` or ``{"ok": false, "reason": "..."}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

try:
    import resource
except ImportError:  # Windows: no RLIMIT_AS; the child still isolates a crash
    resource = None  # type: ignore[assignment]

# The child may map the file and hold the index once: its size, what faiss + numpy need to import, and
# room for the id checks. Anything a file declares beyond this is refused rather than allocated.
BASE_MEMORY = 3 * 2**30
TIMEOUT_S = 600.0


class ProbeError(Exception):
    """The file failed the sandboxed read or its structure check (message: one line)."""


def probe(path: str | Path, kind: str, dim: int, count: int, timeout: float = TIMEOUT_S) -> None:
    """Raise ``ProbeError`` unless the child read ``path`` and found a ``kind`` index of ``count`` x ``dim``
    whose ids all stay inside the index."""
    path = Path(path)
    limit = BASE_MEMORY + 2 * path.stat().st_size
    command = [sys.executable, "-m", __name__, str(path), kind, str(dim), str(count)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            preexec_fn=None if resource is None else lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ProbeError(f"{path}: reading it took longer than {timeout:.0f} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
        raise ProbeError(f"{path}: faiss could not read it within {limit >> 20} MiB ({how})")
    answer = json.loads(lines[-1])
    if not answer.get("ok"):
        raise ProbeError(f"{path}: {answer.get('reason', 'rejected')}")


def check_structure(index, kind: str, dim: int, count: int) -> None:  # noqa: ANN001 - a faiss index
    """Every id a search follows stays inside ``[0, count)``; sizes agree with the manifest."""
    import faiss
    import numpy as np

    if index.d != dim or index.ntotal != count:
        raise ValueError(f"holds {index.ntotal} x {index.d} vectors, manifest says {count} x {dim}")
    if kind in ("ivf", "ivfpq"):
        ivf = faiss.extract_index_ivf(index)
        if ivf.quantizer.ntotal != ivf.nlist or ivf.quantizer.d != dim:
            raise ValueError(f"coarse quantizer holds {ivf.quantizer.ntotal} centroids for {ivf.nlist} lists")
        lists = ivf.invlists
        if lists is None:
            raise ValueError("IVF index without inverted lists")
        total = 0
        for number in range(ivf.nlist):
            size = lists.list_size(number)
            if size:
                ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
                if ids.min() < 0 or ids.max() >= count:
                    raise ValueError(f"list {number} holds ids outside [0, {count})")
            total += size
        if total != count:
            raise ValueError(f"inverted lists hold {total} entries for {count} vectors")
    elif kind == "hnsw":
        hnsw = index.hnsw
        offsets = faiss.vector_to_array(hnsw.offsets)
        neighbors = faiss.vector_to_array(hnsw.neighbors)
        levels = faiss.vector_to_array(hnsw.levels)
        if len(offsets) != count + 1 or len(levels) != count or index.storage.ntotal != count:
            raise ValueError("graph sizes disagree with the vector count")
        if count and (np.any(np.diff(offsets) < 0) or offsets[0] != 0 or offsets[-1] != len(neighbors)):
            raise ValueError("graph offsets are not a partition of the neighbour table")
        if len(neighbors) and (neighbors.min() < -1 or neighbors.max() >= count):
            raise ValueError(f"graph links point outside [0, {count})")
        if count and not (0 <= hnsw.entry_point < count and hnsw.max_level == int(levels.max()) - 1):
            raise ValueError("graph entry point or top level is inconsistent")
    else:
        raise ValueError(f"unknown index type {kind!r}")


def _main(argv: list[str]) -> int:
    path, kind, dim, count = argv[0], argv[1], int(argv[2]), int(argv[3])
    try:
        import faiss

        index = faiss.read_index(path, faiss.IO_FLAG_MMAP if kind in ("ivf", "ivfpq") else 0)
        check_structure(index, kind, dim, count)
    except (RuntimeError, ValueError, MemoryError, AttributeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:300]
        print(json.dumps({"ok": False, "reason": reason}))
        return 0
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
