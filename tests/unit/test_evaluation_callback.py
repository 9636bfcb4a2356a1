"""EvaluationCallback end to end on a tiny oracle module (CPU, a few seconds)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fashion_lightning.callbacks.evaluation import (
    EvaluationCallback,
    drop_duplicate_ids,
    merge_outputs,
    write_metrics_json,
)
from fashion_lightning.data.vocab import LabelVocabs
from fashion_lightning.evaluation.retrieval import metric_keys

VOCABS = LabelVocabs.from_dict(
    {
        "articleType": ["Tshirts", "Shirts", "Jeans"],
        "baseColour": ["Black", "White", "Blue"],
        "gender": ["Men", "Women"],
        "masterCategory": ["Apparel", "Footwear"],
    }
)
HEADS = ("articleType", "baseColour", "masterCategory")  # gender has no head
N_ITEMS, N_FEATURES = 64, 5


def make_labels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    article = torch.tensor([0] * 32 + [1] * 20 + [2] * 12)  # majority 32/64, every class > 10 items
    colour = torch.randint(0, 3, (N_ITEMS,), generator=generator)
    colour[:6] = -1
    gender = torch.randint(0, 2, (N_ITEMS,), generator=generator)
    master = torch.full((N_ITEMS,), -1)  # a task whose labels are all unknown
    return torch.stack([article, colour, gender, master], dim=1)


class ItemDataset(Dataset):
    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.features = torch.randn(len(labels), N_FEATURES, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.features[i], "labels": self.labels[i], "id": i, "text": f"item {i}"}


class OracleModule(L.LightningModule):
    """Trains a throwaway layer; evaluates with logits/embeddings made from the true labels."""

    def __init__(self, with_logits: bool = True, with_embedding: bool = True, with_extra: bool = True) -> None:
        super().__init__()
        self.vocabs = VOCABS
        self.layer = nn.Linear(N_FEATURES, 1)
        self.with_logits, self.with_embedding, self.with_extra = with_logits, with_embedding, with_extra

    def training_step(self, batch, batch_idx):
        return self.layer(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def _eval_step(self, batch) -> dict:
        labels = batch["labels"]
        out = {"labels": labels, "id": batch["id"], "text": batch["text"], "loss": self.layer(batch["x"]).mean()}
        if self.with_logits:
            out["logits"] = {
                task: F.one_hot(labels[:, VOCABS.tasks.index(task)].clamp(min=0), VOCABS.num_classes[task]).float()
                for task in HEADS
            }
        if self.with_embedding:
            out["embedding"] = F.normalize(F.one_hot(labels[:, 0], 3).float(), dim=1)
        return out

    def validation_step(self, batch, batch_idx):
        return self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        return self._eval_step(batch)

    def extra_metrics(self, stage: str, outputs: dict) -> dict[str, float]:
        return {"custom/n_texts": float(len(outputs["text"]))} if self.with_extra else {}


class SanityProbe(L.Callback):
    """Records what exists right after the sanity check."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: list[Path] | None = None  # None until the sanity check has run
        self.logged: list[str] | None = None

    def on_sanity_check_end(self, trainer, pl_module):
        self.files = [p for p in self.root.rglob("*") if p.suffix in {".json", ".png"}]
        self.logged = [k for k in trainer.callback_metrics if k.startswith("val/")]


def loader(labels: torch.Tensor) -> DataLoader:
    return DataLoader(ItemDataset(labels), batch_size=16)


