"""Why a result was recommended: the attributes it shares with the query, and for fused embeddings
the image and text parts of its score.

Score parts. A fused item vector is some mix of its image and text embeddings, e.g. the CLIP module's
``e = normalise(alpha * u + (1 - alpha) * v)`` (u: image, v: text embedding). Rather than assume the mix,
we recover it per item: the coefficients ``(a, b)`` minimising ``|e - a u - b v|`` (a 2x2 least-squares
problem; for the example above ``a = alpha / |alpha u + (1 - alpha) v|`` and ``b`` likewise with
``1 - alpha``). Then, by linearity of the inner product,

    score = <q, e> = a <q, u> + b <q, v>          (exactly, when the fit residual is ~0)

so ``image = a <q, u>`` and ``text = b <q, v>`` sum to the score whatever the query is (photo, text,
item or profile vector) and whatever normalisation the fusion used. If the stored vector is not a linear
mix of its parts (residual above ``FIT_TOLERANCE``), no parts are reported rather than wrong ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from fashion_lightning.data.schema import EXPLAIN_FIELDS

PART_KEYS = {"image": "image_embedding", "text": "text_embedding"}
FIT_TOLERANCE = 1e-3

# value distribution of the query per attribute: {field: {value: share of the query carrying it}}
QueryAttributes = dict[str, dict[str, float]]


@dataclass
class Explanation:
    basis: str  # "metadata" (catalog item) | "history" | "predicted" (photo, model heads) | "text"
    shared: dict[str, str] = field(default_factory=dict)  # attribute -> value shared with the query
    support: dict[str, float] = field(default_factory=dict)  # share of the query with that value
    matched_tokens: list[str] = field(default_factory=list)  # text queries: query words found in attributes
    parts: dict[str, float] | None = None  # {"image": ..., "text": ...}, summing to the score

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attributes_of_rows(
    rows: pd.DataFrame | Sequence[Mapping[str, Any]], weights: Sequence[float] | np.ndarray | None = None
) -> QueryAttributes:
    """Weighted value shares of catalog rows (one item, or a user's liked items): a frame or records."""
    records = rows.to_dict(orient="records") if isinstance(rows, pd.DataFrame) else rows
    w = np.ones(len(records)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out: QueryAttributes = {}
    for name in EXPLAIN_FIELDS:
        shares: dict[str, float] = {}
        for record, weight in zip(records, w):
            value = record.get(name)
            value = "" if value is None else str(value)
            if value and value != "nan":
                shares[value] = shares.get(value, 0.0) + float(weight)
        if shares:
            out[name] = shares
    return out


def attributes_of_predictions(predictions: Mapping[str, Sequence[str]]) -> QueryAttributes:
    """Value shares of the model's predicted attributes over the query photos."""
    out: QueryAttributes = {}
    for name, values in predictions.items():
        values = [str(v) for v in values]
        if values:
            out[name] = {v: values.count(v) / len(values) for v in dict.fromkeys(values)}
    return out


def explain_attributes(query: QueryAttributes, item: Mapping[str, Any], basis: str) -> Explanation:
    explanation = Explanation(basis=basis)
    for name, shares in query.items():
        value = str(item.get(name, ""))
        if value in shares:
            explanation.shared[name] = value
            explanation.support[name] = round(shares[value], 4)
    return explanation


def tokenize(text: str) -> list[str]:
    """Lower-case words, hyphens joined ("T-Shirts" -> "tshirts") and a plural "s" dropped."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"[-']", "", text.lower()))
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words]


def explain_text(query_text: str, item: Mapping[str, Any]) -> Explanation:
    """Attributes whose every word occurs in the query ("navy blue shirt" shares baseColour "Navy Blue")."""
    query_tokens = set(tokenize(query_text))
    explanation = Explanation(basis="text")
    matched: set[str] = set()
    for name in EXPLAIN_FIELDS:
        value = str(item.get(name, ""))
        tokens = set(tokenize(value))
        if tokens and tokens <= query_tokens:
            explanation.shared[name] = value
            explanation.support[name] = 1.0
            matched |= tokens
    explanation.matched_tokens = sorted(matched)
    return explanation


def score_parts(
    query: np.ndarray, fused: np.ndarray, image: np.ndarray, text: np.ndarray
) -> list[dict[str, float] | None]:
    """Image and text parts of ``<query, fused_i>`` for each row (see the module docstring)."""
    fused, image, text = (np.asarray(a, dtype=np.float64) for a in (fused, image, text))
    query = np.asarray(query, dtype=np.float64)
    basis = np.stack([image, text], axis=2)  # [n, D, 2]
    out: list[dict[str, float] | None] = []
    for e, a in zip(fused, basis):
        coef, *_ = np.linalg.lstsq(a, e, rcond=None)
        if np.linalg.norm(e - a @ coef) > FIT_TOLERANCE * max(float(np.linalg.norm(e)), 1e-12):
            out.append(None)
            continue
        image_part, text_part = coef * (query @ a)
        out.append({"image": float(image_part), "text": float(text_part)})
    return out


def shared_summary(explanation: Explanation, fields: Iterable[str] = EXPLAIN_FIELDS) -> str:
    """Short one-line text for tables and galleries (each value once: "Watches" is also a subCategory)."""
    values = dict.fromkeys(explanation.shared[f] for f in fields if f in explanation.shared)
    return ", ".join(values)
