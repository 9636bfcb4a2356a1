"""Seeded, stratified train/val/test splits, persisted as ``splits.csv`` for reuse."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def stratified_split(
    frame: pd.DataFrame, stratify_by: str = "articleType", test_size: float = 0.3, val_size: float = 0.2, seed: int = 42
) -> pd.Series:
    """Assign each row to train/val/test, class by class, so every split keeps the class mix.

    ``val_size`` is a fraction of the non-test part (the study: 70/30, then 20% of train).
    Per class of n items, ``round(n * test_size)`` go to test; singletons stay in train.
    """
    for name, value in (("test_size", test_size), ("val_size", val_size)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(frame), dtype=object)
    for _, positions in sorted(frame.groupby(stratify_by, sort=True).indices.items()):
        positions = rng.permutation(positions)
        n_test = int(round(len(positions) * test_size))
        n_val = int(round((len(positions) - n_test) * val_size))
        assignment[positions[:n_test]] = "test"
        assignment[positions[n_test : n_test + n_val]] = "val"
        assignment[positions[n_test + n_val :]] = "train"
    return pd.Series(assignment, index=frame.index, name="split")


def save_splits(frame: pd.DataFrame, split: pd.Series, path: str | Path) -> Path:
    from fashion_lightning.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        pd.DataFrame({"id": frame["id"].to_numpy(), "split": split.to_numpy()}).to_csv(tmp, index=False)
    return Path(path)


def load_splits(frame: pd.DataFrame, path: str | Path) -> pd.Series:
    """Re-apply a persisted split; catalog rows the file does not list are reported and left out."""
    saved = pd.read_csv(path)
    if list(saved.columns) != ["id", "split"] or not saved["split"].isin(SPLITS).all():
        raise ValueError(f"{path} is not a splits file (columns id,split with values {SPLITS})")
    split = frame["id"].map(dict(zip(saved["id"], saved["split"])))
    unlisted = int(split.isna().sum())
    if unlisted:
        log.warning("%d catalog row(s) are not in %s and are left out of every split", unlisted, path)
    return split.fillna("unlisted").rename("split")
