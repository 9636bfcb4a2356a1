"""Showing a :class:`RecommendationResult`: a PNG gallery and a rich terminal table.

The gallery takes an ``image_loader(id) -> uint8 HxWx3`` instead of reading images itself, so it works
with any catalog source (folder, zip, cache) the caller already has open.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

from fashion_lightning.data.images import NATIVE_HW
from fashion_lightning.retrieval.explain import shared_summary
from fashion_lightning.retrieval.queries import ImageLike, QueryError, decode_query_image
from fashion_lightning.retrieval.results import RecommendationResult
from fashion_lightning.utils.terminal import clean_text, figure_text, rich_text

ImageLoader = Callable[[int], np.ndarray]
PANEL_INCHES = (1.9, 3.0)  # width, height of one query/result panel
MAX_QUERY_THUMBS = 4


def render_gallery(
    result: RecommendationResult,
    out_path: str | Path,
    image_loader: ImageLoader,
    query_images: Sequence[ImageLike] | None = None,
    query_text: str | None = None,
    columns: int = 6,
    dpi: int = 100,
) -> Path:
    """Write a PNG: the query panel, then each result with rank, score, id and (wrapped) name.

    The query panel shows ``query_images`` or ``query_text`` when given, otherwise what the result
    describes (its text, the query item's photo, or the most recent liked items' photos).
    Size is deterministic: ``columns x rows`` panels of ``PANEL_INCHES`` at ``dpi``.
    """
    from fashion_lightning.utils.figures import new_figure, save_figure  # only galleries pay matplotlib's import

    panels = 1 + len(result.results)
    cols = max(1, min(columns, panels))
    rows = math.ceil(panels / cols)
    fig = new_figure(cols * PANEL_INCHES[0], rows * PANEL_INCHES[1], dpi=dpi)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]
    for ax in axes:
        ax.set_axis_off()
    _draw_query(axes[0], result, image_loader, query_images, query_text)
    for ax, rec in zip(axes[1:], result.results):
        ax.imshow(_safe_load(image_loader, rec.id))
        ax.set_title(f"#{rec.rank}  {rec.score:.3f}", fontsize=8)
        name = clean_text(rec.metadata.get("productDisplayName") or "", 80)  # catalog text: data, not markup
        shared = clean_text(shared_summary(rec.explanation), 80)
        caption = [f"id {rec.id}", *textwrap.wrap(name, 26)[:2]]
        if shared:
            caption += textwrap.wrap(f"shares: {shared}", 30)[:2]
        text = "\n".join(figure_text(line) for line in caption)
        ax.text(0.5, -0.03, text, transform=ax.transAxes, ha="center", va="top", fontsize=6)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.93, bottom=0.12, wspace=0.15, hspace=0.55)
    return save_figure(fig, out_path, dpi, facecolor="white")


def _draw_query(ax, result, image_loader, query_images, query_text) -> None:
    query = result.query
    text = query_text if query_text is not None else query.get("text") if query.get("kind") == "text" else None
    if text is not None and not query_images:
        lines = textwrap.wrap(f"\u201c{clean_text(text, 120)}\u201d", 20)
        ax.text(
            0.5,
            0.5,
            "\n".join(figure_text(line) for line in lines),
            ha="center",
            va="center",
            fontsize=9,
            style="italic",
            transform=ax.transAxes,
            wrap=True,
        )
        ax.set_title("query (text)", fontsize=8, fontweight="bold")
        return
    if query_images:
        thumbs = [_as_native(img) for img in list(query_images)[:MAX_QUERY_THUMBS]]
        title = "query (photo)" if len(query_images) == 1 else f"query ({len(query_images)} photos)"
    elif query.get("kind") == "item":
        thumbs, title = [_safe_load(image_loader, query["item_id"])], f"query: item {query['item_id']}"
    elif query.get("kind") == "history":
        liked = list(query.get("liked", []))
        thumbs = [_safe_load(image_loader, i) for i in liked[-MAX_QUERY_THUMBS:]]
        disliked = query.get("disliked") or []
        title = f"query: {len(liked)} liked" + (f", {len(disliked)} disliked" if disliked else "")
    else:
        thumbs, title = [_placeholder()], f"query ({query.get('kind', '?')})"
    ax.imshow(_mosaic(thumbs))
    ax.set_title(title, fontsize=8, fontweight="bold")


def _mosaic(thumbs: list[np.ndarray]) -> np.ndarray:
    """Up to four thumbnails in a 1x1 / 1x2 / 2x2 grid."""
    if len(thumbs) == 1:
        return thumbs[0]
    thumbs = thumbs + [np.full_like(thumbs[0], 255)] * (len(thumbs) % 2)
    pairs = [np.hstack(thumbs[i : i + 2]) for i in range(0, len(thumbs), 2)]
    return np.vstack(pairs)


def _as_native(image: ImageLike) -> np.ndarray:
    try:
        return decode_query_image(image, 0)[0]
    except QueryError:
        return _placeholder()


def _safe_load(image_loader: ImageLoader, item_id: int) -> np.ndarray:
    """A missing or unreadable catalog image should not cost the whole gallery."""
    try:
        image = np.asarray(image_loader(int(item_id)))
    except Exception:  # noqa: BLE001 - any loader failure becomes a placeholder
        return _placeholder()
    return image if image.ndim in (2, 3) and image.size else _placeholder()


def _placeholder() -> np.ndarray:
    return np.full((*NATIVE_HW, 3), 220, dtype=np.uint8)


def results_table(result: RecommendationResult, title: str | None = None) -> Table:
    """Rich table of the results (rank, id, name, type, colour, gender, score, shared attributes, parts).

    Every cell and the title are rich ``Text`` of cleaned values (:mod:`fashion_lightning.utils.terminal`):
    a catalog's ``[link=...]`` or escape sequence is shown as text, never interpreted.
    """
    table = Table(title=rich_text(title or _describe(result.query), 300), show_lines=False)
    for name, style in (
        ("#", "dim"),
        ("id", "cyan"),
        ("name", ""),
        ("articleType", ""),
        ("baseColour", ""),
        ("gender", ""),
        ("score", "bold"),
        ("shares", "green"),
    ):
        table.add_column(name, style=style or None, justify="right" if name in ("#", "id", "score") else "left")
    has_parts = any(r.explanation.parts for r in result.results)
    if has_parts:
        table.add_column("image / text part", justify="right")
    for rec in result.results:
        meta = rec.metadata
        row = [
            rich_text(rec.rank),
            rich_text(rec.id),
            rich_text(meta.get("productDisplayName") or "", 40),
            rich_text(meta.get("articleType", ""), 40),
            rich_text(meta.get("baseColour", ""), 40),
            rich_text(meta.get("gender", ""), 40),
            rich_text(f"{rec.score:.4f}"),
            rich_text(shared_summary(rec.explanation), 60),
        ]
        if has_parts:
            parts = rec.explanation.parts
            row.append(rich_text(f"{parts['image']:.3f} / {parts['text']:.3f}" if parts else ""))
        table.add_row(*row)
    return table


def _describe(query: dict) -> str:
    kind = query.get("kind")
    if kind == "image":
        what = ", ".join(query.get("images", []))
    elif kind == "text":
        what = repr(query.get("text"))
    elif kind == "item":
        what = f"item {query.get('item_id')}"
    else:
        what = f"{len(query.get('liked', []))} liked, {len(query.get('disliked', []))} disliked"
    filters = query.get("filters") or {}
    suffix = f"  filters {filters}" if filters else ""
    return f"top {query.get('k')} for {kind} query: {what}{suffix}"
