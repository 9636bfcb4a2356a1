"""Marqo's KAGL retrieval protocol (marqo-FashionCLIP ``eval.py``) as pure functions.

Numbers from here are comparable with Marqo's published KAGL leaderboard because the
protocol is the same:

* **text-to-image**: queries are the distinct ``productDisplayName`` strings of the
  evaluated items, documents the *image-only* embeddings of every evaluated item; the
  relevant documents of a query are the items carrying exactly that text (for a unique
  name: the query's own item). Recall@1/10 and MRR.
* **category-to-product** for masterCategory, subCategory, articleType, baseColour: the
  query text is the label value itself (e.g. ``"Shirts"``), documents are
  ``normalise(0.9 * image + 0.1 * text)``, relevant = every item with that label.
  Precision@1/10 and MRR, averaged over label values.

As in Marqo's code, only the top ``max(ks)`` documents are retrieved, so MRR is MRR@10
(a query with no relevant item in its top 10 scores 0); Marqo samples at most 2,000
text queries, so does ``max_queries`` (seeded). Everything works from embeddings that
were already computed plus a function that embeds the label texts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fashion_lightning.data.schema import KAGL_CATEGORY_FIELDS
from fashion_lightning.evaluation.retrieval import chunked_topk

KAGL_DOC_WEIGHTS: tuple[float, float] = (0.9, 0.1)  # image, text
KAGL_MAX_QUERIES = 2000
SKIP_VALUES: frozenset[str] = frozenset({"", "nan", "None", "Other", "Unknown", "NA", "<unknown>"})


def product_documents(
    image_emb: torch.Tensor, text_emb: torch.Tensor, weights: tuple[float, float] = KAGL_DOC_WEIGHTS
) -> torch.Tensor:
    """Marqo's multi-field document: ``normalise(w_img * n(image) + w_txt * n(text))``."""
    image = F.normalize(torch.as_tensor(image_emb).float(), dim=-1)
    text = F.normalize(torch.as_tensor(text_emb).float(), dim=-1)
    return F.normalize(weights[0] * image + weights[1] * text, dim=-1)


def keyed_retrieval(
    query_emb: torch.Tensor,
    query_keys: Sequence[int] | np.ndarray,
    doc_emb: torch.Tensor,
    doc_keys: Sequence[int] | np.ndarray,
    ks: Iterable[int] = (1, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Rank all documents per query by cosine; relevant docs are those whose key equals the query's.

    Returns the mean over queries of ``r@k`` (hits in top k / relevant), ``p@k`` (hits in
    top k / k) and ``mrr`` (1 / rank of the first hit within the top ``max(ks)``, else 0).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    q = F.normalize(torch.as_tensor(query_emb).float(), dim=-1)
    d = F.normalize(torch.as_tensor(doc_emb).float(), dim=-1)
    qk = torch.as_tensor(np.asarray(query_keys), dtype=torch.long)
    dk = torch.as_tensor(np.asarray(doc_keys), dtype=torch.long)
    if len(q) != len(qk) or len(d) != len(dk):
        raise ValueError(f"embeddings and keys differ in length: queries {len(q)}/{len(qk)}, docs {len(d)}/{len(dk)}")
    if len(q) == 0 or len(d) == 0:
        return {}
    top = min(ks[-1], len(d))
    if bool((qk < 0).any()):
        raise ValueError("query keys must be >= 0 (negative doc keys mark documents relevant to no query)")
    counts = torch.bincount(dk[dk >= 0], minlength=int(qk.max()) + 1)
    n_relevant = counts[qk].float()
    if bool((n_relevant == 0).any()):
        raise ValueError("every query needs at least one relevant document")
    hits = (dk[chunked_topk(q, d, top, chunk)] == qk.unsqueeze(1)).float()  # [Q, top]
    out: dict[str, float] = {}
    for k in ks:
        found = hits[:, : min(k, top)].sum(dim=1)
        out[f"r@{k}"] = float((found / n_relevant).mean())
        out[f"p@{k}"] = float((found / k).mean())
    ranks = torch.arange(1, top + 1, dtype=torch.float32)
    first = torch.where(hits.bool(), ranks, torch.full_like(ranks, float("inf"))).min(dim=1).values
    out["mrr"] = float((1.0 / first).mean())  # 1/inf = 0: nothing relevant in the top k
    return out


def _sample(n: int, max_queries: int | None, seed: int) -> np.ndarray:
    if max_queries is None or n <= max_queries:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))


