"""The evaluation callback in a simulated DDP run (2 CPU processes, gloo): whole-split metrics.

Two ranks each see half of the test split (the DistributedSampler pads the odd item by
repeating one); the callback gathers every rank's outputs, drops the padding by id, and so
must write exactly the metrics a single process writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fashion_lightning.callbacks.evaluation import EvaluationCallback
from fashion_lightning.data.vocab import LabelVocabs

N_ITEMS = 23  # odd: rank 1's shard is padded with a repeated item
VOCABS = LabelVocabs.from_dict({"articleType": ["Shirts", "Tshirts", "Jeans"], "baseColour": ["Black", "White"]})


class Items(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(N_ITEMS, 6, generator=g)
        self.labels = torch.stack([torch.arange(N_ITEMS) % 3, torch.arange(N_ITEMS) % 2], dim=1)
        self.labels[5, 1] = -1  # an unknown label: ignored by the metrics on every rank

    def __len__(self) -> int:
        return N_ITEMS

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.labels[i], "id": torch.tensor(1000 + i)}


class TinyModule(L.LightningModule):
    """Logits + an embedding per item, as both model families return them from ``test_step``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(6, 8)
        self.vocabs = VOCABS
        self.embedding_name = "tiny"

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        emb = self.layer(batch["x"])
        logits = {"articleType": emb[:, :3], "baseColour": emb[:, 3:5]}
        return {"labels": batch["labels"], "id": batch["id"], "logits": logits, "embedding": emb}

    def test_dataloader(self) -> DataLoader:
        return DataLoader(Items(), batch_size=4, shuffle=False)


def _run(out: Path, devices: int) -> dict:
    callback = EvaluationCallback(
        output_dir=str(out), confusion_tasks=(), pca_attributes=(), retrieval_ks=(1, 5),
        strict_columns=("articleType", "baseColour"), plot_every_n_val_epochs=0,
    )  # fmt: skip
    kwargs = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **kwargs,
    )
    trainer.test(TinyModule())
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_two_process_gather_equals_one_process(tmp_path):
    single = _run(tmp_path / "one", devices=1)
    double = _run(tmp_path / "two", devices=2)
    keys = {k for k in single if not k.endswith(("/epoch", "/global_step"))}
    assert {
        "test/acc/articleType",
        "test/f1/baseColour",
        "test/retrieval/map@5",
        "test/retrieval_strict/ndcg@5",
    } <= keys
    assert keys == {k for k in double if not k.endswith(("/epoch", "/global_step"))}
    for key in sorted(keys):
        assert double[key] == pytest.approx(single[key], abs=1e-6), key
