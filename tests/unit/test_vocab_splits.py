"""Label vocabularies (Other-folding, unseen labels), stratified splits, class weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fashion_lightning.data.class_weights import balanced_class_weights
from fashion_lightning.data.splits import load_splits, save_splits, stratified_split
from fashion_lightning.data.vocab import OTHER, UNKNOWN_INDEX, LabelVocabs, TaskVocab


# -- vocabularies ---------------------------------------------------------------------------
def _labels(counts: dict[str, int]) -> list[str]:
    return [label for label, n in counts.items() for _ in range(n)]


def test_rare_classes_fold_into_other_most_frequent_first():
    vocab = TaskVocab.build("articleType", _labels({"Tshirts": 9, "Watches": 3, "Shirts": 9, "Ties": 2, "Bras": 1}), 3)
    assert vocab.classes == ("Shirts", "Tshirts", "Watches", OTHER)  # count desc, ties by name, Other last
    assert vocab.index("Ties") == vocab.index("Bras") == vocab.other_index == 3
    assert vocab.index("never seen") == 3
    assert vocab.is_known("Watches") and not vocab.is_known("Ties")


def test_no_folding_means_no_other_and_unseen_is_minus_one():
    vocab = TaskVocab.build("gender", _labels({"Men": 5, "Women": 4}), min_count=1)
    assert vocab.classes == ("Men", "Women")
    assert vocab.other_index == UNKNOWN_INDEX
    assert vocab.index("Girls") == UNKNOWN_INDEX


def test_a_literal_other_label_is_kept_once_and_last():
    vocab = TaskVocab.build("baseColour", _labels({OTHER: 10, "Black": 3, "Teal": 1}), min_count=2)
    assert vocab.classes == ("Black", OTHER)
    with pytest.raises(ValueError, match="duplicate"):
        TaskVocab("t", ("a", "a"))


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "articleType": _labels({"Tshirts": 6, "Shirts": 4, "Ties": 1}),
            "gender": ["Men", "Women"] * 5 + ["Men"],
            "year": [2011] * 11,
        }
    )


def test_label_vocabs_encode_unseen_labels_map_to_other_or_minus_one(tmp_path: Path):
    vocabs = LabelVocabs.build(_frame(), ["articleType", "gender"], min_count=2)
    assert vocabs.tasks == ["articleType", "gender"]
    assert vocabs.num_classes == {"articleType": 3, "gender": 2}
    new = pd.DataFrame({"articleType": ["Shirts", "Ties", "Kurtas"], "gender": ["Women", "Girls", "Men"]})
    codes = vocabs.encode(new)
    assert codes.dtype == np.int64 and codes.shape == (3, 2)
    other = vocabs["articleType"].index(OTHER)
    assert codes[:, 0].tolist() == [vocabs["articleType"].index("Shirts"), other, other]
    assert codes[:, 1].tolist() == [vocabs["gender"].index("Women"), UNKNOWN_INDEX, vocabs["gender"].index("Men")]
    assert vocabs.unseen_labels(new) == {"articleType": {"Ties": 1, "Kurtas": 1}, "gender": {"Girls": 1}}
    assert vocabs.decode("gender", UNKNOWN_INDEX) == "<unknown>"
    assert vocabs.decode("articleType", other) == OTHER
    # a task the frame lacks is all -1, never a crash
    assert (vocabs.encode(new[["gender"]])[:, 0] == UNKNOWN_INDEX).all()
    loaded = LabelVocabs.load(vocabs.save(tmp_path / "vocab.json"))
    assert loaded == vocabs and loaded.tasks == vocabs.tasks
    assert LabelVocabs.from_dict(vocabs.to_dict()) == vocabs
    with pytest.raises(KeyError, match="no column"):
        LabelVocabs.build(_frame(), ["season"])


# -- splits -----------------------------------------------------------------------------------
def _catalog(seed: int = 0) -> pd.DataFrame:
    sizes = {"Tshirts": 400, "Shirts": 200, "Watches": 100, "Caps": 30, "Ties": 7, "Bras": 1}
    labels = _labels(sizes)
    order = np.random.default_rng(seed).permutation(len(labels))
    return pd.DataFrame({"id": np.arange(10_000, 10_000 + len(labels)), "articleType": np.asarray(labels)[order]})


def test_split_is_stratified_per_class():
    frame = _catalog()
    split = stratified_split(frame, "articleType", test_size=0.3, val_size=0.2, seed=1)
    assert set(split.unique()) == {"train", "val", "test"}
    table = pd.crosstab(frame["articleType"], split)
    for label, row in table.iterrows():
        n = row.sum()
        if n < 2:
            assert row["train"] == n, "singletons stay in train"
            continue
        assert abs(row["test"] - 0.3 * n) <= 1, label  # round(n * 0.3)
        assert abs(row["val"] - 0.2 * (n - row["test"])) <= 1, label  # 20% of the non-test part
    total = split.value_counts(normalize=True)
    assert total["test"] == pytest.approx(0.3, abs=0.01)
    assert total["val"] == pytest.approx(0.7 * 0.2, abs=0.01)


def test_split_is_deterministic_and_seeded():
    frame = _catalog()
    a = stratified_split(frame, seed=7)
    assert a.equals(stratified_split(frame, seed=7))
    assert not a.equals(stratified_split(frame, seed=8))
    # sizes are configurable, including no validation split
    no_val = stratified_split(frame, test_size=0.5, val_size=0.0, seed=7)
    assert "val" not in set(no_val) and (no_val == "test").mean() == pytest.approx(0.5, abs=0.01)
    for bad in ({"test_size": 1.0}, {"val_size": -0.1}):
        with pytest.raises(ValueError):
            stratified_split(frame, **bad)


def test_splits_round_trip_and_unlisted_ids(tmp_path: Path):
    frame = _catalog()
    split = stratified_split(frame, seed=3)
    path = save_splits(frame, split, tmp_path / "run" / "splits.csv")
    assert list(pd.read_csv(path).columns) == ["id", "split"]
    assert load_splits(frame, path).equals(split)
    # the same ids in another order get the same assignment (keyed by id, not row position)
    reordered = frame.iloc[::-1].reset_index(drop=True)
    again = load_splits(reordered, path)
    assert dict(zip(reordered["id"], again)) == dict(zip(frame["id"], split))
    # ids the file does not list are left out of every split
    extra = pd.concat([frame, pd.DataFrame({"id": [1, 2], "articleType": ["Tshirts", "Kurtas"]})], ignore_index=True)
    reloaded = load_splits(extra, path)
    assert reloaded.iloc[-2:].tolist() == ["unlisted", "unlisted"]
    assert (reloaded.iloc[:-2] == split).all()
    (tmp_path / "bad.csv").write_text("id,fold\n1,a\n")
    with pytest.raises(ValueError, match="not a splits file"):
        load_splits(frame, tmp_path / "bad.csv")


# -- class weights ------------------------------------------------------------------------------
def test_balanced_weights_match_the_formula_by_hand():
    labels = np.array([0, 0, 0, 1, -1, -1])  # -1 (unknown) ignored; class 2 absent
    w = balanced_class_weights(labels, num_classes=3, power=1.0, clip=(0.01, 100.0))
    # N=4, 2 present classes: 4/(2*3) and 4/(2*1); already sum(w*n) = 2 + 2 = 4 = N
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([2 / 3, 2.0, 0.0])
    sqrt = balanced_class_weights(labels, 3, power=0.5, clip=(0.01, 100.0))
    raw = np.array([(2 / 3) ** 0.5, 2.0**0.5])
    raw *= 4 / (raw * np.array([3, 1])).sum()
    assert sqrt.tolist() == pytest.approx([*raw, 0.0])


@pytest.mark.parametrize("power", [0.0, 0.3, 0.5, 1.0])
def test_average_per_sample_weight_is_one(power: float):
    rng = np.random.default_rng(0)
    labels = rng.choice(6, size=500, p=[0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    w = balanced_class_weights(labels, 7, power=power)
    assert float(w[torch.as_tensor(labels)].mean()) == pytest.approx(1.0, rel=1e-5)
    assert w[5] == 0 and w[6] == 0  # absent classes cannot be learned from this split
    if power == 0.0:
        assert w[:5].tolist() == pytest.approx([1.0] * 5)


def test_clip_bounds_the_ratio_before_rescaling():
    labels = np.array([0] * 99 + [1])
    w = balanced_class_weights(labels, 2, power=1.0, clip=(0.1, 10.0))
    # raw: 100/(2*99)=0.505, 100/2=50 -> clipped to 10, then rescaled to mean 1 per sample
    scale = 100 / (0.50505 * 99 + 10.0)
    assert w.tolist() == pytest.approx([100 / 198 * scale, 10.0 * scale], rel=1e-4)
    assert float(w[1] / w[0]) == pytest.approx(10.0 / (100 / 198), rel=1e-4)


def test_no_known_labels_gives_uniform_weights():
    assert balanced_class_weights(np.array([-1, -1]), 3).tolist() == [1.0, 1.0, 1.0]
