"""Retrieval: FAISS index folders, recommendations with explanations, galleries.

Typical use::

    build_index(embeddings, catalog_frame, out_dir, model_info)      # or IndexWriter for streaming
    rec = Recommender.from_dir(out_dir)                               # verifies the folder
    result = rec.recommend(item_id=15970, k=5, filters={"gender": "Men"})
    render_gallery(result, "gallery.png", image_loader)
"""

from fashion_lightning.data.schema import FILTER_FIELDS
from fashion_lightning.retrieval.encoder import Encoder, QueryEncoder
from fashion_lightning.retrieval.explain import Explanation
from fashion_lightning.retrieval.manifest import (
    IndexIntegrityError,
    IndexManifest,
    IndexMemoryError,
    IndexParams,
    ModelLoadError,
    RetrievalError,
)
from fashion_lightning.retrieval.queries import PhotoTooLargeError, QueryError, UnknownItemError
from fashion_lightning.retrieval.recommender import Recommender
from fashion_lightning.retrieval.results import Recommendation, RecommendationResult
from fashion_lightning.retrieval.search import LoadedIndex, RowFilter, configure_threads, load_index
from fashion_lightning.retrieval.writer import IndexWriter, build_index

__all__ = [
    "FILTER_FIELDS",
    "Encoder",
    "Explanation",
    "IndexIntegrityError",
    "IndexManifest",
    "IndexMemoryError",
    "IndexParams",
    "IndexWriter",
    "LoadedIndex",
    "ModelLoadError",
    "PhotoTooLargeError",
    "QueryEncoder",
    "QueryError",
    "Recommendation",
    "RecommendationResult",
    "Recommender",
    "RetrievalError",
    "RowFilter",
    "UnknownItemError",
    "build_index",
    "configure_threads",
    "load_index",
]
