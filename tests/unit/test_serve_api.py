"""fashion-serve's API through FastAPI's TestClient: every endpoint, every bad input, concurrent requests.

The index is the recommender tests' synthetic catalog with their fake encoder (no model to train), so
these run in seconds; the browser test (tests/e2e) serves a real trained checkpoint.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_recommender import FakeEncoder, catalog, embed_catalog, fused, png_bytes  # noqa: F401 (fixtures)

from fashion_lightning.retrieval import ModelLoadError, Recommender, build_index
from fashion_lightning.serve import ServeSettings, create_app

MAX_UPLOAD = 64 * 1024


@pytest.fixture(scope="module")
def served(catalog, tmp_path_factory):  # noqa: F811 (imported fixture)
    """(client, catalog frame, images) over a plain index and (client) over a fused (CLIP-like) one."""
    frame, images = catalog
    encoder = FakeEncoder()
    out = tmp_path_factory.mktemp("serve_index")
    build_index(embed_catalog(encoder, images), frame, out, {"embedding_name": "fake", "checkpoint": None})
    recommender = Recommender.from_dir(out, encoder=encoder)
    reader = lambda item_id: png_bytes(images[item_id - 1000]) if item_id != 1003 else None  # noqa: E731
    settings = ServeSettings(max_k=50, default_k=7, max_upload_bytes=MAX_UPLOAD)
    return TestClient(create_app(recommender, reader, settings)), frame, images


@pytest.fixture(scope="module")
def client(served) -> TestClient:
    return served[0]


@pytest.fixture(scope="module")
def fused_client(fused) -> TestClient:  # noqa: F811
    return TestClient(create_app(fused[0], None))


def _photo(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _detail(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail  # one line, for people
    return detail


# -- read-only endpoints ---------------------------------------------------------------------
def test_health_info_and_docs(client):
    assert client.get("/health").json() == {"status": "ok", "items": 160}
    info = client.get("/info").json()
    assert info["index"]["count"] == 160 and info["index"]["dim"] == 48 and info["index"]["type"] == "flat"
    assert info["index"]["bytes"]["vectors.faiss"] > 160 * 48 * 4
    assert set(info["filters"]["gender"]) == {"Men", "Women"} and "Navy Blue" in info["filters"]["baseColour"]
    assert info["limits"].items() >= {"max_k": 50, "default_k": 7, "max_upload_bytes": MAX_UPLOAD}.items()
    assert info["limits"]["max_history"] == 1000 and info["limits"]["max_json_depth"] == 8  # documented defaults
    assert info["model"]["embedding_name"] == "fake" and info["text_queries"] is False
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/recommend/image", "/items/{item_id}", "/items/{item_id}/image", "/health", "/info"} <= set(
        paths
    )


def test_shop_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="results"' in page.text and "/static/app.js" in page.text
    for asset, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = client.get(asset)
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_items_metadata_and_photo(served):
    client, frame, images = served
    item = client.get("/items/1005").json()
    assert item == {**frame.set_index("id").loc[1005].to_dict(), "id": 1005}
    photo = client.get("/items/1005/image")
    assert photo.headers["content-type"] == "image/png" and "max-age" in photo.headers["cache-control"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(photo.content))), images[5])
    assert client.get("/items/7").status_code == 404 and "unknown item id 7" in _detail(client.get("/items/7"))
    assert client.get("/items/7/image").status_code == 404
    assert client.get("/items/1003/image").status_code == 404  # in the index, but the catalog has no photo
    assert client.get("/items/abc").status_code == 422


def test_browse_with_filters(client):
    page = client.get("/items", params={"limit": 5}).json()
    assert page["total"] == 160 and len(page["items"]) == 5 and len({i["id"] for i in page["items"]}) == 5
    women = client.get("/items", params={"limit": 50, "filters": '{"gender": "women"}'}).json()
    assert women["total"] == 80 and women["filters"] == {"gender": ["Women"]}
    assert {i["gender"] for i in women["items"]} == {"Women"}
    for params, status in (
        ({"limit": 0}, 422),
        ({"limit": 51}, 422),
        ({"offset": -1}, 422),
        ({"filters": "{gender"}, 422),
        ({"filters": "[1]"}, 422),
        ({"filters": '{"colour": "Red"}'}, 422),
    ):
        response = client.get("/items", params=params)
        assert response.status_code == status, params
        _detail(response)


# -- POST /recommend ---------------------------------------------------------------------------
def test_recommend_item_history_and_filters(client):
    result = client.post("/recommend", json={"item_id": 1000}).json()
    assert len(result["results"]) == 7 and not {1000, 1001, 1002} & {r["id"] for r in result["results"]}
    assert result["query"]["kind"] == "item" and {"search_ms", "total_ms", "server_ms"} <= set(result["timings"])
    first = result["results"][0]
    assert first["rank"] == 1 and first["explanation"]["basis"] == "metadata" and first["metadata"]["id"] == first["id"]
    filtered = client.post(
        "/recommend", json={"item_id": 1000, "k": 4, "filters": {"gender": "Women", "baseColour": ["Red", "Black"]}}
    ).json()
    assert all(
        r["metadata"]["gender"] == "Women" and r["metadata"]["baseColour"] in ("Red", "Black")
        for r in filtered["results"]
    )
    history = client.post(
        "/recommend", json={"history": [1000, 1010], "disliked": [1020], "half_life": 2, "k": 5}
    ).json()
    assert history["query"]["liked"] == [1000, 1010] and history["query"]["disliked"] == [1020]
    assert not {1000, 1010, 1020} & {r["id"] for r in history["results"]}


def test_text_queries_on_a_fused_index(fused_client, client):
    result = fused_client.post("/recommend", json={"text": "red jeans for women", "k": 3}).json()
    assert result["results"][0]["metadata"]["articleType"] == "Jeans"
    assert result["results"][0]["explanation"]["parts"] is not None
    assert fused_client.get("/info").json()["text_queries"] is True
    response = fused_client.get("/items/1000/image")
    assert response.status_code == 404  # no catalog reader configured
    # the plain index's encoder has a text tower, but its manifest does not say CLIP: the API still answers
    assert client.post("/recommend", json={"text": "red shirt"}).status_code == 200


BAD_RECOMMEND = [
    ({}, 422, "exactly one of"),
    ({"item_id": 1000, "text": "red"}, 422, "exactly one of"),
    ({"item_id": 7}, 404, "unknown item id"),
    ({"history": [1000, 99]}, 404, "unknown item id"),
    ({"item_id": 1000, "k": 0}, 422, "k must be between 1 and 50"),
    ({"item_id": 1000, "k": 51}, 422, "k must be between 1 and 50"),
    ({"item_id": 1000, "k": 2.5}, 422, "k:"),
    ({"item_id": 1000, "k": "3"}, 422, "k:"),
    ({"item_id": "1000"}, 422, "item_id:"),
    ({"item_id": 1000, "filters": {"colour": "Red"}}, 422, "unknown filter 'colour'"),
    ({"item_id": 1000, "filters": {"gender": 2015}}, 422, "filters.gender"),
    ({"item_id": 1000, "filters": {"baseColour": "Navyblue"}}, 422, "close matches"),
    ({"item_id": 1000, "filters": {"articleType": "Watches", "subCategory": "Topwear"}}, 422, "no item in the index"),
    ({"item_id": 1000, "colour": "Red"}, 422, "colour:"),
    ({"item_id": 1000, "disliked": [1003]}, 422, "disliked ids only go with a history"),
    ({"item_id": 1000, "half_life": 2}, 422, "half_life only goes with a history"),
    ({"history": [1000], "half_life": 0}, 422, "half_life:"),
    ({"history": [1000, 1003], "disliked": [1003]}, 422, "both liked and disliked"),
    ({"history": []}, 422, "exactly one of"),
    ({"text": "   "}, 422, "the text query is empty"),
]


@pytest.mark.parametrize("body, status, message", BAD_RECOMMEND)
def test_bad_recommend_requests_get_a_one_line_4xx(client, body, status, message):
    response = client.post("/recommend", json=body)
    assert response.status_code == status
    assert message in _detail(response)


def test_malformed_json_body(client):
    response = client.post("/recommend", content=b"{item_id: 1", headers={"content-type": "application/json"})
    assert response.status_code == 422
    _detail(response)


# -- POST /recommend/image ---------------------------------------------------------------------
def test_photo_upload(served):
    client, frame, images = served
    files = {"photo": ("navy_shirt.jpg", _photo(images[0], "JPEG"), "image/jpeg")}
    result = client.post("/recommend/image", files=files, data={"k": "4", "filters": '{"gender": "Men"}'}).json()
    assert len(result["results"]) == 4 and result["query"]["images"] == ["navy_shirt.jpg"]
    assert result["query"]["predicted"]["baseColour"] == ["Navy Blue"] and result["query"]["filters"] == {
        "gender": ["Men"]
    }
    assert all(r["metadata"]["gender"] == "Men" for r in result["results"])
    assert "encode_ms" in result["timings"]
    exact = client.post("/recommend/image", files={"photo": ("p.png", png_bytes(images[0]), "image/png")}).json()
    assert not {1000, 1001, 1002} & {r["id"] for r in exact["results"]}  # its byte-identical copies


def test_bad_uploads(served, monkeypatch):
    client, _, images = served
    cases = [
        ({"photo": ("notes.txt", b"this is not a photo", "text/plain")}, {}, 422, "not a decodable image"),
        ({"photo": ("empty.jpg", b"", "image/jpeg")}, {}, 422, "empty"),
        ({"photo": ("huge.bmp", b"BM" + bytes(MAX_UPLOAD), "image/bmp")}, {}, 413, "upload limit"),
        ({"photo": ("p.png", png_bytes(images[0]), "image/png")}, {"k": "0"}, 422, "k must be"),
        ({"photo": ("p.png", png_bytes(images[0]), "image/png")}, {"k": "two"}, 422, "k:"),
        ({"photo": ("p.png", png_bytes(images[0]), "image/png")}, {"filters": "gender=Men"}, 422, "filters: not JSON"),
        ({"photo": ("p.png", png_bytes(images[0]), "image/png")}, {"filters": '{"year": 2015}'}, 422, "filters.year"),
        ({}, {"k": "3"}, 422, "photo:"),
    ]
    for files, data, status, message in cases:
        response = client.post("/recommend/image", files=files or None, data=data)
        assert response.status_code == status, (files, data, response.text)
        assert message in _detail(response)
    big = _photo(np.zeros((400, 300, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 300 // 3)
    response = client.post("/recommend/image", files={"photo": ("bomb.png", big, "image/png")})
    assert response.status_code == 413 and "exceeds limit" in _detail(response)
    assert client.get("/health").status_code == 200  # nothing took the server down


def test_model_that_cannot_load_is_a_503(catalog, tmp_path):  # noqa: F811
    frame, images = catalog
    build_index(embed_catalog(FakeEncoder(), images), frame, tmp_path, {"embedding_name": "fake"})

    def broken():
        raise ModelLoadError("cannot load the index's model x.ckpt: damaged")

    client = TestClient(create_app(Recommender.from_dir(tmp_path, encoder_loader=broken)))
    response = client.post("/recommend/image", files={"photo": ("p.png", png_bytes(images[0]), "image/png")})
    assert response.status_code == 503 and "damaged" in _detail(response)
    assert client.post("/recommend", json={"item_id": 1000}).status_code == 200  # id queries need no model


def test_concurrent_requests_match_sequential_ones(served):
    client, _, images = served
    requests = [("item", 1000 + i) for i in range(0, 160, 9)] + [("photo", i) for i in range(0, 160, 23)]

    def ask(request):
        kind, value = request
        if kind == "item":
            response = client.post("/recommend", json={"item_id": value, "k": 5})
        else:
            response = client.post(
                "/recommend/image", files={"photo": ("p.png", png_bytes(images[value]), "image/png")}, data={"k": "5"}
            )
        assert response.status_code == 200, response.text
        return [r["id"] for r in response.json()["results"]]

    sequential = [ask(r) for r in requests]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, requests * 2)) == sequential * 2


def test_a_slow_search_does_not_hold_up_other_requests(served, monkeypatch):
    """Item / history searches run off the event loop: while one is busy, /health still answers."""
    recommender = served[0].app.state.serve.recommender
    entered, gate, finished = threading.Event(), threading.Event(), threading.Event()
    search = recommender.recommend

    def slow_search(**kwargs):
        entered.set()
        gate.wait(10)  # released by the test once /health has answered (or after 10 s if the loop is stuck)
        finished.set()
        return search(**kwargs)

    monkeypatch.setattr(recommender, "recommend", slow_search)
    # one event loop for both requests (a TestClient outside `with` starts a loop per request)
    with TestClient(served[0].app) as client, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.post, "/recommend", json={"item_id": 1000, "k": 3})
        assert entered.wait(10)
        health = client.get("/health")
        answered_while_busy = not finished.is_set()
        gate.set()
        assert busy.result(10).status_code == 200
    assert health.status_code == 200 and answered_while_busy
