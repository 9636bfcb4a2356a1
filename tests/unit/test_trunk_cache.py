"""Cached partial trunks (model.cache_trunk): the split is exact, the cache is content-keyed, resumable and
self-repairing, cached training is the same math as uncached training, and the saved model is whole."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch

from fashion_lightning.data import trunk_cache
from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.transforms import default_train_transform
from fashion_lightning.data.trunk_cache import CachedTrunkDataset, ensure_trunk_cache, view_for
from fashion_lightning.models.multitask import MultiTaskNet
from fashion_lightning.models.multitask_module import MultiTaskModule
from fashion_lightning.models.spec import SpecError, validate_hparams
from fashion_lightning.models.trunk import TrunkEncoder, TrunkSplit, num_groups
from hydra_helpers import QUIET, TINY_MODEL, make_cfg

NET = {"_target_": "fashion_lightning.models.multitask.MultiTaskNet", "backbone": "test_resnet", "image_size": [40, 32]}


class CountingEncoder:
    """A TrunkEncoder that counts the images it encodes (how much of a build actually ran)."""

    def __init__(self, encoder: TrunkEncoder) -> None:
        self.encoder, self.fingerprint, self.images = encoder, encoder.fingerprint, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        return self.encoder(images)


def _encoder(backbone: str = "test_resnet", cut: int = 2, seed: int = 0) -> tuple[MultiTaskNet, CountingEncoder]:
    torch.manual_seed(seed)
    net = MultiTaskNet({"a": 3}, backbone=backbone, image_size=(40, 32)).eval()
    return net, CountingEncoder(TrunkEncoder(net, TrunkSplit(net.backbone, cut)))


@pytest.fixture(scope="module")
def train_items(synthetic_dm_kwargs: dict):
    dm = FashionDataModule(**synthetic_dm_kwargs)
    dm.setup("fit")
    return dm.datasets["train"]


# --- the split ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_upper_of_lower_is_the_whole_backbone_at_every_cut(backbone: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=0).eval()
    x = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        whole = model(x)
        for cut in range(num_groups(model) + 1):
            split = TrunkSplit(model, cut)
            assert torch.allclose(split.upper(split.lower(x)), whole, atol=1e-5), cut
    with pytest.raises(ValueError, match="cut must be in"):
        TrunkSplit(model, num_groups(model) + 1)
    with pytest.raises(ValueError, match="supports timm"):
        TrunkSplit(torch.nn.Linear(2, 2), 0)


def test_spec_bounds_cache_trunk() -> None:
    base = {"net": NET, "vocabs": {"a": ["x", "y"]}}
    ok = validate_hparams("multitask", {**base, "cache_trunk": {"cut": 2, "views": 4}})
    assert ok["cache_trunk"] == {"cut": 2, "views": 4}
    for bad in ({"cut": -1}, {"cut": 2, "views": 0}, {"cut": 2, "dtype": "int8"}, {"cut": 2, "path": "/x"}):
        with pytest.raises(SpecError):
            validate_hparams("multitask", {**base, "cache_trunk": bad})


# --- the cache ----------------------------------------------------------------------------------
def test_cache_is_content_keyed(train_items, tmp_path: Path) -> None:
    net, enc = _encoder()
    aug = default_train_transform()
    cache = ensure_trunk_cache(train_items, enc, tmp_path, views=2, transform=aug, seed=1)
    assert cache.shape[:2] == (len(train_items), 2) and enc.images == 2 * len(train_items) + 1  # + the shape probe
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["shape"] == list(cache.shape) and meta["dtype"] == "float16"
    array = cache.open()
    assert not np.array_equal(array[:, 0], array[:, 1])  # two different augmented views
    again = ensure_trunk_cache(train_items, enc, tmp_path, views=2, transform=aug, seed=1)
    assert again.path == cache.path and enc.images == 2 * len(train_items) + 1  # reused, nothing recomputed
    assert ensure_trunk_cache(train_items, enc, tmp_path, views=3, transform=aug, seed=1).path != cache.path
    assert ensure_trunk_cache(train_items, enc, tmp_path, views=2, transform=aug, seed=2).path != cache.path
    _, other_weights = _encoder(seed=1)
    assert ensure_trunk_cache(train_items, other_weights, tmp_path, views=2, transform=aug, seed=1).path != cache.path
    _, other_cut = _encoder(cut=3)
    assert ensure_trunk_cache(train_items, other_cut, tmp_path, views=2, transform=aug, seed=1).path != cache.path
    plain = ensure_trunk_cache(train_items, enc, tmp_path, views=4, transform=None)  # no augmentation: one view
    assert plain.views == 1


class Killed(Exception):
    pass


def test_killed_build_resumes_and_damaged_chunk_is_rebuilt(train_items, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(trunk_cache, "CHUNK_ITEMS", 16)
    chunks = -(-len(train_items) // 16)
    assert chunks >= 4
    aug = default_train_transform()
    _, reference_enc = _encoder()
    reference = ensure_trunk_cache(train_items, reference_enc, tmp_path / "ref", views=2, transform=aug, seed=3)
    expected = np.array(reference.open())

    def kill_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Killed

    _, enc = _encoder()
    with pytest.raises(Killed):
        ensure_trunk_cache(train_items, enc, tmp_path / "run", views=2, transform=aug, seed=3, progress=kill_after_two)
    folder = next(p for p in (tmp_path / "run" / "trunk").iterdir() if p.is_dir())
    assert not (folder / "meta.json").exists()  # an unfinished build is never taken for a finished one
    enc.images = 0
    cache = ensure_trunk_cache(train_items, enc, tmp_path / "run", views=2, transform=aug, seed=3)
    assert enc.images == 2 * (len(train_items) - 2 * 16)  # only the chunks the killed build had not finished
    np.testing.assert_array_equal(np.array(cache.open()), expected)  # resumed == built in one go

    # flip bytes inside chunk 2: the next open detects it by checksum and recomputes that chunk only
    with open(cache.data_path, "r+b") as handle:
        handle.seek(2 * 16 * int(np.prod(cache.shape[1:])) * 2 + 100)
        handle.write(b"\x7f\x7f\x7f\x7f")
    enc.images = 0
    repaired = ensure_trunk_cache(train_items, enc, tmp_path / "run", views=2, transform=aug, seed=3)
    assert enc.images == 2 * 16
    np.testing.assert_array_equal(np.array(repaired.open()), expected)


def test_cached_dataset_shows_one_view_per_item_per_epoch(train_items, tmp_path: Path) -> None:
    _, enc = _encoder()
    cache = ensure_trunk_cache(train_items, enc, tmp_path, views=3, transform=default_train_transform(), seed=0)
    dataset = CachedTrunkDataset(cache, train_items)
    item = dataset[(5, 1234)]
    view = view_for(1234, 5, 3)
    np.testing.assert_array_equal(item["activation"].numpy(), cache.open()[5, view])
    assert int(item["id"]) == int(train_items.ids[5]) and torch.equal(item["labels"], train_items.labels[5])
    seen = {view_for(seed, 5, 3) for seed in range(50)}
    assert seen == {0, 1, 2}  # every view is drawn over epochs
    np.testing.assert_array_equal(dataset[5]["activation"].numpy(), cache.open()[5, 0])  # eval: view 0


# --- the math: cached == uncached ----------------------------------------------------------------
def test_top_of_network_on_cached_activations_equals_the_full_network(train_items, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MultiTaskModule(NET, {"a": ["x", "y", "z"]}, cache_trunk={"cut": 2}).eval()
    encoder = TrunkEncoder(module.net, module.trunk)
    cache = ensure_trunk_cache(train_items, encoder, tmp_path, views=1)  # fp16
    images = torch.stack([torch.from_numpy(train_items.image(i).transpose(2, 0, 1).copy()) for i in range(8)])
    activations = torch.from_numpy(np.array(cache.open()[:8, 0]))
    with torch.no_grad():
        whole_logits, whole_emb = module.net(images)
        logits, emb = module.net.head_forward(module._features({"activation": activations}))
        live_logits, _ = module.net.head_forward(module._features({"image": images}))
    assert torch.allclose(live_logits["a"], whole_logits["a"], atol=1e-5)  # computing the cut live is exact
    assert torch.allclose(logits["a"], whole_logits["a"], atol=2e-2, rtol=1e-2)  # fp16 storage
    assert torch.allclose(emb, whole_emb, atol=2e-2)


class StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit(
    dm_kwargs: dict, cache: bool, epochs: int = 2, channels_last: bool = False
) -> tuple[list[float], MultiTaskModule, FashionDataModule, dict]:
    L.seed_everything(0)
    dm = FashionDataModule(**dm_kwargs)
    dm.setup("fit")
    if not cache:
        dm.use_trunk_cache = lambda *args, **kwargs: None  # type: ignore[method-assign]  # serve images
    module = MultiTaskModule(
        {**NET, "channels_last": channels_last}, dm.vocabs, dm.class_weights,
        cache_trunk={"cut": 2, "views": 1, "dtype": "float32"},
        optimizer={"lr": 0.01}, param_groups={"backbone_lr_ratio": 1.0},
    )  # fmt: skip
    losses, initial = fit_recording_losses(module, dm, epochs)
    return losses, module, dm, initial


def fit_recording_losses(module: L.LightningModule, dm: FashionDataModule, epochs: int) -> tuple[list[float], dict]:
    """Train deterministically without validation: (the loss of every step, the state dict before training)."""
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    record = StepLosses()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record], limit_val_batches=0, deterministic=True,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return record.losses, initial


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cached_training_equals_uncached_training_step_by_step(
    synthetic_dm_kwargs: dict, tmp_path: Path, channels_last: bool
) -> None:
    kwargs = {**synthetic_dm_kwargs, "cache_dir": str(tmp_path), "train_transform": None}
    uncached, _, dm_u, _ = _fit(kwargs, cache=False, channels_last=channels_last)
    cached, module, dm_c, initial = _fit(kwargs, cache=True, channels_last=channels_last)
    assert not dm_u._trunk_datasets and "train" in dm_c._trunk_datasets  # the cached run really read the cache
    assert len(cached) == len(uncached) >= 6
    np.testing.assert_allclose(cached, uncached, atol=1e-5, rtol=0)
    lower = {id(p) for p in module.trunk.lower_parameters()}
    state = module.state_dict(keep_vars=True)
    for name, value in state.items():  # below the cut nothing moved (weights and BN statistics); above it did
        if id(value) in lower or name.startswith(
            ("net.backbone.conv1", "net.backbone.bn1", "net.backbone.layer1", "net.backbone.layer2")
        ):
            assert torch.equal(value.detach(), initial[name]), name
    assert not torch.equal(state["net.heads.articleType.weight"].detach(), initial["net.heads.articleType.weight"])
    top = "net.backbone.layer4.0.conv1.weight"
    assert not torch.equal(state[top].detach(), initial[top])


# --- a real run: learns, and the saved model is the whole network ---------------------------------
@pytest.mark.slow
def test_cached_run_learns_and_its_artefact_is_the_whole_network(tmp_path: Path, cache_dir: Path) -> None:
    from fashion_lightning.apps.eval import evaluate
    from fashion_lightning.apps.train import train
    from fashion_lightning.models.base import load_module

    overrides = [
        *TINY_MODEL, "data.num_items=360", "trainer.max_epochs=6", "model.cache_trunk={cut:1,views:3}",
        "callbacks.evaluation.plot_every_n_val_epochs=100", "callbacks.model_checkpoint.save_last=false", *QUIET,
    ]  # fmt: skip
    # cut 1: test_resnet is randomly initialised, and frozen random layers (zero-initialised residual branches)
    # leave too little to learn from above cut 2; pretrained trunks are cut higher (README "Cached partial trunks")
    metrics = train(make_cfg("train", tmp_path / "run", cache_dir, overrides))
    lifts = {t: metrics[f"test/acc/{t}"] - metrics[f"test/baseline/{t}"] for t in ("articleType", "masterCategory")}
    assert all(lift > 0.15 for lift in lifts.values()), lifts
    assert any((cache_dir / "trunk").glob("*/meta.json"))

    model_dir = tmp_path / "run" / "model"
    module = load_module(model_dir)
    assert module.hparams.cache_trunk is None and module.trunk is None  # inference runs images through everything
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == set(module.state_dict())  # the checkpoint holds the whole network too
    evaluated = evaluate(make_cfg("eval", tmp_path / "eval", cache_dir, [
        f"ckpt_path={model_dir}", "data.num_items=360", "data.num_workers=0", "callbacks.rich_progress_bar=null",
    ]))  # fmt: skip
    for task in ("articleType", "masterCategory"):  # whole network on images ~= top on fp16 cached activations
        assert abs(evaluated[f"test/acc/{task}"] - metrics[f"test/acc/{task}"]) < 0.03, task


def test_cached_recipe_builds_a_valid_lite0_module(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from fashion_lightning.models.base import checked_hparams, plain

    cfg = make_cfg("train", tmp_path / "run", tmp_path / "cache", ["experiment=kaggle_offline_cached", "data.root=/x"])
    assert list(cfg.model.net.image_size) == [224, 168] and cfg.model.ema and cfg.data.num_workers == 0
    cfg.model.net.pretrained = False  # the structure is what matters here; the packaged weights load elsewhere
    tasks = ("articleType", "baseColour", "gender", "masterCategory", "season", "subCategory")
    module = instantiate(cfg.model, vocabs={task: ["a", "b"] for task in tasks})
    assert module.trunk is not None and module.trunk.cut == cfg.model.cache_trunk.cut
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert 0.5 < trainable / sum(p.numel() for p in module.parameters()) < 1.0  # most of lite0 still trains
    assert checked_hparams("multitask", plain(dict(module.hparams)), "recipe")["cache_trunk"]["cut"] == 5


KILLED_BUILD = """
import json, os, signal, sys
import torch
from fashion_lightning.data import trunk_cache
from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.transforms import default_train_transform
from fashion_lightning.models.multitask import MultiTaskNet
from fashion_lightning.models.trunk import TrunkEncoder, TrunkSplit

