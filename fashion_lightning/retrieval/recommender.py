"""Recommendations from an index folder: by photo(s), text, catalog item, or a user's history.

Every query becomes one unit vector (photos and texts through :class:`~.encoder.QueryEncoder`) and its
filters a row mask; :meth:`LoadedIndex.top_k` returns the exact filtered top-k with one row per image
(byte-identical product photos count once, excluded rows' copies left out), and each result gets an
:class:`Explanation`.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fashion_lightning.data.schema import FILTER_FIELDS
from fashion_lightning.retrieval import explain
from fashion_lightning.retrieval.encoder import Encoder, QueryEncoder
from fashion_lightning.retrieval.queries import ImageLike, QueryError, UnknownItemError, check_k, decode_query_image
from fashion_lightning.retrieval.results import Recommendation, RecommendationResult, plain_value
from fashion_lightning.retrieval.search import LoadedIndex, RowFilter, load_index


class Recommender:
    """Answers queries against one :class:`LoadedIndex`.

    ``encoder`` embeds photos and text; when absent it is loaded on first need from the checkpoint the
    manifest names (item and history queries never need it), or by ``encoder_loader``.
    """

    def __init__(
        self,
        index: LoadedIndex,
        encoder: Encoder | None = None,
        encoder_loader: Callable[[], Encoder] | None = None,
    ) -> None:
        self.index = index
        self.query_encoder = QueryEncoder(index, encoder, encoder_loader)
        self._values: dict[str, dict[str, str]] = {}
        self._records: list[dict[str, Any]] | None = None

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        encoder: Encoder | None = None,
        encoder_loader: Callable[[], Encoder] | None = None,
        verify: bool = True,
        allow_external_model: bool = False,
        allow_qdrant_local: bool = False,
    ) -> Recommender:
        index = load_index(
            path, verify=verify, allow_external_model=allow_external_model, allow_qdrant_local=allow_qdrant_local
        )
        return cls(index, encoder, encoder_loader)

    def __enter__(self) -> Recommender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.index.close()  # a Qdrant client (local mode locks its folder while open)

    @property
    def loaded_encoder(self) -> Encoder | None:
        """The encoder if one was given or has been loaded, else None (reading this never loads one)."""
        return self.query_encoder.loaded

    def with_index(self, index: LoadedIndex) -> Recommender:
        """A Recommender over ``index`` sharing this one's encoder (or its loader, when not loaded yet)."""
        return Recommender(index, self.query_encoder.loaded, self.query_encoder.loader)

    @property
    def encoder(self) -> Encoder:
        """The encoder of photo and text queries, loaded now if not yet."""
        return self.query_encoder.model

    def records(self, rows: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """JSON-ready metadata of index rows (built once: pandas row access costs ~1 ms a query)."""
        if self._records is None:
            self._records = [
                {key: plain_value(value) for key, value in row.items()}
                for row in self.index.items.to_dict(orient="records")
            ]
        return [self._records[int(r)] for r in rows]

    # -- queries ---------------------------------------------------------------------------------

    def recommend(
        self,
        *,
        image: ImageLike | Sequence[ImageLike] | None = None,
        text: str | None = None,
        item_id: int | None = None,
        history: Sequence[int] | None = None,
        disliked: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        half_life: float | None = None,
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
    ) -> RecommendationResult:
        """Dispatch on whichever one of image / text / item_id / history is given (CLI-friendly)."""
        asked = {"image": image, "text": text, "item_id": item_id, "history": history}
        given = [name for name, value in asked.items() if _is_given(value)]
        if len(given) != 1:
            raise QueryError(f"give exactly one of image, text, item_id, history (got {given or 'none'})")
        if disliked and given[0] != "history":
            raise QueryError("disliked ids only go with a history query")
        kind = given[0]  # the "is not None" below are implied by _is_given; they narrow the types
        if kind == "image" and image is not None:
            return self.by_images(image, k, filters)
        if kind == "text" and text is not None:
            return self.by_text(text, k, filters)
        if kind == "item_id" and item_id is not None:
            return self.by_item(item_id, k, filters)
        assert history is not None
        return self.by_history(history, k, filters, disliked=disliked or (), weights=weights, half_life=half_life)

    def by_images(
        self,
        images: ImageLike | Sequence[ImageLike],
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
        decode: Callable[[bytes], np.ndarray] | None = None,
    ) -> RecommendationResult:
        """Products like the photo(s); several photos are averaged into one query (``decode``: bytes ->
        native array, default the catalog's decoder)."""
        start = time.perf_counter()
        if isinstance(images, (str, Path, bytes, np.ndarray, Image.Image)):
            images = [images]
        if len(images) == 0:
            raise QueryError("no query image given")
        natives, digests, labels = zip(*(decode_query_image(image, i, decode) for i, image in enumerate(images)))
        vectors, predictions = self.query_encoder.photos(np.stack(natives))
        query = _unit(vectors.mean(axis=0), "the query photos' embeddings cancel out")
        attributes = explain.attributes_of_predictions(predictions)
        sha1s = {d for d in digests if d}
        exclude: Sequence[int] | np.ndarray = []
        if sha1s and "image_sha1" in self.index.items.columns:
            exclude = np.flatnonzero(self.index.items["image_sha1"].isin(sha1s).to_numpy())
        encode_ms = _ms(start)
        return self._run(
            query,
            k,
            filters,
            exclude,
            {"kind": "image", "images": list(labels), "predicted": {t: list(v) for t, v in predictions.items()}},
            lambda item: explain.explain_attributes(attributes, item, "predicted"),
            {"encode_ms": encode_ms},
            start,
        )

    def by_text(self, text: str, k: int = 10, filters: Mapping[str, Any] | None = None) -> RecommendationResult:
        """Products matching a description (needs a model with a text tower, i.e. a CLIP index)."""
        start = time.perf_counter()
        if not isinstance(text, str) or not text.strip():
            raise QueryError("the text query is empty")
        query = _unit(self.query_encoder.text(text), "the text embedding is zero")
        return self._run(
            query,
            k,
            filters,
            [],
            {"kind": "text", "text": text},
            lambda item: explain.explain_text(text, item),
            {"encode_ms": _ms(start)},
            start,
        )

    def by_item(self, item_id: int, k: int = 10, filters: Mapping[str, Any] | None = None) -> RecommendationResult:
        """More like this catalog item (the item and byte-identical copies of its photo are excluded)."""
        start = time.perf_counter()
        rows = self._rows([item_id], "item_id")
        attributes = explain.attributes_of_rows(self.records(rows))
        query = _unit(self.index.vectors(rows)[0], f"item {item_id} has a zero vector")
        return self._run(
            query,
            k,
            filters,
            rows,
            {"kind": "item", "item_id": int(item_id)},
            lambda item: explain.explain_attributes(attributes, item, "metadata"),
            {},
            start,
        )

    def by_history(
        self,
        liked: Sequence[int],
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
        *,
        disliked: Sequence[int] = (),
        weights: Sequence[float] | None = None,
        half_life: float | None = None,
        beta: float = 0.5,
    ) -> RecommendationResult:
        """Personalised: profile = normalise(weighted mean(liked) - beta * mean(disliked)).

        ``liked`` runs oldest to most recent; ``half_life`` (in interactions) weights the i-th most recent
        like by 0.5 ** (i / half_life); explicit ``weights`` override it. Liked and disliked items (and
        duplicates of their photos) never come back as results.
        """
        start = time.perf_counter()
        liked, disliked = [int(i) for i in liked], [int(i) for i in disliked]
        if not liked:
            raise QueryError("a history query needs at least one liked item id")
        both = sorted(set(liked) & set(disliked))
        if both:
            raise QueryError(f"ids both liked and disliked: {both}")
        w = _history_weights(len(liked), weights, half_life)
        liked_rows = self._rows(liked, "history")
        profile = (w[:, None] * self.index.vectors(liked_rows)).sum(axis=0) / w.sum()
        disliked_rows = self._rows(disliked, "disliked") if disliked else np.empty(0, np.int64)
        if len(disliked_rows):
            profile = profile - beta * self.index.vectors(disliked_rows).mean(axis=0)
        query = _unit(profile, "the liked and disliked items cancel out; like more items or lower beta")
        attributes = explain.attributes_of_rows(self.records(liked_rows), w)
        description = {
            "kind": "history",
            "liked": liked,
            "disliked": disliked,
            "weights": [round(float(x), 6) for x in w / w.sum()],
            "beta": beta,
        }
        return self._run(
            query,
            k,
            filters,
            np.concatenate([liked_rows, disliked_rows]),
            description,
            lambda item: explain.explain_attributes(attributes, item, "history"),
            {},
            start,
        )

    # -- shared machinery ------------------------------------------------------------------------

    def allowed_rows(
        self, filters: Mapping[str, Any] | None, exclude_rows: Sequence[int] | np.ndarray = ()
    ) -> tuple[np.ndarray | None, dict[str, list[str]]]:
        """Row mask for ``filters`` minus ``exclude_rows`` and every copy of their photos (None = all rows),
        and the filters as the index spells them."""
        mask, clean = self._filter_mask(filters)
        excluded = self.index.photo_copies(exclude_rows)
        allowed = ~excluded if mask is None else mask & ~excluded
        return (None if allowed.all() else allowed), clean

    def _filter_mask(self, filters: Mapping[str, Any] | None) -> tuple[np.ndarray | None, dict[str, list[str]]]:
        """Rows matching ``filters`` (None when none is given) and the filters as the index spells them."""
        items = self.index.items
        mask = np.ones(self.index.n, dtype=bool)
        clean: dict[str, list[str]] = {}
        for name, value in (filters or {}).items():
            if value is None or value == "" or (isinstance(value, (list, tuple)) and len(value) == 0):
                continue
            if name not in FILTER_FIELDS:
                close = difflib.get_close_matches(name, FILTER_FIELDS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise QueryError(f"unknown filter {name!r}{hint}; filters are {', '.join(FILTER_FIELDS)}")
            if name not in items.columns:
                raise QueryError(f"this index has no {name!r} column to filter on")
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
                raise QueryError(
                    f"filters.{name}={value!r}: filter values are names (a string or a list of strings), "
                    f"e.g. filters.{name}={self._example(name)!r}"
                )
            wanted = [self._canonical(name, v) for v in values]
            clean[name] = wanted
            mask &= items[name].isin(wanted).to_numpy()
        if clean and not mask.any():
            raise QueryError(f"no item in the index matches all filters {clean}")
        return (mask if clean else None), clean

    def _example(self, name: str) -> str:
        values = self.index.items[name].astype(str)
        return str(values.mode().iloc[0]) if len(values) else "..."

    def _canonical(self, name: str, value: Any) -> str:
        if name not in self._values:
            self._values[name] = {v.lower(): v for v in self.index.items[name].astype(str).unique() if v}
        known = self._values[name]
        canonical = known.get(str(value).lower())
        if canonical is None:
            close = difflib.get_close_matches(str(value), list(known.values()), n=5, cutoff=0.5)
            examples = sorted(known.values())[:8]
            hint = f"close matches: {close}" if close else f"{len(known)} values, e.g. {examples}"
            raise QueryError(f"filters.{name}={value!r} matches no item in this index ({hint})")
        return canonical

    def _run(
        self,
        query: np.ndarray,
        k: int,
        filters: Mapping[str, Any] | None,
        exclude_rows: Sequence[int] | np.ndarray,
        description: dict[str, Any],
        explainer: Callable[[Mapping[str, Any]], explain.Explanation],
        timings: dict[str, float],
        start: float,
    ) -> RecommendationResult:
        k = check_k(k)
        mask, clean = self._filter_mask(filters)
        t = time.perf_counter()
        scores, rows = self.index.top_k(query, k, RowFilter(mask, clean, exclude_rows))
        timings["search_ms"] = _ms(t)
        t = time.perf_counter()
        parts = self._score_parts(query, rows)
        results = []
        for rank, (metadata, score, part) in enumerate(zip(self.records(rows), scores, parts), start=1):
            metadata = dict(metadata)
            explanation = explainer(metadata)
            explanation.parts = part
            results.append(Recommendation(rank, int(metadata["id"]), float(score), metadata, explanation))
        timings["explain_ms"] = _ms(t)
        timings["total_ms"] = _ms(start)
        description.update(k=int(k), filters=clean, index=str(self.index.path))
        answered: dict[str, Any] = {key: round(v, 3) for key, v in timings.items()}
        answered["index_version"] = self.index.version  # which index answered (fashion-serve reloads)
        return RecommendationResult(description, results, answered)

    def _score_parts(self, query: np.ndarray, rows: np.ndarray) -> list[dict[str, float] | None]:
        parts = self.index.parts
        image, text = (parts.get(key) for key in explain.PART_KEYS.values())
        if image is None or text is None or image.shape[1] != self.index.dim or text.shape[1] != self.index.dim:
            return [None] * len(rows)
        return explain.score_parts(query, self.index.vectors(rows), image[rows], text[rows])

    def _rows(self, ids: Sequence[int], what: str) -> np.ndarray:
        try:
            id_array = np.asarray([int(i) for i in ids], dtype=np.int64)
        except (TypeError, ValueError) as err:
            raise QueryError(f"{what}: item ids must be integers ({err})") from err
        rows = self.index.rows_of(id_array)
        if (rows < 0).any():
            unknown = id_array[rows < 0].tolist()
            raise UnknownItemError(
                f"{what}: unknown item id(s) {unknown[:10]}; the index holds {self.index.n} items "
                f"(ids {int(self.index.ids.min())}..{int(self.index.ids.max())})"
            )
        return rows


def _is_given(value: Any) -> bool:
    if value is None or isinstance(value, (str, bytes)) and not value:
        return False
    return not (isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 0)


def _history_weights(n: int, weights: Sequence[float] | None, half_life: float | None) -> np.ndarray:
    if weights is not None:
        w = np.asarray(list(weights), dtype=np.float64)
        if w.shape != (n,) or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise QueryError(
                f"history weights must be {n} non-negative numbers with a positive sum, got {list(weights)}"
            )
        return w
    if half_life is not None:
        if half_life <= 0:
            raise QueryError(f"half_life must be > 0, got {half_life}")
        age = np.arange(n - 1, -1, -1, dtype=np.float64)  # most recent last -> age 0
        return 0.5 ** (age / half_life)
    return np.ones(n)


def _unit(vector: np.ndarray, problem: str) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-6:
        raise QueryError(problem)
    return vector / norm


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
