"""The shared figure factory, the seeded subsample and the scikit-learn PCA of the evaluation plots."""

from __future__ import annotations

import torch

from fashion_lightning.evaluation.plots import pca_2d, pca_scatter_figure
from fashion_lightning.utils.figures import new_figure, save_figure
from fashion_lightning.utils.subsample import seeded_subsample


def test_pca_finds_the_main_axis_and_its_variance_share():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 1, generator=g)
    x = torch.cat([3 * t, 3 * t, 0.01 * torch.randn(200, 3, generator=g)], dim=1)  # along (1, 1, 0, 0, 0)
    coords, ratio = pca_2d(x)
    assert coords.shape == (200, 2) and float(ratio[0]) > 0.999
    assert abs(torch.corrcoef(torch.stack([coords[:, 0], t[:, 0]]))[0, 1]) > 0.999
    one_d, ratio_1d = pca_2d(torch.randn(10, 1, generator=g))
    assert one_d.shape == (10, 2) and float(ratio_1d[1]) == 0.0


def test_seeded_subsample_is_reproducible_sorted_and_none_when_all_fit():
    assert seeded_subsample(10, 10, 0) is None
    a, b = seeded_subsample(1000, 50, 7), seeded_subsample(1000, 50, 7)
    assert a is not None and torch.equal(a, b) and torch.equal(a, a.sort().values) and a.unique().numel() == 50
    assert not torch.equal(a, seeded_subsample(1000, 50, 8))


def test_figures_are_written_atomically_without_pyplot(tmp_path):
    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "sub" / "line.png", dpi=50, clear=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in path.parent.iterdir()] == ["line.png"]
    pca_scatter_figure(torch.randn(30, 4), ["a", "b", "c"] * 10, "t", max_points=20)