def text_to_image(
    texts: Sequence[str],
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    ks: Iterable[int] = (1, 10),
    max_queries: int | None = KAGL_MAX_QUERIES,
    seed: int = 0,
) -> dict[str, float]:
    """KAGL text-to-image: distinct item texts query the image-only embeddings of all items.

    ``text_emb[i]`` must embed ``texts[i]`` (the item's own productDisplayName), so the
    query embedding of a distinct text is that of its first item.
    """
    if len(texts) != len(text_emb) or len(texts) != len(image_emb):
        raise ValueError(f"texts ({len(texts)}), text_emb ({len(text_emb)}), image_emb ({len(image_emb)}) differ")
    keys: dict[str, int] = {}
    first: list[int] = []
    doc_keys = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        key = keys.setdefault(str(text), len(keys))
        if key == len(first):
            first.append(i)
        doc_keys[i] = key
    chosen = _sample(len(first), max_queries, seed)
    query_rows = np.asarray(first, dtype=np.int64)[chosen]
    metrics = keyed_retrieval(torch.as_tensor(text_emb)[query_rows], chosen, image_emb, doc_keys, ks)
    return {k: v for k, v in metrics.items() if not k.startswith("p@")}


def category_to_product(
    values: Sequence[str | None],
    doc_emb: torch.Tensor,
    embed_text: Callable[[list[str]], torch.Tensor],
    ks: Iterable[int] = (1, 10),
    skip: Iterable[str] = SKIP_VALUES,
) -> dict[str, float]:
    """KAGL category-to-product: each label value (as text) queries the product documents.

    ``values[i]`` is item ``i``'s label; values in ``skip`` (unknown, folded ``Other``) are
    neither queries nor relevant, but their items stay in the document pool.
    """
    if len(values) != len(doc_emb):
        raise ValueError(f"values ({len(values)}) and doc_emb ({len(doc_emb)}) differ in length")
    skip = set(skip)
    labels = sorted({str(v) for v in values if v is not None and str(v) not in skip})
    if not labels:
        return {}
    index = {v: i for i, v in enumerate(labels)}
    doc_keys = np.array([index.get(str(v), -1) if v is not None else -1 for v in values], dtype=np.int64)
    query_emb = torch.as_tensor(embed_text(list(labels))).float().cpu()
    metrics = keyed_retrieval(query_emb, np.arange(len(labels)), doc_emb, doc_keys, ks)
    return {k: v for k, v in metrics.items() if not k.startswith("r@")}


def kagl_benchmark(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    texts: Sequence[str],
    attributes: Mapping[str, Sequence[str | None]],
    embed_text: Callable[[list[str]], torch.Tensor],
    ks: Iterable[int] = (1, 10),
    fields: Iterable[str] = KAGL_CATEGORY_FIELDS,
    max_queries: int | None = KAGL_MAX_QUERIES,
    seed: int = 0,
) -> dict[str, float]:
    """The whole protocol, flat keys: ``kagl/text_to_image/r@1``, ``kagl/category/articleType/p@10``, ...

    Also ``kagl/category/mean/{p@k,mrr}`` over the fields that were evaluated.
    """
    ks = tuple(ks)
    out = {
        f"kagl/text_to_image/{k}": v
        for k, v in text_to_image(texts, text_emb, image_emb, ks, max_queries, seed).items()
    }
    docs = product_documents(image_emb, text_emb)
    per_field: dict[str, dict[str, float]] = {}
    for field in fields:
        if field in attributes:
            metrics = category_to_product(attributes[field], docs, embed_text, ks)
            if metrics:
                per_field[field] = metrics
                out.update({f"kagl/category/{field}/{k}": v for k, v in metrics.items()})
    if per_field:
        for name in next(iter(per_field.values())):
            out[f"kagl/category/mean/{name}"] = float(np.mean([m[name] for m in per_field.values()]))
    return out