trunk_cache.CHUNK_ITEMS = 16
dm = FashionDataModule(**json.loads(sys.argv[1]))
dm.setup("fit")
torch.manual_seed(0)
net = MultiTaskNet({"a": 3}, backbone="test_resnet", image_size=(40, 32)).eval()
encoder = TrunkEncoder(net, TrunkSplit(net.backbone, 2))

def die(done, total):
    if done == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the build

trunk_cache.ensure_trunk_cache(dm.datasets["train"], encoder, sys.argv[2], views=2,
                               transform=default_train_transform(), seed=3, progress=die)
"""


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes(
    synthetic_dm_kwargs: dict, train_items, tmp_path: Path, monkeypatch
) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, json.dumps(synthetic_dm_kwargs), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    folder = next(p for p in (tmp_path / "trunk").iterdir() if p.is_dir())
    assert not (folder / "meta.json").exists() and len(list((folder / "chunks").glob("*.sha1"))) == 2
    monkeypatch.setattr(trunk_cache, "CHUNK_ITEMS", 16)
    _, enc = _encoder()
    cache = ensure_trunk_cache(train_items, enc, tmp_path, views=2, transform=default_train_transform(), seed=3)
    assert cache.path == folder and enc.images == 2 * (len(train_items) - 2 * 16)  # resumed after the 2 chunks
    _, fresh = _encoder()
    reference = ensure_trunk_cache(
        train_items, fresh, tmp_path / "ref", views=2, transform=default_train_transform(), seed=3
    )
    np.testing.assert_array_equal(np.array(cache.open()), np.array(reference.open()))
