"""What a recommendation answer is: ranked results with metadata and explanations, as JSON.

The same object is printed by fashion-recommend, saved as ``recommendations.json`` and returned by
fashion-serve's ``/recommend`` endpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fashion_lightning.retrieval import explain
from fashion_lightning.utils.atomic import atomic_write_text


@dataclass
class Recommendation:
    rank: int
    id: int
    score: float
    metadata: dict[str, Any]
    explanation: explain.Explanation

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in ("rank", "id", "score", "metadata")},
            "explanation": self.explanation.to_dict(),
        }


@dataclass
class RecommendationResult:
    query: dict[str, Any]  # {"kind": "image" | "text" | "item" | "history", what was asked, "k", "filters"}
    results: list[Recommendation]
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "results": [r.to_dict() for r in self.results], "timings": self.timings}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json() + "\n")


def plain_value(value: Any) -> Any:
    """numpy / pandas scalars -> JSON-friendly Python values (NaN -> None)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
