"""Which catalog items are the same product for a contrastive loss: same title or identical photo.

The Kaggle catalog lists many products under one name ("Nike Men Black Shoes" in several cuts) and
some under byte-identical photos. In an in-batch contrastive loss such pairs are *false negatives*:
the loss would push apart two items whose text/photo cannot tell them apart. :func:`positive_groups`
gives every item a group id (union of both relations), which the CLIP module turns into a
multi-positive target (:func:`fashion_lightning.models.losses.positive_mask`).

Photos are compared as decoded native pixels (the image cache rows): byte-identical files decode to
identical pixels, so this finds every byte-identical pair (and the rare re-encoded exact copy too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np


def normalise_title(title: object) -> str:
    """Case- and whitespace-insensitive product name (empty for missing names)."""
    text = "" if title is None or (isinstance(title, float) and np.isnan(title)) else str(title)
    return " ".join(text.casefold().split())


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def union_groups(keys: Iterable[Sequence[object]], n: int) -> np.ndarray:
    """Connected components of "shares any key": ``keys`` yields, per relation, one key per item
    (``None`` = no key for that item). Returns dense group ids ``0..G-1`` per item."""
    parent = list(range(n))
    for relation in keys:
        first: dict[object, int] = {}
        for i, key in enumerate(relation):
            if key is None:
                continue
            j = first.setdefault(key, i)
            if j != i:
                a, b = _find(parent, i), _find(parent, j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots = np.array([_find(parent, i) for i in range(n)], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def image_digests(images: np.ndarray, rows: Sequence[int]) -> list[str]:
    """sha1 of each selected cache row's pixels (``images`` is the ``[N, H, W, 3]`` cache memmap)."""
    return [hashlib.sha1(np.ascontiguousarray(images[int(r)]).tobytes()).hexdigest() for r in rows]


def positive_groups(titles: Sequence[object], digests: Sequence[str] | None = None) -> np.ndarray:
    """Group ids: items with the same (normalised, non-empty) title or the same photo digest share one."""
    n = len(titles)
    title_keys = [normalise_title(t) or None for t in titles]
    relations: list[Sequence[object]] = [title_keys]
    if digests is not None:
        if len(digests) != n:
            raise ValueError(f"{len(digests)} photo digests for {n} titles")
        relations.append(list(digests))
    return union_groups(relations, n)
