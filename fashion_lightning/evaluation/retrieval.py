"""Item-to-item retrieval metrics: each item queries the rest of its split.

Two items are relevant to each other iff they share every label in ``relevance_columns``
(e.g. same articleType, or the strict articleType+baseColour+gender). Rows with an unknown
label (-1) in one of those columns stay in the gallery but are never relevant, and are not
used as queries. Queries without any relevant item in the rest of the split are skipped too:
no ranking can score them, so they would only shift every model's numbers by the same amount.

Definitions (binary relevance, ``R`` = number of relevant items for the query):
``precision@k`` = hits in the top k / k; ``hit_rate@k`` = 1 if any hit in the top k;
``map@k`` = sum over ranks r <= k of precision@r * rel_r, divided by min(k, R);
``ndcg@k`` = DCG@k / ideal DCG@k with gains rel_r / log2(r + 1).

precision, hit_rate and ndcg are exactly torchmetrics' ``retrieval_precision`` /
``retrieval_hit_rate`` / ``retrieval_normalized_dcg`` (tests/unit/test_retrieval_metrics.py checks
them against those functions); they are computed here in one vectorised pass over a ``[Q, k]`` hit
matrix because torchmetrics' functions take one query per call (a Python loop over 20,000 queries).
``map@k`` is the project's own, normalised by ``min(k, R)`` (torchmetrics' ``top_k`` variant divides
by the hits found instead), as defined above and checked against a brute-force reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

METRIC_NAMES = ("precision", "hit_rate", "map", "ndcg")


def metric_keys(ks: Sequence[int]) -> list[str]:
    """The keys ``retrieval_metrics`` returns, e.g. ``"map@10"``."""
    return [f"{name}@{k}" for name in METRIC_NAMES for k in ks]


def relevance_groups(labels: torch.Tensor, relevance_columns: Sequence[int]) -> torch.Tensor:
    """One group id per row (equal ids = relevant to each other); -1 where a needed label is unknown."""
    labels = labels.view(-1, 1) if labels.ndim == 1 else labels
    key = labels[:, list(relevance_columns)]
    valid = (key >= 0).all(dim=1)
    groups = torch.full((labels.shape[0],), -1, dtype=torch.long, device=labels.device)
    if bool(valid.any()):
        _, inverse = torch.unique(key[valid], dim=0, return_inverse=True)
        groups[valid] = inverse
    return groups


def _num_relevant(groups: torch.Tensor) -> torch.Tensor:
    """For each row, how many *other* rows share its group (0 for rows without a group)."""
    known = groups >= 0
    if not bool(known.any()):
        return torch.zeros_like(groups)
    sizes = torch.bincount(groups[known])
    return torch.where(known, sizes[groups.clamp(min=0)] - 1, torch.zeros_like(groups))


def retrieval_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    relevance_columns: Sequence[int] = (0,),
    chunk_size: int = 1024,
) -> dict[str, torch.Tensor]:
    """Mean precision/hit_rate/map/ndcg@k over all queries; NaN when no item has a relevant match.

    ``embeddings`` ``[N, D]`` are expected L2-normalised (the dot product ranks by cosine);
    ``labels`` ``[N, T]`` (or ``[N]``).
    """
    return retrieval_metrics_by_relevance(embeddings, labels, {"": relevance_columns}, ks, chunk_size)[""]


def retrieval_metrics_by_relevance(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    relevance: Mapping[str, Sequence[int]],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, dict[str, torch.Tensor]]:
    """``retrieval_metrics`` for several relevance definitions (name -> label columns) at once.

    The ranking does not depend on relevance, so one nearest-neighbour search serves all of
    them; it runs ``chunk_size`` queries at a time, so memory stays at ``chunk_size x N``.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if embeddings.ndim != 2 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"expected embeddings [N,D] and labels [N,...], got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    emb = embeddings.detach().float()
    labels = labels.to(emb.device)
    groups = {name: relevance_groups(labels, columns) for name, columns in relevance.items()}
    num_relevant = {name: _num_relevant(group) for name, group in groups.items()}
    searched = torch.nonzero(torch.stack([n > 0 for n in num_relevant.values()]).any(dim=0)).squeeze(1)
    neighbours = torch.full(
        (emb.shape[0], max(0, min(max(ks), emb.shape[0] - 1))), -1, dtype=torch.long, device=emb.device
    )
    neighbours[searched] = nearest_neighbours(emb, searched, neighbours.shape[1], chunk_size)

    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, group in groups.items():
        queries = torch.nonzero(num_relevant[name] > 0).squeeze(1)
        if queries.numel() == 0:
            out[name] = {key: torch.tensor(float("nan"), device=emb.device) for key in metric_keys(ks)}
            continue
        hits = (group[neighbours[queries]] == group[queries].unsqueeze(1)).double()
        sums = _metric_sums(hits, num_relevant[name][queries], ks)
        out[name] = {key: (total / queries.numel()).float() for key, total in sums.items()}
    return out


def chunked_topk(
    queries: torch.Tensor, docs: torch.Tensor, k: int, chunk_size: int = 1024, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """``[Q, k]`` indices of the ``docs`` with the largest dot product per query row.

    The one exact top-k of the package's evaluations: ``chunk_size`` queries at a time, so memory
    stays at ``chunk_size x N``. ``exclude[i]`` names a document query ``i`` may not return (itself).
    """
    parts = [torch.empty((0, k), dtype=torch.long, device=docs.device)]
    for start in range(0, queries.shape[0], chunk_size):
        sims = queries[start : start + chunk_size] @ docs.T
        if exclude is not None:
            sims[torch.arange(sims.shape[0], device=sims.device), exclude[start : start + chunk_size]] = float("-inf")
        parts.append(sims.topk(k, dim=1).indices)
    return torch.cat(parts)


def nearest_neighbours(emb: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """``[Q, k]`` indices of each query's most similar items (dot product), the query itself excluded."""
    return chunked_topk(emb[queries], emb, k, chunk_size, exclude=queries)


def _metric_sums(hits: torch.Tensor, num_relevant: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-metric sums over queries, from their ``[Q, kmax]`` 0/1 relevance of the ranked items."""
    kmax = hits.shape[1]
    ranks = torch.arange(1, kmax + 1, device=hits.device, dtype=torch.float64)
    discounts = 1.0 / torch.log2(ranks + 1.0)
    cum_hits = hits.cumsum(dim=1)
    cum_ap = (cum_hits / ranks * hits).cumsum(dim=1)
    cum_dcg = (hits * discounts).cumsum(dim=1)
    ideal_dcg = discounts.cumsum(dim=0)  # ideal_dcg[m - 1]: DCG of m hits at the top
    relevant = num_relevant.double()
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        last = min(k, kmax) - 1
        found = cum_hits[:, last]
        out[f"precision@{k}"] = (found / k).sum()
        out[f"hit_rate@{k}"] = (found > 0).double().sum()
        out[f"map@{k}"] = (cum_ap[:, last] / relevant.clamp(max=k)).sum()
        ideal = ideal_dcg[num_relevant.clamp(max=last + 1) - 1]
        out[f"ndcg@{k}"] = (cum_dcg[:, last] / ideal).sum()
    return out
