"""Evaluation figures (confusion matrix, PCA of embeddings) as pure functions returning Figures.

Figures come from :func:`fashion_lightning.utils.figures.new_figure` (Agg canvas, no pyplot),
so nothing needs a display and no global figure state leaks between epochs. The PCA is
scikit-learn's (exact SVD; its sign convention makes the axes deterministic).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from fashion_lightning.utils.figures import new_figure as _new_figure
from fashion_lightning.utils.figures import save_figure as _save_figure
from fashion_lightning.utils.subsample import seeded_subsample

OTHER = "Other"
_ANNOTATE_MAX_CLASSES = 15  # beyond this, per-cell numbers are unreadable


def confusion_matrix_figure(
    confmat: torch.Tensor,
    class_names: Sequence[str],
    title: str,
    top_n: int = 20,
) -> Figure:
    """Row-normalised confusion matrix (rows = true class); only the ``top_n`` most frequent true classes.

    Rows are normalised by the full support of the true class, so with a class subset a row
    sums to less than 1 when that class was predicted as a class not shown.
    """
    counts = confmat.detach().double().cpu()
    num_classes = counts.shape[0]
    if counts.shape != (num_classes, num_classes) or len(class_names) != num_classes:
        raise ValueError(f"confmat must be [C,C] with C={len(class_names)} class names, got {tuple(counts.shape)}")
    support = counts.sum(dim=1)
    if num_classes > top_n:
        keep = support.argsort(descending=True, stable=True)[:top_n]
        title = f"{title}\n(top {top_n} of {num_classes} classes by support)"
    else:
        keep = torch.arange(num_classes)
    rates = (counts[keep] / support[keep].clamp(min=1).unsqueeze(1))[:, keep]
    names = [class_names[i] for i in keep.tolist()]

    side = max(4.0, 0.35 * len(names) + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=90, fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(names) <= _ANNOTATE_MAX_CLASSES:
        _annotate_cells(ax, rates)
    fig.tight_layout()
    return fig


def _annotate_cells(ax, rates: torch.Tensor) -> None:
    for row in range(rates.shape[0]):
        for col in range(rates.shape[1]):
            value = float(rates[row, col])
            ax.text(
                col,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value > 0.5 else "black",
            )


def pca_2d(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact 2-D PCA (scikit-learn, full SVD): ``(coords [N,2], explained variance ratio [2])``."""
    from sklearn.decomposition import PCA  # imported on first plot: costs ~1 s

    x = embeddings.detach().double().cpu().numpy()
    n_components = min(2, x.shape[1], x.shape[0])
    pca = PCA(n_components=n_components, svd_solver="full")
    coords = torch.from_numpy(pca.fit_transform(x))
    ratio = torch.from_numpy(pca.explained_variance_ratio_).nan_to_num(0.0)
    if n_components < 2:  # 1-D embeddings (or a single point): nothing to show on the second axis
        coords = torch.cat([coords, torch.zeros(coords.shape[0], 2 - n_components, dtype=coords.dtype)], dim=1)
        ratio = torch.cat([ratio, torch.zeros(2 - n_components, dtype=ratio.dtype)])
    return coords.float(), ratio.float()


def pca_scatter_figure(
    embeddings: torch.Tensor,
    labels: Sequence[str],
    title: str,
    max_points: int = 5000,
    top_classes: int = 10,
    seed: int = 0,
) -> Figure:
    """Scatter of the first two principal components, coloured by label.

    A seeded subsample of ``max_points`` keeps the plot readable and reproducible; labels
    outside the ``top_classes`` most frequent are drawn in grey as "Other".
    """
    if embeddings.shape[0] != len(labels):
        raise ValueError(f"{embeddings.shape[0]} embeddings but {len(labels)} labels")
    rows = seeded_subsample(embeddings.shape[0], max_points, seed)
    keep = torch.arange(embeddings.shape[0]) if rows is None else rows
    coords, ratio = pca_2d(embeddings[keep])
    shown = [labels[i] for i in keep.tolist()]
    top = [name for name, _ in Counter(shown).most_common(top_classes)]
    groups = [name if name in top else OTHER for name in shown]

    fig = _new_figure(8.0, 6.0)
    ax = fig.add_subplot()
    palette = _palette(len(top))
    for name, colour in [(OTHER, "lightgrey")] + list(zip(top, palette)):
        mask = torch.tensor([group == name for group in groups], dtype=torch.bool)
        if bool(mask.any()):
            points = coords[mask].numpy()
            ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6, color=colour, label=f"{name} ({int(mask.sum())})")
    ax.set_xlabel(f"PC1 ({float(ratio[0]):.1%} var)")
    ax.set_ylabel(f"PC2 ({float(ratio[1]):.1%} var)")
    ax.set_title(f"{title}\n({len(keep)} points)")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2)
    fig.tight_layout()
    return fig


def _palette(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as an image (format from the suffix, atomically), creating parent folders."""
    return _save_figure(fig, path, dpi, bbox_inches="tight")
