"""FashionDataModule end to end on the synthetic catalog: reports, batch contract, augmentation, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.images import NATIVE_HW, PAD_VALUE
from fashion_lightning.data.schema import TASKS
from fashion_lightning.data.transforms import default_train_transform
from fashion_lightning.data.vocab import OTHER, UNKNOWN_INDEX, LabelVocabs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _ready(**kwargs) -> FashionDataModule:
    dm = FashionDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def dm(synthetic_dm_kwargs: dict, run_dir: Path) -> FashionDataModule:
    return _ready(**synthetic_dm_kwargs, output_dir=str(run_dir), train_transform=default_train_transform())


def _cached(dm: FashionDataModule, ids: torch.Tensor) -> np.ndarray:
    """Native images of ``ids`` straight from the cache, as [B,3,H,W]."""
    lookup = dict(zip(dm.catalog.frame["id"], dm.catalog.frame["cache_row"]))
    images = dm.cache.open_images()
    return np.stack([images[lookup[int(i)]] for i in ids]).transpose(0, 3, 1, 2)


def test_reports_are_written_and_count_every_quirk(dm: FashionDataModule, run_dir: Path, synthetic_report):
    assert {p.name for p in run_dir.iterdir()} >= {"data_report.json", "splits.csv", "vocab.json"}
    report = json.loads((run_dir / "data_report.json").read_text())
    syn = synthetic_report
    assert sorted(report["repaired_ids"]) == list(syn.malformed_ids)
    assert report["repaired"] == {"name_with_1_extra_commas": 1, "name_with_2_extra_commas": 1}
    dropped = report["dropped_ids"]
    assert tuple(dropped["missing_image"]) == syn.missing_image_ids
    assert tuple(dropped["corrupt_image (cannot be decoded)"]) == syn.corrupt_image_ids
    assert tuple(dropped["missing_productDisplayName"]) == syn.missing_name_ids
    assert tuple(dropped["missing_or_bad_year"]) == syn.missing_year_ids
    assert tuple(sorted(dropped["excluded_masterCategory"])) == syn.excluded_category_ids
    assert report["filled"] == {col: len(syn.blank_fields[col]) for col in ("usage", "baseColour", "season")}
    assert report["rows_read"] == syn.num_items
    assert report["rows_kept"] == syn.num_items - sum(report["dropped"].values()) == len(dm.catalog.frame)
    splits = pd.read_csv(run_dir / "splits.csv")
    assert sorted(splits["id"]) == sorted(dm.frames["all"]["id"])
    assert splits["split"].value_counts().to_dict() == {k: len(dm.frames[k]) for k in ("train", "val", "test")}
    assert LabelVocabs.load(run_dir / "vocab.json") == dm.vocabs
    assert dm.vocabs.tasks == list(TASKS)


def test_train_loader_yields_the_batch_contract(dm: FashionDataModule):
    batch = next(iter(dm.train_dataloader()))
    b = dm.hparams.batch_size
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (b, 3, *NATIVE_HW)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (b, len(dm.vocabs.tasks))
    assert batch["id"].dtype == torch.int64 and batch["id"].shape == (b,)
    assert (
        isinstance(batch["text"], list) and len(batch["text"]) == b and all(isinstance(t, str) for t in batch["text"])
    )
    for col, task in enumerate(dm.vocabs.tasks):
        assert ((batch["labels"][:, col] >= UNKNOWN_INDEX) & (batch["labels"][:, col] < len(dm.vocabs[task]))).all()
    # labels and text belong to the ids they come with
    frame = dm.frames["train"].set_index("id")
    for item_id, labels, text in zip(batch["id"].tolist(), batch["labels"], batch["text"]):
        row = frame.loc[item_id]
        assert text == row["productDisplayName"]
        assert labels.tolist() == [dm.vocabs[t].index(row[t]) for t in dm.vocabs.tasks]


def test_eval_loaders_are_unaugmented_and_equal_the_cache(dm: FashionDataModule):
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        batches = list(loader)
        ids = torch.cat([b["id"] for b in batches])
        images = torch.cat([b["image"] for b in batches])
        assert np.array_equal(images.numpy(), _cached(dm, ids))
    test_ids = torch.cat([b["id"] for b in dm.test_dataloader()])
    assert test_ids.tolist() == dm.predict_frame["id"].tolist() == dm.frames["test"]["id"].tolist()
    assert dm.image_loader()(int(test_ids[0])).shape == (*NATIVE_HW, 3)


def test_train_transform_is_applied_in_train_only(synthetic_dm_kwargs: dict):
    flip = _ready(**synthetic_dm_kwargs, train_transform=A.Compose([A.HorizontalFlip(p=1.0)]))
    batch = next(iter(flip.train_dataloader()))
    assert np.array_equal(batch["image"].numpy(), _cached(flip, batch["id"])[..., ::-1])
    val = next(iter(flip.val_dataloader()))
    assert np.array_equal(val["image"].numpy(), _cached(flip, val["id"]))


def test_default_augmentation_keeps_native_uint8_shape():
    rng = np.random.default_rng(0)
    image = np.full((*NATIVE_HW, 3), PAD_VALUE, np.uint8)
    image[20:60, 15:45] = rng.integers(0, 200, size=(40, 30, 3), dtype=np.uint8)
    config = OmegaConf.load(CONF_DIR / "data" / "default.yaml").train_transform
    for transform in (default_train_transform(), instantiate(config)):
        outputs = [transform(image=image)["image"] for _ in range(8)]
        assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outputs)
        assert any(not np.array_equal(o, image) for o in outputs)
        # corners stay light (white fill, at most dimmed by brightness/contrast), never black bars
        assert all(o[0, 0].min() > 120 for o in outputs)


def test_split_all_serves_every_kept_row(synthetic_dm_kwargs: dict):
    dm = _ready(**synthetic_dm_kwargs, split="all")
    ids = torch.cat([b["id"] for b in dm.test_dataloader()])
    assert sorted(ids.tolist()) == sorted(dm.catalog.frame["id"].tolist())
    assert len(dm.frames["all"]) == sum(len(dm.frames[k]) for k in ("train", "val", "test"))


def test_splits_path_reuses_another_runs_split(dm: FashionDataModule, run_dir: Path, synthetic_dm_kwargs: dict):
    again = _ready(**synthetic_dm_kwargs, splits_path=str(run_dir / "splits.csv"), split_seed=1234)
    for name in ("train", "val", "test"):
        assert again.frames[name]["id"].tolist() == dm.frames[name]["id"].tolist()
    reseeded = _ready(**synthetic_dm_kwargs, split_seed=1234)
    assert reseeded.frames["test"]["id"].tolist() != dm.frames["test"]["id"].tolist()


def test_a_given_vocab_with_extra_and_unseen_labels_never_crashes(synthetic_dm_kwargs: dict, tmp_path: Path):
    vocabs = {"articleType": ["Tshirts", "Kurtas", OTHER], "gender": ["Men", "Women"]}
    dm = _ready(**synthetic_dm_kwargs, vocabs=vocabs, output_dir=str(tmp_path))
    assert dm.vocabs.tasks == ["articleType", "gender"] == dm.tasks
    assert dm.vocabs.num_classes == {"articleType": 3, "gender": 2}
    unseen = dm.unseen_labels("test")
    assert "Kurtas" not in unseen["articleType"] and "Tshirts" not in unseen["articleType"]
    assert set(unseen["gender"]) <= {"Unisex", "Boys", "Girls"}
    labels = torch.cat([b["labels"] for b in dm.test_dataloader()])
    frame = dm.frames["test"]
    assert labels.shape == (len(frame), 2)
    expected_article = np.where(frame["articleType"] == "Tshirts", 0, 2)
    assert labels[:, 0].tolist() == expected_article.tolist()
    expected_gender = frame["gender"].map({"Men": 0, "Women": 1}).fillna(UNKNOWN_INDEX).astype(int)
    assert labels[:, 1].tolist() == expected_gender.tolist()
    assert dm.class_weights["articleType"][1] == 0  # "Kurtas" never occurs: weight 0
    assert LabelVocabs.load(tmp_path / "vocab.json").to_dict() == vocabs  # the given vocab is what the run saves


def test_a_given_label_vocabs_object_is_kept_as_is():
    # LabelVocabs is itself a Mapping: it used to go through from_dict and fail on TaskVocab
    vocabs = LabelVocabs.from_dict({"articleType": ["Tshirts", OTHER], "gender": ["Men", "Women"]})
    assert FashionDataModule(vocabs=vocabs).vocabs is vocabs
    assert FashionDataModule(vocabs=vocabs.to_dict()).vocabs == vocabs


def test_class_weights_cover_each_vocab(dm: FashionDataModule):
    for task, weights in dm.class_weights.items():
        assert weights.shape == (len(dm.vocabs[task]),) and weights.dtype == torch.float32
        labels = torch.as_tensor(dm.vocabs.encode(dm.frames["train"])[:, dm.vocabs.tasks.index(task)])
        labels = labels[labels >= 0]
        assert float(weights[labels].mean()) == pytest.approx(1.0, rel=1e-4)


def test_max_items_and_worker_processes(synthetic_dm_kwargs: dict):
    kwargs = {**synthetic_dm_kwargs, "num_workers": 2, "persistent_workers": False}
    dm = _ready(**kwargs, max_items=80, train_transform=default_train_transform())
    assert len(dm.frames["all"]) == 80
    batch = next(iter(dm.train_dataloader()))  # the memmap opens lazily in each worker
    assert batch["image"].shape == (dm.hparams.batch_size, 3, *NATIVE_HW)


@pytest.mark.parametrize(
    "bad", [{"split": "holdout"}, {"tasks": ["colour"]}, {"batch_size": 0}, {"max_items": 5}], ids=str
)
def test_invalid_arguments_are_rejected(synthetic_dm_kwargs: dict, bad: dict):
    with pytest.raises(ValueError):
        FashionDataModule(**{**synthetic_dm_kwargs, **bad})


class _Draw(A.ImageOnlyTransform):
    """Replaces the image by one random byte drawn from the transform's generator: the image shows the draw."""

    def __init__(self) -> None:
        super().__init__(p=1.0)

    def get_params(self) -> dict:
        return {"value": int(self.random_generator.integers(0, 256))}

    def apply(self, img: np.ndarray, value: int = 0, **params) -> np.ndarray:
        return np.full_like(img, value)


def test_workers_draw_different_augmentations(synthetic_dm_kwargs: dict):
    kwargs = {**synthetic_dm_kwargs, "num_workers": 2, "persistent_workers": False}
    dm = _ready(**kwargs, train_transform=A.Compose([_Draw()]))
    draws = []
    for _ in range(2):  # two epochs
        it = iter(dm.train_dataloader())
        draws.append([next(it)["image"][:, 0, 0, 0].tolist() for _ in range(2)])  # batch 0: worker 0, batch 1: worker 1
    assert draws[0][0] != draws[0][1], "worker 0 and worker 1 drew the same augmentation parameters"
    assert draws[0][0] != draws[1][0], "the second epoch repeated the first epoch's augmentation parameters"
