"""Background robustness: do photo queries still find their product when it is not on studio white?

Protocol (deterministic: every random choice comes from ``(seed, item id)``):

* queries are held-out photos of the evaluated split, "re-shot" (a mild shift / zoom / brightness
  change, so a query is never the gallery's own pixels), once on the plain background (**plain**)
  and once cut out and pasted on a busy background (**busy**: other products of the split, blurred
  or tinted; :data:`~fashion_lightning.data.backgrounds.BUSY_KINDS`);
* the gallery is the split's item embeddings (what the index serves: fused image+text for CLIP);
* metrics per query set: ``top1`` / ``top5`` = the exact item ranks first / in the first five,
  ``same_type_p@5`` = share of the first five results with the query's articleType (the exact item
  counts when it is there, as it does for a shopper), and ``drop/...`` = plain minus busy.

The evaluation callback runs it on ``background_queries`` items (``<stage>/background/...`` in
metrics.json); ``scripts/bench_backgrounds.py`` runs it on a saved model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fashion_lightning.data.backgrounds import BUSY_KINDS, composite, make_background, product_mask
from fashion_lightning.data.images import PAD_VALUE
from fashion_lightning.evaluation.retrieval import chunked_topk

EMBED_BATCH = 256


def reshoot(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild re-shoot of a catalog photo: +-3 px shift, 0.93-1.05 zoom, +-8% brightness, white fill."""
    h, w = img.shape[:2]
    zoom = rng.uniform(0.93, 1.05)
    tx, ty = rng.uniform(-3, 3, size=2)
    m = np.array([[zoom, 0, (1 - zoom) * (w - 1) / 2 + tx], [0, zoom, (1 - zoom) * (h - 1) / 2 + ty]])
    out = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(PAD_VALUE,) * 3)  # fmt: skip
    gain = rng.uniform(0.92, 1.08)
    mask = product_mask(out)  # brighten / darken the product only: the studio white stays white
    lit = np.where(mask[..., None], (out.astype(np.float32) * gain).clip(0, 255), out)
    return lit.astype(np.uint8)


def robustness_queries(
    images: Sequence[np.ndarray], ids: Sequence[int], bank: Sequence[np.ndarray], bank_ids: Sequence[int], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(plain, busy)`` ``[Q, H, W, 3]`` query photos for the items ``ids`` (see module doc).

    ``bank`` / ``bank_ids``: the photos that busy backgrounds are made of; a query's own photo is
    never in its background.
    """
    if len(images) != len(ids) or len(bank) != len(bank_ids):
        raise ValueError("images / ids and bank / bank_ids must have equal lengths")
    bank_ids_arr = np.asarray(bank_ids)
    plain, busy = [], []
    for img, item in zip(images, ids):
        rng = np.random.default_rng([int(seed), int(item) & 0x7FFFFFFF])
        shot = reshoot(np.asarray(img, dtype=np.uint8), rng)
        kind = BUSY_KINDS[int(rng.integers(len(BUSY_KINDS)))]
        others = np.nonzero(bank_ids_arr != item)[0]
        picks = rng.choice(others, size=min(6, len(others)), replace=False) if len(others) else np.empty(0, int)
        background = make_background(kind, shot.shape[:2], rng, [np.asarray(bank[int(i)]) for i in picks])
        plain.append(shot)
        busy.append(composite(shot, background))
    return np.stack(plain), np.stack(busy)


def robustness_metrics(
    query_embedding: torch.Tensor,
    gallery_embedding: torch.Tensor,
    target_rows: torch.Tensor,
    gallery_types: torch.Tensor,
    query_types: torch.Tensor,
) -> dict[str, float]:
    """``top1``, ``top5`` (exact item = gallery row ``target_rows[i]``) and ``same_type_p@5`` (cosine ranking).

    ``same_type_p@5`` averages over queries with a known type (>= 0); gallery rows of unknown type
    never count as the same type.
    """
    if query_embedding.shape[0] != target_rows.shape[0] or gallery_embedding.shape[0] != gallery_types.shape[0]:
        raise ValueError("one target row per query and one type per gallery row are needed")
    k = min(5, gallery_embedding.shape[0])
    queries = F.normalize(query_embedding.float(), dim=1)
    gallery = F.normalize(gallery_embedding.float(), dim=1).to(queries.device)
    top = chunked_topk(queries, gallery, k)
    target = target_rows.to(top.device).view(-1, 1)
    exact = top == target
    same = (gallery_types.to(top.device)[top] == query_types.to(top.device).view(-1, 1)) & (
        query_types.to(top.device).view(-1, 1) >= 0
    )
    known = query_types.to(top.device) >= 0
    return {
        "top1": float(exact[:, 0].float().mean()),
        "top5": float(exact.any(dim=1).float().mean()),
        "same_type_p@5": float(same[known].float().sum(dim=1).div(k).mean()) if bool(known.any()) else float("nan"),
    }


def embed_in_batches(embed_images: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray) -> torch.Tensor:
    """``[Q, H, W, 3]`` uint8 -> ``[Q, D]`` via the model's photo-query encoder, in batches."""
    parts = []
    for start in range(0, len(images), EMBED_BATCH):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + EMBED_BATCH].transpose(0, 3, 1, 2)))
        parts.append(embed_images(chunk).float().cpu())
    return torch.cat(parts)


def background_robustness(
    embed_images: Callable[[torch.Tensor], torch.Tensor],
    gallery_embedding: torch.Tensor,
    gallery_ids: Sequence[int],
    gallery_types: torch.Tensor,
    image_of: Callable[[int], np.ndarray],
    num_queries: int,
    seed: int = 0,
) -> dict[str, float]:
    """Plain vs busy photo queries of a seeded sample of ``num_queries`` gallery items (module doc).

    ``image_of(item_id)`` returns an item's native photo; the busy backgrounds use the photos of a
    seeded sample of other gallery items. Keys: ``plain/<metric>``, ``busy/<metric>``, ``drop/<metric>``.
    """
    ids = [int(i) for i in gallery_ids]
    if len(ids) < 2 or num_queries < 1:
        return {}
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ids), size=min(num_queries, len(ids)), replace=False))
    bank_rows = np.sort(rng.choice(len(ids), size=min(256, len(ids)), replace=False))
    query_ids = [ids[r] for r in rows]
    bank_ids = [ids[r] for r in bank_rows]
    plain, busy = robustness_queries(
        [image_of(i) for i in query_ids], query_ids, [image_of(i) for i in bank_ids], bank_ids, seed
    )
    target = torch.as_tensor(rows, dtype=torch.long)
    types = gallery_types.long().cpu()
    out: dict[str, float] = {}
    for name, images in (("plain", plain), ("busy", busy)):
        values = robustness_metrics(
            embed_in_batches(embed_images, images), gallery_embedding, target, types, types[target]
        )
        out |= {f"{name}/{key}": value for key, value in values.items()}
    for key in ("top1", "top5", "same_type_p@5"):
        out[f"drop/{key}"] = out[f"plain/{key}"] - out[f"busy/{key}"]
    return out
