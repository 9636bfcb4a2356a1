"""fashion-train / fashion-eval end to end on the synthetic catalog with a tiny backbone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fashion_lightning.apps.eval import evaluate
from fashion_lightning.apps.train import train
from fashion_lightning.models.base import load_module
from hydra_helpers import QUIET, TINY_MODEL, make_cfg

TINY = [
    *TINY_MODEL,
    "data.train_transform=null",
    "callbacks.evaluation.plot_every_n_val_epochs=100",
    *QUIET,
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short fit shared by the tests below (the expensive part)."""
    root = tmp_path_factory.mktemp("train")
    cfg = make_cfg("train", root / "run", root / "cache", TINY + ["data.num_items=360", "trainer.max_epochs=6"])
    metrics = train(cfg)
    return cfg, metrics, root


@pytest.mark.slow
def test_fit_learns_well_above_majority_baseline(trained_run):
    _, metrics, _ = trained_run
    lifts = {
        t: metrics[f"test/acc/{t}"] - metrics[f"test/baseline/{t}"]
        for t in ("articleType", "baseColour", "masterCategory")
    }
    assert all(lift > 0.2 for lift in lifts.values()), lifts


@pytest.mark.slow
def test_metrics_json_has_documented_keys(trained_run):
    cfg, _, _ = trained_run
    written = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    for stage in ("val", "test"):
        for task in cfg.data.tasks:
            for kind in ("acc", "f1", "baseline"):
                assert f"{stage}/{kind}/{task}" in written
        for family in ("retrieval", "retrieval_strict"):
            for metric in ("precision", "hit_rate", "map", "ndcg"):
                for k in (1, 5, 10):
                    assert f"{stage}/{family}/{metric}@{k}" in written
    run = Path(cfg.paths.output_dir)
    assert (run / "checkpoints" / "last.ckpt").exists() and Path(written["best_checkpoint"]).exists()
    for name in ("data_report.json", "splits.csv", "vocab.json"):
        assert (run / name).exists(), name
    assert list((run / "plots").glob("test_pca_*.png")) and list((run / "plots").glob("test_confusion_*.png"))


@pytest.mark.slow
def test_checkpoint_restores_for_inference(trained_run):
    cfg, _, _ = trained_run
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    torch.load(ckpt, map_location="cpu", weights_only=True)  # plain hparams: safe to load
    module = load_module(str(ckpt))
    images = torch.randint(0, 256, (3, 3, 80, 60), dtype=torch.uint8)
    emb = module.embed_images(images)
    assert emb.shape[0] == 3 and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    attrs = module.predict_attributes(images)
    assert set(attrs) == set(cfg.data.tasks) and all(len(v) == 3 for v in attrs.values())
    with pytest.raises(NotImplementedError, match="no text encoder"):
        module.embed_texts(["a red shirt"])


@pytest.mark.slow
def test_resume_continues_at_same_step_with_same_optimizer_state(trained_run):
    cfg, _, root = trained_run
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    seen = {}

    import lightning as L

    class CaptureResume(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = trainer.global_step
            seen["epoch"] = trainer.current_epoch
            state = trainer.optimizers[0].state_dict()
            seen["exp_avg"] = [s["exp_avg"].clone() for s in state["state"].values()][:3]
            seen["sched"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch

    cfg2 = make_cfg(
        "train",
        root / "resumed",
        root / "cache",
        TINY + ["data.num_items=360", "trainer.max_epochs=7", f"ckpt_path={ckpt}", "test=false"],
    )
    from omegaconf import open_dict

    with open_dict(cfg2):
        cfg2.callbacks.capture = {"_target_": f"{__name__}.CaptureResumeFactory"}
    global CaptureResumeFactory
    CaptureResumeFactory = CaptureResume  # noqa: N806 - instantiated by Hydra from this module
    train(cfg2)
    saved_state = saved["optimizer_states"][0]["state"]
    assert seen["step"] == saved["global_step"] and seen["epoch"] == saved["epoch"] + 1
    assert seen["sched"] == saved["lr_schedulers"][0]["last_epoch"]
    for got, want in zip(seen["exp_avg"], [s["exp_avg"] for s in saved_state.values()][:3]):
        assert torch.equal(got, want)


@pytest.mark.slow
def test_eval_on_external_catalog_reports_unseen_labels(trained_run, tmp_path):
    cfg, _, root = trained_run
    from fashion_lightning.data.synthetic import ensure_synthetic_catalog

    source = ensure_synthetic_catalog(root / "cache", 360, 0)
    external = tmp_path / "external"
    shutil.copytree(source, external)
    styles = external / "styles.csv"
    lines = styles.read_text().splitlines()
    lines = [lines[0]] + [ln.replace(",Tshirts,", ",Kurtas,", 1) for ln in lines[1:]]
    styles.write_text("\n".join(lines) + "\n")
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    ecfg = make_cfg(
        "eval",
        tmp_path / "eval_run",
        root / "cache",
        [
            f"ckpt_path={ckpt}",
            "data=kaggle",
            f"data.root={external}",
            "data.split=all",
            "data.num_workers=0",
            "logger=csv",
            "callbacks.rich_progress_bar=null",
            "+trainer.enable_progress_bar=false",
        ],
    )
    metrics = evaluate(ecfg)
    assert metrics["unseen_labels"]["articleType"]["Kurtas"] > 10
    assert metrics["eval_items"] > 300
    written = json.loads((tmp_path / "eval_run" / "metrics.json").read_text())
    assert written["unseen_labels"] == metrics["unseen_labels"] and "test/acc/articleType" in written
