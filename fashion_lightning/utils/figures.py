"""The one matplotlib figure factory: object API on an Agg canvas, never pyplot.

No display is needed and no global figure registry keeps figures alive between epochs or
requests, so evaluation plots, EDA charts and recommendation galleries all use these two calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fashion_lightning.utils.atomic import atomic_path


def new_figure(
    width: float,
    height: float,
    *,
    dpi: float | None = None,
    layout: Literal["constrained", "compressed", "tight"] | None = None,
) -> Figure:
    """A ``width`` x ``height`` inch Figure with its own Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: float = 110, *, clear: bool = False, **savefig: Any) -> Path:
    """Write ``fig`` atomically (format from the suffix), creating parent folders.

    ``clear`` releases the figure's artists afterwards (for figures nobody logs later);
    extra keywords go to ``Figure.savefig`` (``bbox_inches``, ``facecolor``, ...).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or None, **savefig)
    if clear:
        fig.clear()
    return path
