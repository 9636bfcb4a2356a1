"""Recommender queries, filters, duplicates, odd photos, history, explanations, gallery and JSON,
on a synthetic catalog with a tiny fake encoder (no real model)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from rich.console import Console

from fashion_lightning.data import schema
from fashion_lightning.retrieval import FILTER_FIELDS, QueryError, RecommendationResult, Recommender, build_index
from fashion_lightning.retrieval.gallery import PANEL_INCHES, render_gallery, results_table
from fashion_lightning.retrieval.manifest import ModelLoadError, model_record

COLOURS = {"Navy Blue": (20, 30, 110), "Red": (200, 30, 30), "Black": (15, 15, 15), "White": (235, 235, 235)}
TYPES = {  # articleType -> (masterCategory, subCategory, stripe period in pixels)
    "Shirts": ("Apparel", "Topwear", 8),
    "Tshirts": ("Apparel", "Topwear", 16),
    "Jeans": ("Apparel", "Bottomwear", 40),
    "Watches": ("Accessories", "Watches", 0),
}
GENDERS = ("Men", "Women")
PER_CLASS = 5


def product_image(colour: str, article: str, gender: str, rng: np.random.Generator) -> np.ndarray:
    """80x60 photo: colour fill, article-specific stripes, gender marker, a little noise."""
    image = np.empty((80, 60, 3), np.float32)
    image[:] = COLOURS[colour]
    period = TYPES[article][2]
    if period:
        image[(np.arange(80) // (period // 2 or 1)) % 2 == 1] *= 0.55
    else:
        image[25:55, 15:45] = 128
    image[:10, :10] = 0 if gender == "Men" else 255
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def catalog() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    rows, images = [], []
    for (colour, article, gender), copy in itertools.product(
        itertools.product(COLOURS, TYPES, GENDERS), range(PER_CLASS)
    ):
        master, sub, _ = TYPES[article]
        images.append(product_image(colour, article, gender, rng))
        rows.append(
            {
                "id": 1000 + len(rows),
                "gender": gender,
                "masterCategory": master,
                "subCategory": sub,
                "articleType": article,
                "baseColour": colour,
                "season": "Summer",
                "usage": "Casual",
                "productDisplayName": f"{gender} {colour} {article} {copy}, style #{len(rows)}",
            }
        )
    frame = pd.DataFrame(rows)
    images = np.stack(images)
    images[[1, 2]] = images[0]  # items 1001, 1002: byte-identical copies of 1000's photo
    images[[158, 159]] = images[157]  # 1158, 1159 share 1157's photo
    frame["image_sha1"] = [hashlib.sha1(png_bytes(im)).hexdigest() for im in images]
    return frame, images


class FakeEncoder:
    """Mean colour + a random projection of the pooled pixels; bag-of-words texts; colour 'head'."""

    def __init__(self, dim: int = 48, text: bool = True, name: str = "fake") -> None:
        rng = np.random.default_rng(42)
        self.dim, self.text, self.embedding_name = dim, text, name
        self.projection = rng.standard_normal((20 * 15 * 3, dim - 3)).astype(np.float32) / 30
        self.image_calls = 0

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (3, 80, 60)
        x = images.float().numpy() / 255.0
        pooled = x.reshape(len(x), 3, 20, 4, 15, 4).mean(axis=(3, 5)).reshape(len(x), -1)
        feats = np.hstack([x.mean(axis=(2, 3)) * 3, (pooled - 0.5) @ self.projection])
        return torch.from_numpy(feats / np.linalg.norm(feats, axis=1, keepdims=True)).float()

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if not self.text:
            raise NotImplementedError("no text tower")
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                out[i] += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(self.dim)
        return torch.from_numpy(out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9))

    def predict_attributes(self, images: torch.Tensor) -> dict[str, list[str]]:
        means = images.float().numpy()[:, :, 20:, 20:].mean(axis=(2, 3))
        names = list(COLOURS)
        palette = np.array([COLOURS[c] for c in names], np.float32)
        dists = ((means[:, None, :] - palette[None] * 0.8) ** 2).sum(-1)
        return {"baseColour": [names[i] for i in dists.argmin(axis=1)]}


def embed_catalog(encoder: FakeEncoder, images: np.ndarray) -> np.ndarray:
    return encoder.embed_images(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.fixture(scope="module")
def recommender(catalog, tmp_path_factory) -> Recommender:
    frame, images = catalog
    encoder = FakeEncoder()
    out = tmp_path_factory.mktemp("index")
    build_index(embed_catalog(encoder, images), frame, out, {"embedding_name": "fake", "checkpoint": None})
    return Recommender.from_dir(out, encoder=encoder)


@pytest.fixture(scope="module")
def fused(catalog, tmp_path_factory) -> tuple[Recommender, float]:
    """A CLIP-like index: e = normalise(alpha u + (1 - alpha) v), parts u (image) and v (text) stored."""
    frame, images = catalog
    alpha, encoder = 0.6, FakeEncoder(name="fake_fused(alpha=0.6)")
    u = embed_catalog(encoder, images)
    v = encoder.embed_texts(frame["productDisplayName"].tolist()).numpy()
    e = alpha * u + (1 - alpha) * v
    out = tmp_path_factory.mktemp("fused")
    build_index(
        e,
        frame,
        out,
        {"embedding_name": encoder.embedding_name, "fusion_alpha": alpha},
        extra_vectors={"image_embedding": u, "text_embedding": v},
    )
    return Recommender.from_dir(out, encoder=encoder), alpha


def meta_of(frame: pd.DataFrame, item_id: int) -> dict:
    return frame.set_index("id").loc[item_id].to_dict()


def test_by_item_excludes_itself_and_duplicates_and_explains(recommender, catalog):
    frame, _ = catalog
    result = recommender.by_item(1000, k=8)
    assert len(result.results) == 8 and not {1000, 1001, 1002} & set(result.ids)
    query = meta_of(frame, 1000)
    assert result.results[0].metadata["articleType"] == query["articleType"]
    for rec in result.results:
        for field in ("gender", "articleType", "baseColour"):
            assert (field in rec.explanation.shared) == (rec.metadata[field] == query[field])
        assert rec.explanation.basis == "metadata" and rec.explanation.parts is None
    scores = [r.score for r in result.results]
    assert scores == sorted(scores, reverse=True) and [r.rank for r in result.results] == list(range(1, 9))


def test_results_show_each_image_once(recommender, catalog):
    result = recommender.by_item(1155, k=20)  # 1157 is a neighbour; 1158, 1159 copy its photo
    sha1s = [r.metadata["image_sha1"] for r in result.results]
    assert len(sha1s) == len(set(sha1s))
    assert len({1157, 1158, 1159} & set(result.ids)) == 1


def test_photo_query_excludes_exact_duplicates(recommender, catalog, tmp_path):
    frame, images = catalog
    path = tmp_path / "query.png"
    path.write_bytes(png_bytes(images[0]))
    result = recommender.by_images(path, k=5)
    assert not {1000, 1001, 1002} & set(result.ids)
    assert result.results[0].metadata["articleType"] == frame.loc[0, "articleType"]
    assert result.query["kind"] == "image" and result.query["predicted"]["baseColour"] == ["Navy Blue"]
    assert all(r.explanation.basis == "predicted" for r in result.results)
    assert any(r.explanation.shared.get("baseColour") == "Navy Blue" for r in result.results)
    several = recommender.by_images([images[3], images[4]], k=3)  # averaged, arrays accepted
    assert several.query["images"] == ["<ndarray #0>", "<ndarray #1>"]


def _save(image: Image.Image, path: Path, **kw) -> Path:
    image.save(path, **kw)
    return path


ODD_IMAGES = {
    "rgba": lambda rgb, p: _save(Image.fromarray(rgb).convert("RGBA"), p / "a.png"),
    "cmyk": lambda rgb, p: _save(Image.fromarray(rgb).convert("CMYK"), p / "c.jpg", format="JPEG"),
    "greyscale": lambda rgb, p: _save(Image.fromarray(rgb).convert("L"), p / "g.png"),
    "palette-transparent": lambda rgb, p: _save(Image.fromarray(rgb).convert("P"), p / "p.png", transparency=0),
    "16-bit": lambda rgb, p: _save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), p / "i16.png"),
    "4000x3000": lambda rgb, p: _save(Image.fromarray(rgb).resize((3000, 4000)), p / "big.jpg", quality=80),
    "pil-rgba": lambda rgb, p: Image.fromarray(rgb).convert("RGBA"),
    "array-rgba": lambda rgb, p: np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)]),
    "array-grey": lambda rgb, p: rgb[..., 0].copy(),
}


@pytest.mark.parametrize("kind", list(ODD_IMAGES))
def test_odd_photos_are_accepted(recommender, catalog, tmp_path, kind):
    _, images = catalog
    query = ODD_IMAGES[kind](images[10], tmp_path)
    result = recommender.by_images(query, k=3)
    assert len(result.results) == 3 and all(np.isfinite(r.score) for r in result.results)


def test_bad_photos_are_refused_clearly(recommender, tmp_path):
    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is not a jpeg")
    with pytest.raises(QueryError, match=r"holiday\.jpg: not a decodable image"):
        recommender.by_images(fake)
    with pytest.raises(QueryError, match="no such file"):
        recommender.by_images(tmp_path / "missing.jpg")
    with pytest.raises(QueryError, match="HxW"):
        recommender.by_images(np.zeros((4, 4, 2), np.uint8))


def test_by_text_and_its_explanation(fused):
    rec, _ = fused
    result = rec.by_text("red jeans for women", k=5)
    top = result.results[0]
    assert (top.metadata["baseColour"], top.metadata["articleType"]) == ("Red", "Jeans")
    assert top.explanation.shared["baseColour"] == "Red" and top.explanation.shared["articleType"] == "Jeans"
    assert {"red", "jean"} <= set(top.explanation.matched_tokens)


def test_text_needs_a_text_tower(catalog, tmp_path):
    frame, images = catalog
    encoder = FakeEncoder(text=False)
    build_index(embed_catalog(encoder, images), frame, tmp_path, {"embedding_name": "fake"})
    with pytest.raises(QueryError, match="text tower"):
        Recommender.from_dir(tmp_path, encoder=encoder).by_text("red shirt")


def test_fused_score_parts_sum_to_score(fused, catalog):
    rec, alpha = fused
    text_result = rec.by_text("navy blue shirts", k=6)
    for result in (rec.by_item(1005, k=6), text_result, rec.by_history([1003, 1010], k=6)):
        for r in result.results:
            parts = r.explanation.parts
            assert parts is not None and parts["image"] + parts["text"] == pytest.approx(r.score, abs=1e-5)
    # a text query matches through the items' text halves: that part dominates
    assert all(r.explanation.parts["text"] > r.explanation.parts["image"] for r in text_result.results)


def _brute_force(rec: Recommender, query_vec: np.ndarray, mask: np.ndarray, k: int) -> list[int]:
    vectors = rec.index.vectors()
    order = np.flatnonzero(mask)[np.argsort(-(vectors[mask] @ query_vec), kind="stable")]
    seen, out = set(), []
    for row in order:
        if rec.index.groups[row] not in seen:
            seen.add(rec.index.groups[row])
            out.append(int(rec.index.ids[row]))
    return out[:k]


@pytest.mark.parametrize(
    "filters",
    [
        {"gender": "Women"},
        {"masterCategory": "Apparel", "baseColour": ["Red", "Black"]},
        {"subCategory": "Topwear", "gender": "Men", "articleType": "Tshirts", "baseColour": "White"},
    ],
)
def test_filters_give_the_filtered_top_k(recommender, catalog, filters):
    frame, _ = catalog
    result = recommender.by_item(1000, k=6, filters=filters)
    assert result.results
    mask = np.ones(len(frame), bool)
    for field, value in filters.items():
        values = [value] if isinstance(value, str) else value
        assert all(r.metadata[field] in values for r in result.results)
        mask &= frame[field].isin(values).to_numpy()
    mask &= ~frame["image_sha1"].isin(frame.loc[[0], "image_sha1"]).to_numpy()
    query = recommender.index.vectors(np.array([0]))[0]
    assert result.ids == _brute_force(recommender, query, mask, 6)


def test_filter_validation(recommender):
    with pytest.raises(QueryError, match=r"unknown filter 'colour'.*baseColour"):
        recommender.by_item(1000, filters={"colour": "Red"})
    with pytest.raises(QueryError, match=r"filters.baseColour='Navyblue' matches no item.*'Navy Blue'"):
        recommender.by_item(1000, filters={"baseColour": "Navyblue"})
    with pytest.raises(QueryError, match="no item in the index matches all filters"):
        recommender.by_item(1000, filters={"articleType": "Watches", "subCategory": "Topwear"})
    result = recommender.by_item(1000, k=3, filters={"gender": "men", "baseColour": None, "usage": []})
    assert result.query["filters"] == {"gender": ["Men"]}  # case-insensitive, empty filters ignored
    assert FILTER_FIELDS == schema.FILTER_FIELDS  # one list, in data/schema.py


def test_unknown_ids_and_bad_queries(recommender):
    with pytest.raises(QueryError, match=r"unknown item id\(s\) \[7\]; the index holds 160 items"):
        recommender.by_item(7)
    with pytest.raises(QueryError, match="exactly one of"):
        recommender.recommend(item_id=1000, text="red")
    with pytest.raises(QueryError, match="both liked and disliked"):
        recommender.by_history([1000, 1003], disliked=[1003])
    with pytest.raises(QueryError, match="k must be"):
        recommender.by_item(1000, k=0)


def _class_share(result: RecommendationResult, article: str) -> float:
    return np.mean([r.metadata["articleType"] == article for r in result.results])


def test_history_likes_and_dislikes_move_results(recommender, catalog):
    frame, _ = catalog
    ids = frame.set_index(["baseColour", "articleType", "gender"])["id"]
    jeans = ids.loc[("Red", "Jeans", "Men")].tolist()[:2]
    shirts = ids.loc[("Red", "Shirts", "Men")].tolist()[:2]
    k = 5  # classes hold 5 items, so shares over a short list are what can move
    only_shirts = recommender.by_history(shirts, k=k)
    base = recommender.by_history(shirts + jeans, k=k)  # liking jeans too pulls jeans in
    assert _class_share(base, "Jeans") > _class_share(only_shirts, "Jeans")
    assert not set(jeans + shirts) & set(base.ids)
    other_shirts = ids.loc[("Red", "Shirts", "Women")].tolist()[:2]  # "but not shirts like these"
    pushed = recommender.by_history(shirts + jeans, k=k, disliked=other_shirts)
    assert _class_share(pushed, "Shirts") < _class_share(base, "Shirts")
    assert _class_share(pushed, "Jeans") > _class_share(base, "Jeans")
    assert not set(other_shirts) & set(pushed.ids)
    # recency: the same likes, jeans most recent vs shirts most recent
    jeans_last = recommender.by_history(shirts + jeans, k=k, half_life=0.5)
    shirts_last = recommender.by_history(jeans + shirts, k=k, half_life=0.5)
    assert _class_share(jeans_last, "Jeans") > _class_share(shirts_last, "Jeans")
    assert jeans_last.query["weights"][-1] > jeans_last.query["weights"][0]
    top = base.results[0].explanation
    assert top.basis == "history" and top.shared["baseColour"] == "Red" and top.support["baseColour"] == 1.0


def test_encoder_is_loaded_only_for_photo_and_text(catalog, tmp_path):
    frame, images = catalog
    encoder = FakeEncoder()
    model_info = {"embedding_name": "fake", "checkpoint": "x.ckpt"}
    build_index(embed_catalog(encoder, images), frame, tmp_path, model_info)
    loads = []
    rec = Recommender.from_dir(tmp_path, encoder_loader=lambda: loads.append(1) or encoder)
    rec.by_item(1000), rec.by_history([1000, 1004])
    assert loads == []
    rec.by_images(images[5])
    rec.by_images(images[6])
    assert loads == [1]
    with pytest.raises(ModelLoadError, match="no longer exists"):
        Recommender.from_dir(tmp_path).by_images(images[5])
    damaged = tmp_path / "d" / "damaged.ckpt"  # inside the folder (a model outside it is refused earlier)
    damaged.parent.mkdir()
    damaged.write_bytes(b"PK\x03\x04 not a checkpoint")
    record = model_record(damaged, tmp_path / "d")  # a file that was never a checkpoint: sizes match
    build_index(embed_catalog(encoder, images), frame, tmp_path / "d", {**model_info, **record})
    with pytest.raises(ModelLoadError, match="cannot load the index's model .*damaged.ckpt"):
        Recommender.from_dir(tmp_path / "d").by_images(images[5])


@pytest.mark.parametrize("k", ["abc", 2.5, True, "3", 0, -1])
def test_k_must_be_a_positive_whole_number(recommender, k):
    with pytest.raises(QueryError, match="k must be"):
        recommender.by_item(1000, k=k)


@pytest.mark.parametrize(
    "filters, message",
    [
        ({"gender": 2015}, r"filters.gender=2015: filter values are names.*e.g. filters.gender='(Men|Women)'"),
        ({"baseColour": ["Red", 3]}, "filter values are names"),
        ({"year": 2015}, "unknown filter 'year'"),
    ],
)
def test_non_string_filters_are_refused(recommender, filters, message):
    with pytest.raises(QueryError, match=message):
        recommender.by_item(1000, filters=filters)


def test_encoder_must_match_the_index(recommender, catalog, tmp_path):
    _, images = catalog
    other = Recommender(recommender.index, encoder=FakeEncoder(dim=16))
    with pytest.raises(QueryError, match=r"\(16,\) but the index holds 48-d"):
        other.by_images(images[0])
    renamed = Recommender(recommender.index, encoder=FakeEncoder(name="clip_fused(alpha=0.7)"))
    with pytest.raises(QueryError, match="'clip_fused"):
        renamed.by_images(images[0])


def test_saved_json_is_the_result(recommender, fused, tmp_path):
    results = (recommender.by_item(1000, k=4, filters={"gender": "Men"}), fused[0].by_text("black watch", k=3))
    for result in results:
        saved = json.loads(result.save(tmp_path / "r.json").read_text())
        assert saved == json.loads(result.to_json()) and saved["query"] == result.query
        assert [r["id"] for r in saved["results"]] == result.ids
        assert saved["results"][0]["explanation"]["basis"] == result.results[0].explanation.basis
        assert {"search_ms", "total_ms"} <= set(result.timings)


def test_photo_query_is_one_forward_pass(recommender, catalog):
    """Encoders with embed_and_predict answer a photo query with one network call, not two."""
    _, images = catalog
    calls = []

    class OnePass(FakeEncoder):
        def embed_and_predict(self, batch):
            calls.append(len(batch))
            return self.embed_images(batch), self.predict_attributes(batch)

        def predict_attributes(self, batch):
            calls.append("predict")
            return super().predict_attributes(batch)

    encoder = OnePass()
    result = Recommender(recommender.index, encoder=encoder).by_images(images[5], k=3)
    assert calls == [1, "predict"] and encoder.image_calls == 1
    assert result.query["predicted"]["baseColour"]


def test_photo_over_the_pixel_limit_is_refused(recommender, catalog, tmp_path, monkeypatch):
    from fashion_lightning.retrieval.queries import PhotoTooLargeError

    _, images = catalog
    path = _save(Image.fromarray(images[0]).resize((300, 400)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 400 // 3)  # > 2x: PIL raises
    with pytest.raises(PhotoTooLargeError, match="big.png"):
        recommender.by_images(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 400 * 2 // 3)  # 1x..2x: PIL only warns; refused too
    with pytest.raises(PhotoTooLargeError):
        recommender.by_images(path.read_bytes())


@pytest.mark.parametrize("k, columns, expected_panels", [(5, 6, (6, 1)), (9, 4, (4, 3))])
def test_gallery_png(recommender, fused, catalog, tmp_path, k, columns, expected_panels):
    _, images = catalog
    loader = lambda item_id: images[item_id - 1000]  # noqa: E731
    cols, rows = expected_panels
    for name, result, kwargs in (
        ("item", recommender.by_item(1000, k=k), {}),
        ("text", fused[0].by_text("navy blue shirt for men", k=k), {}),
        ("photo", recommender.by_images(images[7], k=k), {"query_images": [images[7]]}),
        ("history", recommender.by_history([1000, 1010, 1020], k=k), {}),
    ):
        out = render_gallery(result, tmp_path / f"{name}.png", loader, columns=columns, dpi=50, **kwargs)
        with Image.open(out) as png:
            assert png.size == (round(cols * PANEL_INCHES[0] * 50), round(rows * PANEL_INCHES[1] * 50))
    missing = render_gallery(recommender.by_item(1000, k=2), tmp_path / "m.png", lambda i: 1 / 0, dpi=30)
    assert missing.stat().st_size > 0


def test_results_table(fused):
    result = fused[0].by_text("red jeans", k=4)
    console = Console(record=True, width=200)
    console.print(results_table(result))
    text = console.export_text()
    assert "red jeans" in text and "image / text part" in text and str(result.ids[0]) in text


def test_loaded_encoder_reports_without_loading(catalog, tmp_path):
    """What serve reads (is a model up? its batch size, its close()) never loads the model itself."""
    frame, images = catalog
    encoder = FakeEncoder()
    build_index(embed_catalog(encoder, images), frame, tmp_path, {"embedding_name": "fake", "checkpoint": "x.ckpt"})
    loads = []
    rec = Recommender.from_dir(tmp_path, encoder_loader=lambda: loads.append(1) or encoder)
    assert rec.loaded_encoder is None and loads == []
    rec.by_images(images[5])
    assert rec.loaded_encoder is encoder and loads == [1]
    assert Recommender(rec.index, encoder).loaded_encoder is encoder
