"""FashionDataModule: catalog -> cleaning -> image cache -> splits -> vocab -> loaders.

One datamodule serves both model families and every app (train, eval, index). With
``root=None`` it uses the embedded synthetic catalog, generated into the cache on first use.
Each run writes what it used into ``output_dir``: ``data_report.json`` (every repair and
drop by reason), ``splits.csv`` and ``vocab.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from lightning.fabric.utilities.data import AttributeDict
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from fashion_lightning.data.catalog import Catalog, load_catalog
from fashion_lightning.data.class_weights import balanced_class_weights
from fashion_lightning.data.dataset import FashionDataset, seed_worker_transform
from fashion_lightning.data.duplicates import image_digests, positive_groups
from fashion_lightning.data.image_cache import ImageCache, attach_images, build_image_cache
from fashion_lightning.data.images import NATIVE_HW
from fashion_lightning.data.sampling import EpochShuffleSampler, GroupedShuffleSampler
from fashion_lightning.data.schema import ALL_TASKS, TASKS
from fashion_lightning.data.splits import SPLITS, load_splits, save_splits, stratified_split
from fashion_lightning.data.text_cache import CachedTextDataset, TextCache, TextEncoder, ensure_text_cache
from fashion_lightning.data.trunk_cache import CachedTrunkDataset, TrunkEncoder, ensure_trunk_cache
from fashion_lightning.data.vocab import LabelVocabs

log = logging.getLogger(__name__)
EVAL_SPLITS = (*SPLITS, "all")


class FashionDataModule(L.LightningDataModule):
    """Kaggle-layout catalog (folder, nested folder or .zip) or the synthetic one, as loaders."""

    hparams: AttributeDict  # what save_hyperparameters() stores (Lightning types the property as a MutableMapping)

    def __init__(
        self,
        root: str | None = None,
        num_items: int = 1200,
        synthetic_seed: int = 0,
        cache_dir: str = "~/.cache/fashion-lightning",
        output_dir: str | None = None,
        tasks: Sequence[str] = TASKS,
        min_count: int = 10,
        exclude_master_categories: Sequence[str] = ("Home",),
        test_size: float = 0.3,
        val_size: float = 0.2,
        split_seed: int = 42,
        splits_path: str | None = None,
        split: str = "test",
        max_items: int | None = None,
        vocabs: Mapping[str, Sequence[str]] | LabelVocabs | None = None,
        class_weight_power: float = 0.5,
        class_weight_clip: Sequence[float] = (0.1, 10.0),
        train_transform: Callable | None = None,
        text_template: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        decode_workers: int | None = None,
        hard_negatives: Mapping[str, Any] | None = None,
        positive_groups: bool = False,
    ) -> None:
        super().__init__()
        if split not in EVAL_SPLITS:
            raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
        unknown = [t for t in tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {ALL_TASKS}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0 (got {batch_size}, {num_workers})")
        if max_items is not None and max_items < 10:
            raise ValueError(f"max_items must be >= 10 or null, got {max_items}")
        hard_negatives = _hard_negative_config(hard_negatives)
        # plain lists, not OmegaConf containers: checkpoints must load with weights_only=True
        tasks, exclude_master_categories = list(tasks), list(exclude_master_categories)
        class_weight_clip = [float(v) for v in class_weight_clip]
        self.save_hyperparameters(ignore=["train_transform", "vocabs"])
        self.root = root
        self.cache_dir = Path(cache_dir).expanduser()
        self.output_dir = Path(output_dir) if output_dir else None
        self.tasks = list(tasks)
        self.train_transform = train_transform
        # LabelVocabs is itself a Mapping (of TaskVocab): only plain {task: classes} mappings are converted
        self.vocabs: LabelVocabs | None = (
            vocabs if vocabs is None or isinstance(vocabs, LabelVocabs) else LabelVocabs.from_dict(vocabs)
        )
        self.catalog: Catalog | None = None
        self._raw_catalog: Catalog | None = None  # loaded by prepare_data, consumed by setup
        self.cache: ImageCache | None = None
        self.frames: dict[str, pd.DataFrame] = {}
        self.class_weights: dict[str, Any] = {}
        self.datasets: dict[str, FashionDataset] = {}
        self.epoch = 0  # the epoch the next train pass shuffles by (EpochShuffleSampler; set by EpochSeed)
        self._trunk: tuple[TrunkEncoder, int, str] | None = None  # set by a model with cache_trunk
        self._trunk_datasets: dict[str, CachedTrunkDataset] = {}
        self._text: tuple[TextEncoder, str] | None = None  # set by a CLIP model with cache_text
        self._text_cache: TextCache | None = None

    # -- preparation ----------------------------------------------------------------------
    def catalog_root(self) -> Path:
        if self.root:
            return Path(self.root).expanduser()
        from fashion_lightning.data.synthetic import ensure_synthetic_catalog

        return ensure_synthetic_catalog(self.cache_dir, self.hparams.num_items, self.hparams.synthetic_seed)

    def prepare_data(self) -> None:
        """Generate the synthetic catalog / decode the image cache once (rank 0 only, in DDP)."""
        if self._raw_catalog is None and self.catalog is None:
            self._raw_catalog = load_catalog(self.catalog_root(), self.hparams.exclude_master_categories)
            build_image_cache(self._raw_catalog.source, self.cache_dir, NATIVE_HW, self.hparams.decode_workers)

    def setup(self, stage: str | None = None) -> None:
        if self.catalog is not None:
            return
        catalog = self._raw_catalog or load_catalog(self.catalog_root(), self.hparams.exclude_master_categories)
        self._raw_catalog = None
        self.cache = build_image_cache(catalog.source, self.cache_dir, NATIVE_HW, self.hparams.decode_workers)
        self.catalog = attach_images(catalog, self.cache)
        frame = self._subsample(self.catalog.frame)
        split = (
            load_splits(frame, self.hparams.splits_path)
            if self.hparams.splits_path
            else stratified_split(
                frame, "articleType", self.hparams.test_size, self.hparams.val_size, self.hparams.split_seed
            )
        )
        self.frames = {name: frame[split == name].reset_index(drop=True) for name in SPLITS}
        self.frames["all"] = frame[split != "unlisted"].reset_index(drop=True)
        if self.vocabs is None:
            self.vocabs = LabelVocabs.build(self.frames["train"], self.tasks, self.hparams.min_count)
        elif self.vocabs.tasks != self.tasks:
            log.info("using the given vocabulary's tasks %s", self.vocabs.tasks)
            self.tasks = self.vocabs.tasks
        self.class_weights = self._class_weights(self.frames["train"])
        if self.train_transform is not None and hasattr(self.train_transform, "set_random_seed"):
            self.train_transform.set_random_seed(self.hparams.split_seed)  # reproducible with num_workers=0
        self.datasets = {name: self._dataset(f, train=name == "train") for name, f in self.frames.items()}
        self._bind_background_bank()
        self._write_reports(frame, split)
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.frames.items())
        log.info("data ready: %s; classes %s", sizes, self.vocabs.num_classes)

    def _built(self) -> tuple[LabelVocabs, ImageCache, Catalog]:
        """The vocabulary, image cache and cleaned catalog that :meth:`setup` builds."""
        if self.vocabs is None or self.cache is None or self.catalog is None:
            raise RuntimeError("FashionDataModule.setup() has not run yet")
        return self.vocabs, self.cache, self.catalog

    def _subsample(self, frame: pd.DataFrame) -> pd.DataFrame:
        n = self.hparams.max_items
        if n is None or n >= len(frame):
            return frame
        log.info("max_items=%d: using a seeded random subset of %d catalog rows", n, len(frame))
        return frame.sample(n=n, random_state=self.hparams.split_seed).sort_index().reset_index(drop=True)

    def _class_weights(self, train: pd.DataFrame) -> dict[str, Any]:
        vocabs = self._built()[0]
        labels = vocabs.encode(train)
        return {
            task: balanced_class_weights(
                labels[:, col],
                len(vocabs[task]),
                self.hparams.class_weight_power,
                tuple(self.hparams.class_weight_clip),
            )
            for col, task in enumerate(vocabs.tasks)
        }

    def texts(self, frame: pd.DataFrame) -> list[str]:
        template = self.hparams.text_template
        if not template:
            return frame["productDisplayName"].astype(str).tolist()
        return [template.format(**row) for row in frame.to_dict("records")]

    def _dataset(self, frame: pd.DataFrame, train: bool) -> FashionDataset:
        vocabs, cache, _ = self._built()
        h, w = cache.size_hw
        groups = None
        if self.hparams.positive_groups:
            digests = image_digests(cache.open_images(), frame["cache_row"].tolist())
            groups = positive_groups(frame["productDisplayName"].tolist(), digests)
        return FashionDataset(
            images_path=cache.images_path,
            cache_shape=(len(cache.ids), h, w, 3),
            cache_rows=frame["cache_row"].to_numpy(),
            labels=vocabs.encode(frame),
            ids=frame["id"].to_numpy(),
            texts=self.texts(frame),
            transform=self.train_transform if train else None,
            positive_groups=groups,
        )

    def hard_negative_groups(self, frame: pd.DataFrame) -> list[int]:
        """One group id per row: rows equal in every ``hard_negatives.columns`` value share one."""
        columns = self.hparams.hard_negatives["columns"]
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(f"hard_negatives.columns {missing} are not catalog columns")
        keys = frame[list(columns)].astype(str).agg("\x1f".join, axis=1)
        return pd.factorize(keys)[0].tolist()

    def _bind_background_bank(self) -> None:
        """Give background-compositing transforms the training photos to paste products on."""
        if self.train_transform is None or not len(self.frames.get("train", [])):
            return
        _, cache, _ = self._built()
        h, w = cache.size_hw
        rows = self.frames["train"]["cache_row"].to_numpy()
        for transform in _walk_transforms(self.train_transform):
            bind = getattr(transform, "bind_bank", None)
            if callable(bind):
                bind(str(cache.images_path), (len(cache.ids), h, w, 3), rows)

    @rank_zero_only
    def _write_reports(self, frame: pd.DataFrame, split: pd.Series) -> None:
        if self.output_dir is None:
            return
        vocabs, _, catalog = self._built()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        catalog.report.save(self.output_dir / "data_report.json")
        save_splits(frame, split, self.output_dir / "splits.csv")
        vocabs.save(self.output_dir / "vocab.json")

    def unseen_labels(self, split: str | None = None) -> dict[str, dict[str, int]]:
        """Labels in ``split`` that the vocabulary never saw (evaluating a checkpoint on new data)."""
        return self._built()[0].unseen_labels(self.frames[split or self.hparams.split])

    # -- cached partial trunk -------------------------------------------------------------
    def use_trunk_cache(self, encoder: TrunkEncoder, views: int, dtype: str = "float16") -> None:
        """Serve train/val/test as cached activations at the model's cut (``model.cache_trunk``); the train
        split gets ``views`` augmented views per item, the others one un-augmented view. Built lazily, when a
        loader is first asked for (the model is on its device by then)."""
        if (
            self._trunk is not None
            and self._trunk[0].fingerprint == encoder.fingerprint
            and self._trunk[1:] == (views, dtype)
        ):
            self._trunk = (encoder, views, dtype)  # same activations: keep the datasets already opened
            return
        self._trunk = (encoder, views, dtype)
        self._trunk_datasets = {}

    def trunk_dataset(self, name: str, train: bool = False) -> CachedTrunkDataset:
        """The split's cached activations (built, resumed or repaired on first use)."""
        if self._trunk is None:
            raise RuntimeError("use_trunk_cache() has not been called")
        if name not in self._trunk_datasets:
            encoder, views, dtype = self._trunk
            items = self.datasets[name]
            cache = ensure_trunk_cache(
                items, encoder, self.cache_dir, views if train else 1, dtype,
                transform=self.train_transform if train else None, seed=self.hparams.split_seed,
                batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            )  # fmt: skip
            log.info("trunk cache for %s: %s, %s, %.1f MB", name, cache.path, cache.shape, cache.nbytes / 1e6)
            self._trunk_datasets[name] = CachedTrunkDataset(cache, items)
        return self._trunk_datasets[name]

    # -- cached lower text layers (CLIP) ---------------------------------------------------
    def use_text_cache(self, encoder: TextEncoder, dtype: str = "float16") -> None:
        """Add the token states of each item's title at the model's text cut to train/val/test batches
        (``model.cache_text``); one cache over the unique titles of every split, built when first needed."""
        if self._text is None or (self._text[0].fingerprint, self._text[1]) != (encoder.fingerprint, dtype):
            self._text_cache = None
        self._text = (encoder, dtype)

    def text_cache(self) -> TextCache:
        if self._text is None:
            raise RuntimeError("use_text_cache() has not been called")
        if self._text_cache is None:
            encoder, dtype = self._text
            titles = sorted({t for dataset in self.datasets.values() for t in dataset.texts})
            self._text_cache = ensure_text_cache(
                titles,
                encoder,
                self.cache_dir,
                dtype,
                batch_size=self.hparams.eval_batch_size or self.hparams.batch_size,
            )
            log.info("text cache: %s, %d titles, %.1f MB", self._text_cache.path, len(self._text_cache.titles),
                     self._text_cache.nbytes / 1e6)  # fmt: skip
        return self._text_cache

    # -- loaders --------------------------------------------------------------------------
    def _loader(self, name: str, train: bool = False, cached: bool = True) -> DataLoader:
        dataset: Any = self.trunk_dataset(name, train) if cached and self._trunk is not None else self.datasets[name]
        if cached and self._text is not None:
            dataset = CachedTextDataset(dataset, self.text_cache(), self.datasets[name].texts)
        workers = self.hparams.num_workers
        batch = self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size)
        sampler: EpochShuffleSampler | None = None
        if train and self.hparams.hard_negatives:
            groups = self.hard_negative_groups(self.frames[name])
            sampler = GroupedShuffleSampler(groups, self.hparams.hard_negatives["chunk"], self.hparams.split_seed, self)
        elif train:
            sampler = EpochShuffleSampler(len(dataset), self.hparams.split_seed, self)
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            drop_last=train and len(dataset) > batch,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=self.hparams.persistent_workers and workers > 0,
            worker_init_fn=seed_worker_transform if train and workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if len(self.datasets["val"]) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.split)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.split, cached=False)  # embeddings for an index come from whole images

    @property
    def predict_frame(self) -> pd.DataFrame:
        """Catalog rows in the order the test/predict loaders yield them."""
        return self.frames[self.hparams.split]

    def image_loader(self) -> Callable[[int], np.ndarray]:
        """``id -> native image`` for galleries and reports."""
        _, cache, catalog = self._built()
        rows = dict(zip(catalog.frame["id"].tolist(), catalog.frame["cache_row"].tolist()))
        images = cache.open_images()
        return lambda item_id: np.asarray(images[rows[int(item_id)]])


def _hard_negative_config(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``{columns: [...], chunk: n}`` checked and as plain containers (null / {} = off)."""
    if not value:
        return None
    unknown = set(value) - {"columns", "chunk"}
    if unknown:
        raise ValueError(f"hard_negatives takes 'columns' and 'chunk', got {sorted(unknown)}")
    columns = [str(c) for c in value.get("columns", ("articleType", "gender"))]
    chunk = int(value.get("chunk", 16))
    if not columns or chunk < 2:
        raise ValueError(f"hard_negatives needs at least one column and chunk >= 2, got {columns}, {chunk}")
    return {"columns": columns, "chunk": chunk}


def _walk_transforms(transform: Any) -> list[Any]:
    """A transform and, for albumentations Compose / OneOf / ..., everything nested in it."""
    found = [transform]
    for child in getattr(transform, "transforms", None) or []:
        found += _walk_transforms(child)
    return found
