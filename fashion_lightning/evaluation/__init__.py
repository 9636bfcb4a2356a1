"""Shared evaluation: retrieval metrics, KAGL benchmark and figures (the Lightning callback that uses them is
:mod:`fashion_lightning.callbacks.evaluation`)."""

from fashion_lightning.evaluation.plots import confusion_matrix_figure, pca_scatter_figure, save_figure
from fashion_lightning.evaluation.retrieval import (
    chunked_topk,
    metric_keys,
    nearest_neighbours,
    retrieval_metrics,
    retrieval_metrics_by_relevance,
)

__all__ = [
    "chunked_topk",
    "confusion_matrix_figure",
    "metric_keys",
    "nearest_neighbours",
    "pca_scatter_figure",
    "retrieval_metrics",
    "retrieval_metrics_by_relevance",
    "save_figure",
]
