"""Item-to-item retrieval metrics: hand-computed example, brute force, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fashion_lightning.evaluation.retrieval import (
    chunked_topk,
    metric_keys,
    nearest_neighbours,
    retrieval_metrics,
    retrieval_metrics_by_relevance,
)


def _unit_vectors(degrees: list[float]) -> torch.Tensor:
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1).float()


def brute_force(embeddings: torch.Tensor, labels: torch.Tensor, ks, columns) -> dict[str, float]:
    """Per-query reference implementation, written from the definitions."""
    key = [tuple(row) for row in labels[:, list(columns)].tolist()]
    sims = embeddings.double() @ embeddings.double().T
    sums = {name: 0.0 for name in metric_keys(ks)}
    queries = 0
    for q in range(len(key)):
        if min(key[q]) < 0:
            continue
        relevant = {j for j in range(len(key)) if j != q and key[j] == key[q]}
        if not relevant:
            continue
        queries += 1
        ranking = sorted((j for j in range(len(key)) if j != q), key=lambda j: -float(sims[q, j]))
        for k in ks:
            rel = [1.0 if j in relevant else 0.0 for j in ranking[:k]]
            hits = sum(rel)
            sums[f"precision@{k}"] += hits / k
            sums[f"hit_rate@{k}"] += float(hits > 0)
            sums[f"map@{k}"] += sum(sum(rel[: r + 1]) / (r + 1) * rel[r] for r in range(len(rel))) / min(
                k, len(relevant)
            )
            dcg = sum(g / math.log2(r + 2) for r, g in enumerate(rel))
            ideal = sum(1 / math.log2(r + 2) for r in range(min(k, len(relevant))))
            sums[f"ndcg@{k}"] += dcg / ideal
    return {name: total / queries for name, total in sums.items()}


def test_hand_computed_example():
    # angles 0,10,22,37,65 deg; labels 0,1,0,1,0. Rankings (query -> others, nearest first):
    # q0 -> 1,2,3 rel [0,1,0] R=2 | q1 -> 0,2,3 rel [0,0,1] R=1 | q2 -> 1,3,0 rel [0,0,1] R=2
    # q3 -> 2,1,4 rel [0,1,0] R=1 | q4 -> 3,2,1 rel [0,1,0] R=2
    emb = _unit_vectors([0, 10, 22, 37, 65])
    labels = torch.tensor([0, 1, 0, 1, 0])
    got = {k: float(v) for k, v in retrieval_metrics(emb, labels, ks=(1, 2, 3)).items()}
    g2, g3 = 1 / math.log2(3), 0.5
    expected = {
        "precision@1": 0.0, "hit_rate@1": 0.0, "map@1": 0.0, "ndcg@1": 0.0,
        "precision@2": (0.5 + 0 + 0 + 0.5 + 0.5) / 5,
        "hit_rate@2": 3 / 5,
        "map@2": (0.5 / 2 + 0 + 0 + 0.5 / 1 + 0.5 / 2) / 5,
        "ndcg@2": (g2 / (1 + g2) + 0 + 0 + g2 + g2 / (1 + g2)) / 5,
        "precision@3": 1 / 3,
        "hit_rate@3": 1.0,
        "map@3": (0.5 / 2 + (1 / 3) / 1 + (1 / 3) / 2 + 0.5 / 1 + 0.5 / 2) / 5,
        "ndcg@3": (g2 / (1 + g2) + g3 + g3 / (1 + g2) + g2 + g2 / (1 + g2)) / 5,
    }  # fmt: skip
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("columns", [(0,), (0, 1)])
def test_matches_brute_force_on_random_data(columns):
    generator = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(120, 8, generator=generator), dim=1)
    labels = torch.randint(0, 4, (120, 2), generator=generator)
    labels[::9, 1] = -1
    labels[::13, 0] = -1
    ks = (1, 5, 10)
    got = retrieval_metrics(emb, labels, ks=ks, relevance_columns=columns)
    expected = brute_force(emb, labels, ks, columns)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, abs=1e-5), key


def test_perfect_embeddings_score_one():
    labels = torch.arange(60) % 4  # 15 items per class: more than k relevant for every query
    emb = F.one_hot(labels, 4).float()
    got = retrieval_metrics(emb, labels)
    assert all(float(v) == pytest.approx(1.0) for v in got.values())


def test_random_embeddings_score_chance():
    generator = torch.Generator().manual_seed(1)
    n, classes = 2000, 10
    labels = torch.arange(n) % classes
    emb = F.normalize(torch.randn(n, 32, generator=generator), dim=1)
    got = retrieval_metrics(emb, labels)
    chance = (n / classes - 1) / (n - 1)
    assert float(got["precision@10"]) == pytest.approx(chance, abs=0.02)
    assert float(got["precision@1"]) == pytest.approx(chance, abs=0.03)


def test_strict_relevance_is_harder_than_loose():
    labels = torch.stack([torch.arange(80) % 4, torch.arange(80) % 3], dim=1)
    emb = F.one_hot(labels[:, 0], 4).float()  # knows column 0 only
    loose = retrieval_metrics(emb, labels, relevance_columns=(0,))
    strict = retrieval_metrics(emb, labels, relevance_columns=(0, 1))
    assert float(loose["map@10"]) == pytest.approx(1.0)
    assert float(strict["map@10"]) < 0.6


def test_unknown_labels_are_never_relevant_and_never_queries():
    # item 2 (label -1) sits next to item 0: it takes the first rank but is not a match
    emb = _unit_vectors([0, -40, 2, 90])
    labels = torch.tensor([0, 0, -1, 1])
    got = retrieval_metrics(emb, labels, ks=(1, 2))
    # queries: 0 (-> 2 miss, 1 hit) and 1 (-> 0 hit); item 3 has no relevant item, item 2 is unknown
    assert float(got["precision@1"]) == pytest.approx(0.5)
    assert float(got["hit_rate@2"]) == pytest.approx(1.0)
    assert float(got["map@2"]) == pytest.approx((0.5 + 1.0) / 2)


def test_no_query_with_a_relevant_item_gives_nan():
    got = retrieval_metrics(torch.eye(3), torch.tensor([[-1], [-1], [-1]]))
    assert all(torch.isnan(v) for v in got.values())
    got = retrieval_metrics(torch.eye(3), torch.tensor([0, 1, 2]))
    assert all(torch.isnan(v) for v in got.values())


def test_chunking_does_not_change_results():
    generator = torch.Generator().manual_seed(2)
    emb = F.normalize(torch.randn(301, 16, generator=generator), dim=1)
    labels = torch.randint(0, 6, (301, 1), generator=generator)
    one = retrieval_metrics(emb, labels, chunk_size=10_000)
    many = retrieval_metrics(emb, labels, chunk_size=7)
    for key in one:
        assert float(many[key]) == pytest.approx(float(one[key]), abs=1e-6), key


def test_several_relevance_definitions_share_one_search():
    generator = torch.Generator().manual_seed(4)
    emb = F.normalize(torch.randn(150, 8, generator=generator), dim=1)
    labels = torch.randint(0, 3, (150, 3), generator=generator)
    labels[::5, 2] = -1
    relevance = {"loose": (0,), "strict": (0, 1, 2)}
    both = retrieval_metrics_by_relevance(emb, labels, relevance, ks=(1, 10), chunk_size=16)
    for name, columns in relevance.items():
        alone = retrieval_metrics(emb, labels, ks=(1, 10), relevance_columns=columns)
        assert {k: float(v) for k, v in both[name].items()} == pytest.approx({k: float(v) for k, v in alone.items()})


def test_k_larger_than_the_split():
    emb = F.one_hot(torch.tensor([0, 0, 1, 1]), 2).float()
    got = retrieval_metrics(emb, torch.tensor([0, 0, 1, 1]), ks=(10,))
    assert float(got["precision@10"]) == pytest.approx(0.1)  # one hit of ten slots
    assert float(got["map@10"]) == pytest.approx(1.0)
    assert float(got["ndcg@10"]) == pytest.approx(1.0)


def test_precision_hit_rate_ndcg_equal_torchmetrics_per_query_functions():
    """torchmetrics' retrieval functions are the reference; ours are the same numbers, vectorised."""
    from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_normalized_dcg, retrieval_precision

    generator = torch.Generator().manual_seed(5)
    emb = F.normalize(torch.randn(60, 8, generator=generator), dim=1)
    labels = torch.randint(0, 4, (60,), generator=generator)
    ks = (1, 3, 10)
    got = retrieval_metrics(emb, labels, ks=ks)
    sims = emb @ emb.T
    for k in ks:
        expected = {"precision": [], "hit_rate": [], "ndcg": []}
        for q in range(60):
            others = torch.arange(60) != q
            preds, target = sims[q, others], labels[others] == labels[q]
            expected["precision"].append(float(retrieval_precision(preds, target, top_k=k)))
            expected["hit_rate"].append(float(retrieval_hit_rate(preds, target, top_k=k)))
            expected["ndcg"].append(float(retrieval_normalized_dcg(preds, target, top_k=k)))
        for name, values in expected.items():
            assert float(got[f"{name}@{k}"]) == pytest.approx(sum(values) / len(values), abs=1e-6), f"{name}@{k}"


def test_chunked_topk_is_chunk_size_independent_and_excludes():
    generator = torch.Generator().manual_seed(1)
    docs = torch.randn(50, 6, generator=generator)
    queries = torch.randn(17, 6, generator=generator)
    whole = chunked_topk(queries, docs, 5, chunk_size=1000)
    assert torch.equal(whole, chunked_topk(queries, docs, 5, chunk_size=4))
    assert torch.equal(whole, (queries @ docs.T).topk(5, dim=1).indices)
    rows = torch.tensor([3, 7, 9])
    assert not (nearest_neighbours(docs, rows, 4, chunk_size=2) == rows.unsqueeze(1)).any()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(3), torch.zeros(3, dtype=torch.long), ks=(0,))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.eye(3), torch.zeros(4, dtype=torch.long))
