"""Per-task class weights for the loss, from train-split label counts."""

from __future__ import annotations

import numpy as np
import torch


def balanced_class_weights(
    labels: np.ndarray, num_classes: int, power: float = 0.5, clip: tuple[float, float] = (0.1, 10.0)
) -> torch.Tensor:
    """``(N / (C * n_c)) ** power``, clipped, rescaled so the average weight per *sample* is 1.

    ``power=1`` is sklearn's "balanced"; ``power=0`` disables weighting; values between
    smooth it, which keeps 141-class articleType from being dominated by a few rare classes.
    Classes absent from ``labels`` get weight 0 (they cannot be learned from this split);
    ``-1`` labels (unknown) are ignored.
    """
    labels = labels[labels >= 0]
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    if not present.any():
        return torch.ones(num_classes)
    weights[present] = (len(labels) / (present.sum() * counts[present])) ** power
    weights[present] = np.clip(weights[present], *clip)
    weights *= len(labels) / float((weights * counts).sum())
    return torch.tensor(weights, dtype=torch.float32)