def make_trainer(root: Path, callbacks: list, logger_cls: type = CSVLogger) -> L.Trainer:
    return L.Trainer(
        max_epochs=1,
        logger=logger_cls(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        default_root_dir=root,
        log_every_n_steps=1,
        callbacks=callbacks,
    )


def expected_keys(stage: str) -> set[str]:
    keys = {f"{stage}/{m}/{t}" for m in ("acc", "f1", "baseline") for t in ("articleType", "baseColour")}
    keys |= {f"{stage}/{p}/{k}" for p in ("retrieval", "retrieval_strict") for k in metric_keys((1, 5, 10))}
    return keys | {f"{stage}/custom/n_texts"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    labels = make_labels()
    callback = EvaluationCallback()
    probe = SanityProbe(root)
    trainer = make_trainer(root, [callback, probe])
    module = OracleModule()
    trainer.fit(module, train_dataloaders=loader(labels), val_dataloaders=loader(labels))
    trainer.test(module, dataloaders=loader(labels))
    return SimpleNamespace(root=root, labels=labels, callback=callback, probe=probe, trainer=trainer)


def test_metrics_json_has_every_documented_key(fitted):
    data = json.loads((fitted.root / "metrics.json").read_text())
    bookkeeping = {f"{s}/{k}" for s in ("val", "test") for k in ("epoch", "global_step")}
    assert set(data) == expected_keys("val") | expected_keys("test") | bookkeeping
    assert list(data) == sorted(data)
    assert all(isinstance(v, float) for k, v in data.items() if k not in bookkeeping)
    assert data["test/global_step"] == fitted.trainer.global_step


def test_oracle_scores_and_majority_baseline(fitted):
    results = fitted.callback.results
    labels = fitted.labels
    for stage in ("val", "test"):
        assert results[f"{stage}/acc/articleType"] == pytest.approx(1.0)
        assert results[f"{stage}/f1/baseColour"] == pytest.approx(1.0)
        assert results[f"{stage}/baseline/articleType"] == pytest.approx(32 / 64)
        colours = labels[:, 1][labels[:, 1] >= 0]
        assert results[f"{stage}/baseline/baseColour"] == pytest.approx(colours.bincount().max().item() / len(colours))
        assert results[f"{stage}/retrieval/map@10"] == pytest.approx(1.0)
        assert results[f"{stage}/retrieval_strict/map@10"] < 1.0
        assert results[f"{stage}/custom/n_texts"] == float(N_ITEMS)


def test_plots_are_written(fitted):
    names = sorted(p.name for p in (fitted.root / "plots").glob("*.png"))
    # masterCategory has only unknown labels, so neither its confusion matrix nor its PCA is drawn
    assert names == [f"{s}_{kind}_articleType.png" for s in ("test", "val") for kind in ("confusion", "pca")]


def test_csv_logger_receives_the_metrics(fitted):
    with open(Path(fitted.trainer.logger.log_dir) / "metrics.csv") as handle:
        header = next(csv.reader(handle))
    assert expected_keys("val") | expected_keys("test") <= set(header)


def test_nothing_is_logged_or_written_during_sanity_check(fitted):
    assert fitted.probe.files == []
    assert fitted.probe.logged == []


def test_missing_logits_and_embedding_leave_only_bookkeeping(tmp_path):
    callback = EvaluationCallback(enabled_stages=("val",))
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(
        OracleModule(with_logits=False, with_embedding=False, with_extra=False), dataloaders=loader(make_labels())
    )
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert set(data) == {"val/epoch", "val/global_step"}
    assert callback.results == {}
    assert not (tmp_path / "plots").exists()


def test_figures_reach_tensorboard(tmp_path):
    trainer = make_trainer(tmp_path, [EvaluationCallback()], logger_cls=TensorBoardLogger)
    trainer.validate(OracleModule(), dataloaders=loader(make_labels()))
    events = b"".join(p.read_bytes() for p in Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))
    assert b"val/confusion_articleType" in events and b"val/pca_articleType" in events


def test_val_plot_schedule():
    callback = EvaluationCallback(plot_every_n_val_epochs=2)
    fit = SimpleNamespace(fn="fit")
    due = [callback._plot_this_val_epoch(SimpleNamespace(state=fit, current_epoch=e, max_epochs=5)) for e in range(5)]
    assert due == [False, True, False, True, True]  # every 2nd epoch and the last
    assert callback._plot_this_val_epoch(SimpleNamespace(state=SimpleNamespace(fn="validate"))) is True


def test_write_metrics_json_merges_stages(tmp_path):
    path = tmp_path / "metrics.json"
    write_metrics_json(path, "val", {"val/acc/x": 0.5, "val/old": 1.0}, epoch=0, global_step=3)
    write_metrics_json(path, "test", {"test/acc/x": 0.25}, epoch=0, global_step=3)
    write_metrics_json(path, "val", {"val/acc/x": 0.75}, epoch=1, global_step=6)
    assert json.loads(path.read_text()) == {
        "test/acc/x": 0.25, "test/epoch": 0, "test/global_step": 3,
        "val/acc/x": 0.75, "val/epoch": 1, "val/global_step": 6,
    }  # fmt: skip


def test_merge_outputs_and_drop_duplicate_ids():
    part = {
        "labels": torch.tensor([[0], [1]]),
        "id": torch.tensor([7, 8]),
        "text": ["a", "b"],
        "logits": {"t": torch.eye(2)},
    }
    padded = {
        "labels": torch.tensor([[1]]),
        "id": torch.tensor([7]),
        "text": ["a-again"],
        "logits": {"t": torch.ones(1, 2)},
    }
    merged = drop_duplicate_ids(merge_outputs([part, padded]))
    assert merged["id"].tolist() == [7, 8]
    assert merged["text"] == ["a", "b"]
    assert torch.equal(merged["logits"]["t"], torch.eye(2))


def test_rejects_unknown_stage():
    with pytest.raises(ValueError):
        EvaluationCallback(enabled_stages=("train",))
