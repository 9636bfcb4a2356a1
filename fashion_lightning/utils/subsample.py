"""The one seeded subsample: which rows a capped computation (retrieval, PCA plot) uses."""

from __future__ import annotations

import torch


def seeded_subsample(n: int, max_items: int, seed: int) -> torch.Tensor | None:
    """Sorted indices of ``max_items`` of ``n`` rows drawn with ``seed``; ``None`` when all ``n`` fit.

    Same ``(n, max_items, seed)``, same rows, on any machine (torch's CPU generator).
    """
    if n <= max_items:
        return None
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)[:max_items].sort().values
