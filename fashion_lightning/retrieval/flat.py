"""Exact search over a flat index's own float32 storage: numpy for single queries, certified bf16 GEMM for batches."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, cast

import faiss
import numpy as np

if TYPE_CHECKING:
    import torch

# Flat indexes: one query is a memory-bound matrix-vector pass (numpy's BLAS beats faiss's scan); from two
# queries on, the certified bf16 GEMM (see FlatSearcher) or faiss's BLAS path.
BATCH_MIN_QUERIES = 2
_QUERY_BLOCK = 256


@functools.cache
def bf16_available() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (emulated bf16 would be slower than fp32).

    torch has no public query for this, so the CPU's own feature flags decide (Linux: /proc/cpuinfo);
    elsewhere the batched flat search uses faiss's BLAS path instead.
    """
    try:
        import torch

        if not torch.backends.mkldnn.is_available():
            return False
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except (ImportError, OSError):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def flat_view(index: faiss.Index) -> np.ndarray:
    """Zero-copy, read-only [N, D] float32 view of an IndexFlat's storage (lives as long as ``index``)."""
    flat = cast(faiss.IndexFlat, faiss.downcast_index(index))  # faiss's stub types it as the Index base
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


class FlatSearcher:
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
        self._bf16: torch.Tensor | None = None  # bf16 copy of the vectors, made on the first batch
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

    def masked(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of one query among ``allowed`` rows: one pass, disallowed scores set to -inf."""
        scores = self.vectors @ query
        if allowed is not None:
            scores[~allowed] = -np.inf
        top_s, top_r = _topk_rows(scores[None], k)
        return top_s[0], top_r[0]

    def _prepare_bf16(self) -> torch.Tensor:
        import torch

        table = torch.empty(self.vectors.shape, dtype=torch.bfloat16)
        for start in range(0, len(self.vectors), 8192):  # chunked: no full-size fp32 temporary
            chunk = np.array(self.vectors[start : start + 8192])  # writable copy: torch wants one
            table[start : start + len(chunk)] = torch.from_numpy(chunk)
            err = chunk - table[start : start + len(chunk)].float().numpy()
            self._max_err = max(self._max_err, float(np.sqrt(np.einsum("ij,ij->i", err, err).max())))
        self._bf16 = table
        return table

    def bf16(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        table = self._bf16 if self._bf16 is not None else self._prepare_bf16()
        n, d = self.vectors.shape
        m = min(n, max(4 * k, k + 48))
        out_s, out_r = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        with torch.inference_mode():
            for start in range(0, len(queries), _QUERY_BLOCK):
                q = queries[start : start + _QUERY_BLOCK]
                q16 = torch.from_numpy(q).to(torch.bfloat16)
                approx, cand_t = torch.topk(q16 @ table.T, m, dim=1)
                cand, approx_m = cand_t.numpy(), approx[:, -1].float().numpy().astype(np.float64)
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
