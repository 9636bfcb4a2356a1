"""fashion-export: ONNX graphs of both families checked against PyTorch, damaged folders refused in one line,
and runtime=onnx giving the PyTorch path's answers in fashion-index, fashion-recommend and fashion-serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip(
    "onnxruntime", reason="fashion-export needs the [export] extra: pip install 'fashion-lightning[export]'"
)
pytest.importorskip("onnx", reason="fashion-export needs the [export] extra: pip install 'fashion-lightning[export]'")

import torch  # noqa: E402

from fashion_lightning.deploy.bundle import FAMILIES, OnnxBundleError, read_bundle  # noqa: E402
from fashion_lightning.deploy.onnx_encoder import load_onnx_encoder  # noqa: E402
from fashion_lightning.models.base import load_module  # noqa: E402
from hydra_helpers import QUIET, make_cfg, train_and_index  # noqa: E402

pytestmark = pytest.mark.slow
ITEMS = 240
DATA = [f"data.num_items={ITEMS}", "data.num_workers=0"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    """A tiny trained multi-task model, its PyTorch index and its export (with a dynamic int8 graph)."""
    from fashion_lightning.apps.export import export

    root = tmp_path_factory.mktemp("export")
    index = train_and_index(root, ITEMS, epochs=3)
    model = root / "train" / "model"
    cfg = make_cfg("export", root / "export", root / "cache", [f"ckpt_path={model}", "quantize=dynamic", *DATA])
    onnx_dir = export(cfg)
    catalog = Path(json.loads((index / "manifest.json").read_text())["model"]["catalog"])
    return SimpleNamespace(root=root, cache=root / "cache", model=model, index=index, onnx=onnx_dir, catalog=catalog)


@pytest.fixture(scope="module")
def clip(work) -> SimpleNamespace:
    """A tiny CLIP (clip-tiny towers, zero-shot attributes) trained briefly, its export and its index."""
    from fashion_lightning.apps.export import export
    from fashion_lightning.apps.index import build
    from fashion_lightning.apps.train import train

    root = work.root / "clip"
    train(make_cfg("train", root / "train", work.cache, [
        "model=clip_openclip", "model.net.model_name=clip-tiny", "model.net.pretrained=null",
        "model.optimizer.lr=0.001", "data.train_transform=null", "trainer.max_epochs=2", "test=false", *DATA, *QUIET,
    ]))  # fmt: skip
    model = root / "train" / "model"
    onnx_dir = export(make_cfg("export", root / "export", work.cache, [f"ckpt_path={model}", "check_items=48", *DATA]))
    index = build(make_cfg("index", root / "index", work.cache, [f"ckpt_path={model}", *DATA,
                                                                   "+trainer.enable_progress_bar=false"]))  # fmt: skip
    return SimpleNamespace(model=model, onnx=onnx_dir, index=index)


def _photos(work, n: int) -> tuple[np.ndarray, list[int]]:
    from fashion_lightning.data.images import to_native

    paths = sorted((work.catalog / "images").glob("*.jpg"))[:n]
    natives = [to_native(p.read_bytes()) for p in paths]
    return np.ascontiguousarray(np.stack(natives).transpose(0, 3, 1, 2)), [int(p.stem) for p in paths]


def _cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- export + self-check ------------------------------------------------------------------------------------
def test_multitask_export_checks_itself_and_takes_any_batch(work):
    import onnx

    manifest = json.loads((work.onnx / "manifest.json").read_text())
    assert manifest["family"] == "multitask" and manifest["embedding_name"] == "multitask"
    assert set(manifest["files"]) == {"image.onnx", "image.int8.onnx", "preprocess.json"}
    assert manifest["check"]["images"] >= 20 and manifest["check"]["min_cosine"] >= 0.9999
    index_model = json.loads((work.index / "manifest.json").read_text())["model"]
    assert manifest["model_identity"] == index_model["model_identity"]  # the same weights the index holds
    onnx.checker.check_model(str(work.onnx / "image.onnx"))
    pre = json.loads((work.onnx / "preprocess.json").read_text())
    assert pre["input"]["height_width"] == [80, 60] and pre["resize"]["height_width"] == [40, 32]
    assert len(pre["normalize"]["mean"]) == 3 and min(pre["normalize"]["std"]) > 0

    module, encoder = load_module(work.model), load_onnx_encoder(work.onnx, threads=1)
    photos, _ = _photos(work, 9)
    for n in (1, 9):  # the batch axis is free
        ours, our_logits = encoder.image_outputs(photos[:n])
        with torch.inference_mode():
            theirs, their_logits = module.image_outputs(torch.from_numpy(photos[:n]))
        assert ours.shape == (n, theirs.shape[1]) and _cosine(ours, theirs.numpy()).min() >= 0.9999
        for task, logits in their_logits.items():
            np.testing.assert_array_equal(our_logits[task].argmax(1), logits.argmax(1).numpy())
    labels = encoder.predict_attributes(photos[:3])
    assert set(labels) == set(module.vocabs.tasks) and all(len(v) == 3 for v in labels.values())


def test_int8_graph_reports_its_accuracy_cost(work):
    int8 = json.loads((work.onnx / "manifest.json").read_text())["int8"]
    assert int8["file"] == "image.int8.onnx" and int8["method"] == "dynamic"
    report = int8["report"]
    assert report["items"] > 20 and "articleType" in report["accuracy"]
    for acc in report["accuracy"].values():
        assert 0 <= acc["fp32"] <= 1 and 0 <= acc["int8"] <= 1
        assert acc["delta_points"] == pytest.approx(100 * (acc["int8"] - acc["fp32"]))
    assert 0.5 <= report["overlap_at_10"] <= 1 and report["cosine"]["mean"] > 0.95
    int8_encoder = load_onnx_encoder(work.onnx, threads=1, precision="int8")
    photos, _ = _photos(work, 4)
    assert _cosine(int8_encoder.embed_images(photos), load_onnx_encoder(work.onnx).embed_images(photos)).min() > 0.9


def test_static_int8_calibrates_on_catalog_photos(work, tmp_path):
    from fashion_lightning.apps.export import export

    cfg = make_cfg("export", tmp_path / "run", work.cache, [
        f"ckpt_path={work.model}", "quantize=static", "calibration_items=32", "check_items=16", *DATA,
    ])  # fmt: skip
    int8 = json.loads((export(cfg) / "manifest.json").read_text())["int8"]
    assert int8["method"] == "static" and int8["calibration_items"] == 32
    assert 0.5 <= int8["report"]["overlap_at_10"] <= 1
    # the 8 layers kept fp32 are the most sensitive of the graph's convolutions, ranked on calibration photos
    kept = [layer["sensitivity"] for layer in int8["kept_fp32"]]
    assert int8["keep_fp32"] == 8 and len(kept) == 8 and kept == sorted(kept, reverse=True) and kept[0] > 0
    assert int8["sensitivity_items"] == 32


def test_clip_export_checks_image_and_text_towers(work, clip):
    manifest = json.loads((clip.onnx / "manifest.json").read_text())
    assert manifest["family"] == "clip" and 0 <= manifest["alpha"] <= 1
    assert {"image.onnx", "text.onnx", "preprocess.json"} <= set(manifest["files"])
    assert any(name.startswith("tokenizer/") for name in manifest["files"])
    check = manifest["check"]
    assert check["min_cosine"] >= 0.9999 and check["texts"] >= 20 and check["min_text_cosine"] >= 0.9999
    module, encoder = load_module(clip.model), load_onnx_encoder(clip.onnx, threads=1)
    texts = ["navy blue check shirt for men", "Titan Women Silver Watch", "", "x" * 500]  # empty and over-long too
    with torch.inference_mode():
        theirs = module.embed_texts(texts).numpy()
    assert _cosine(encoder.embed_texts(texts), theirs).min() >= 0.9999
    photos, _ = _photos(work, 5)
    with torch.inference_mode():
        items = module.embed_items({"image": torch.from_numpy(photos), "text": texts + ["red"]})
    ours = encoder.embed_items(photos, texts + ["red"])
    assert set(ours) == set(items) and _cosine(ours["embedding"], items["embedding"].numpy()).min() >= 0.9999


def test_failed_self_check_names_the_worst_item(work):
    """A PyTorch model that no longer matches the graphs (backbone nudged) fails the check, naming the item
    whose embeddings differ most."""
    from fashion_lightning.deploy.onnx_export import ExportCheckError, sample_from_loader, self_check

    module = load_module(work.model)
    photos, ids = _photos(work, 12)
    sample = sample_from_loader([{"image": torch.from_numpy(photos), "id": torch.tensor(ids)}], 12)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.net.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        nudged = module.embed_images(torch.from_numpy(photos)).numpy()
    worst = ids[int(np.argmin(_cosine(load_onnx_encoder(work.onnx).embed_images(photos), nudged)))]
    with pytest.raises(ExportCheckError, match=rf"self-check failed: item {worst} embeds with cosine 0\.\d+"):
        self_check(module, work.onnx, sample)


# -- damaged folders ----------------------------------------------------------------------------------------
def _copy(work, tmp_path: Path) -> Path:
    return Path(shutil.copytree(work.onnx, tmp_path / "onnx"))


def _edit_manifest(folder: Path, edit) -> Path:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(embed_dim=-1), "embed_dim must be an integer"),
    (lambda m: m.update(format="other"), "not a fashion-export folder"),
    (lambda m: m.update(family="os.system"), "family must be one of"),
    (lambda m: m["files"].update({"../escape.onnx": m["files"]["image.onnx"]}), "not a plain file name"),
    (lambda m: m["tasks"].update(articleType="Shirts"), "must be a list"),
    (lambda m: m["preprocess"].update(std=[0.5, 0.5, 0]), "preprocess.std must be a number"),
    (lambda m: m["files"]["preprocess.json"].update(sha256="0" * 64), "sha256 does not match"),
    (lambda m: m.update(model_identity="../../etc"), "model_identity must be a sha256"),
])  # fmt: skip
def test_edited_manifest_is_refused(work, tmp_path, edit, message):
    folder = _edit_manifest(_copy(work, tmp_path), edit)
    with pytest.raises(OnnxBundleError, match=message):
        load_onnx_encoder(folder)


def test_damaged_graph_and_wrong_model_are_refused(work, clip, tmp_path):
    folder = _copy(work, tmp_path)
    data = bytearray((folder / "image.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "image.onnx").write_bytes(bytes(data))
    with pytest.raises(OnnxBundleError, match=r"image.onnx: sha256 does not match"):
        load_onnx_encoder(folder)
    with pytest.raises(OnnxBundleError, match="exported from another model"):
        load_onnx_encoder(clip.onnx, identity=read_bundle(work.onnx).model_identity)
    with pytest.raises(OnnxBundleError, match="no int8 image graph"):
        load_onnx_encoder(clip.onnx, precision="int8")


def _cli(module: str, *args: str, tmp_path: Path, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASHION_LIGHTNING_CACHE": str(tmp_path / "cache")}
    argv = [*args, f"hydra.run.dir={tmp_path / 'run'}"]
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", module, *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _one_line(done: subprocess.CompletedProcess, marker: str, message: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if marker in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_apps_refuse_damaged_exports_with_one_line(work, tmp_path):
    damaged = _copy(work, tmp_path / "a")
    data = bytearray((damaged / "image.onnx").read_bytes())
    data[100] ^= 0xFF
    (damaged / "image.onnx").write_bytes(bytes(data))
    photo = sorted((work.catalog / "images").glob("*.jpg"))[0]
    done = _cli("fashion_lightning.apps.recommend", f"index_dir={work.index}", f"query.image={photo}", "gallery=false",
                "runtime=onnx", f"onnx_dir={damaged}", tmp_path=tmp_path / "r")  # fmt: skip
    _one_line(done, "fashion-recommend:", "image.onnx: sha256 does not match")
    edited = _edit_manifest(_copy(work, tmp_path / "b"), lambda m: m.update(embed_dim=10**9))
    done = _cli("fashion_lightning.apps.serve", f"index_dir={work.index}", "runtime=onnx", f"onnx_dir={edited}",
                tmp_path=tmp_path / "s")  # fmt: skip
    _one_line(done, "fashion-serve:", "embed_dim must be an integer")
    done = _cli("fashion_lightning.apps.index", f"ckpt_path={work.model}", "runtime=onnx", f"onnx_dir={edited}", *DATA,
                tmp_path=tmp_path / "i")  # fmt: skip
    output = done.stdout + done.stderr  # the Hydra apps log their one line
    assert done.returncode == 2 and "embed_dim must be an integer" in output and "Traceback" not in output


@pytest.mark.parametrize("value", ["-1", "eight", "1.5"])
def test_a_bad_keep_fp32_is_one_line_before_any_work(work, tmp_path, value):
    done = _cli("fashion_lightning.apps.export", f"ckpt_path={work.model}", "quantize=static",
                f"keep_fp32={value}", *DATA, tmp_path=tmp_path)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "keep_fp32=" in output and "whole number >= 0" in output, output[-2000:]
    assert "Traceback" not in output and not (tmp_path / "run" / "onnx").exists()


def test_missing_onnxruntime_is_one_line_naming_the_extra(work, tmp_path):
    code = "import sys; sys.modules['onnxruntime'] = None; sys.argv[0] = 'fashion-recommend'; " \
           "from fashion_lightning.apps.recommend import main; main()"  # fmt: skip
    done = _cli("", f"index_dir={work.index}", "query.text=red", "runtime=onnx", f"onnx_dir={work.onnx}",
                tmp_path=tmp_path, code=code)  # fmt: skip
    _one_line(done, "fashion-recommend:", "pip install 'fashion-lightning[export]'")


def test_bundle_families_are_the_registrys():
    from fashion_lightning.models.registry import families

    assert sorted(FAMILIES) == sorted(families())


# -- runtime=onnx gives PyTorch's answers -------------------------------------------------------------------
def _onnx_index(work, model: Path, onnx_dir: Path, name: str) -> Path:
    from fashion_lightning.apps.index import build

    return build(make_cfg("index", work.root / name, work.cache, [
        f"ckpt_path={model}", "runtime=onnx", f"onnx_dir={onnx_dir}", "onnx_threads=1", *DATA,
    ]))  # fmt: skip


def _same_top10(ours, theirs, tie: float = 1e-5) -> bool:
    """The same ranked ids; where they differ, only items whose scores tie within float noise swapped places
    (a collapsed tiny model has near-duplicate vectors). True when the lists are identical."""
    if ours.ids == theirs.ids:
        return True
    for a, b in zip(ours.results, theirs.results, strict=True):
        assert a.id == b.id or abs(a.score - b.score) < tie, (ours.ids, theirs.ids)
    return False


def _same_item_top10(torch_index: Path, onnx_index: Path) -> None:
    from fashion_lightning.retrieval import Recommender

    ours, theirs = Recommender.from_dir(onnx_index), Recommender.from_dir(torch_index)
    np.testing.assert_array_equal(ours.index.ids, theirs.index.ids)
    rows = np.arange(ours.index.n)
    assert _cosine(ours.index.vectors(rows), theirs.index.vectors(rows)).min() > 0.9999
    identical = [_same_top10(ours.by_item(int(i), k=10), theirs.by_item(int(i), k=10)) for i in theirs.index.ids]
    assert np.mean(identical) >= 0.95  # the rest differ only by swapped ties (checked above)


def test_index_and_recommend_with_onnx_match_pytorch(work, tmp_path):
    from fashion_lightning.apps.recommend import recommend

    onnx_index = _onnx_index(work, work.model, work.onnx, "index_onnx")
    assert "onnxruntime fp32" in json.loads((onnx_index / "manifest.json").read_text())["model"]["runtime"]
    _same_item_top10(work.index, onnx_index)
    photos = sorted((work.catalog / "images").glob("*.jpg"))[:4]
    for photo in photos:
        answers = [
            recommend(
                make_cfg(
                    "recommend",
                    tmp_path / f"{runtime}{photo.stem}",
                    work.cache,
                    [
                        f"index_dir={work.index}",
                        f"query.image={photo}",
                        "k=10",
                        "gallery=false",
                        f"runtime={runtime}",
                        f"onnx_dir={work.onnx}",
                    ],
                )
            )  # fmt: skip
            for runtime in ("torch", "onnx")
        ]
        assert _same_top10(answers[1], answers[0]) and answers[0].query["predicted"] == answers[1].query["predicted"]


def test_clip_index_and_text_queries_with_onnx_match_pytorch(work, clip, tmp_path):
    from fashion_lightning.apps.recommend import recommend

    onnx_index = _onnx_index(work, clip.model, clip.onnx, "clip_index_onnx")
    _same_item_top10(clip.index, onnx_index)
    for text in ("navy blue shirt for men", "black watch"):
        answers = [
            recommend(
                make_cfg(
                    "recommend",
                    tmp_path / f"{runtime}{len(text)}",
                    work.cache,
                    [
                        f"index_dir={clip.index}",
                        f"query.text='{text}'",
                        "k=10",
                        "gallery=false",
                        f"runtime={runtime}",
                        f"onnx_dir={clip.onnx}",
                    ],
                )
            )  # fmt: skip
            for runtime in ("torch", "onnx")
        ]
        _same_top10(answers[1], answers[0])


@pytest.mark.parametrize("inference", ["process", "thread"])
def test_serve_with_onnx_matches_pytorch(work, tmp_path, inference):
    """Photos sent at once get PyTorch's answers from ONNX Runtime in worker processes (which batch them) and in
    the server's threads (ONNX Runtime releases the GIL; the encoder's pass combiner batches them)."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from fashion_lightning.apps.serve import build

    photos = sorted((work.catalog / "images").glob("*.jpg"))[:6]
    answers = {}
    for runtime in ("torch", "onnx"):
        cfg = make_cfg("serve", tmp_path / runtime, work.cache, [
            f"index_dir={work.index}", f"runtime={runtime}", f"onnx_dir={work.onnx}", f"inference={inference}",
        ])  # fmt: skip
        with TestClient(build(cfg)) as client:

            def ask(photo: Path, client: TestClient = client) -> dict:
                files = {"photo": (photo.name, photo.read_bytes(), "image/jpeg")}
                return client.post("/recommend/image", files=files, data={"k": "10"}).json()

            with ThreadPoolExecutor(len(photos)) as clients:
                answers[runtime] = list(clients.map(ask, photos))
    for ours, theirs in zip(answers["onnx"], answers["torch"]):
        assert [r["id"] for r in ours["results"]] == [r["id"] for r in theirs["results"]]
        assert ours["query"]["predicted"] == theirs["query"]["predicted"]


def test_a_graph_pointing_at_external_files_is_refused_before_onnx_runtime(work, tmp_path):
    """Whoever edits a folder can re-sign its manifest; a graph whose weights name a file elsewhere (ONNX external
    data) must still never make the runtime read that file (issue 19's rule for files from elsewhere)."""
    import hashlib

    import onnx

    folder = _copy(work, tmp_path)
    model = onnx.load_from_string((folder / "image.onnx").read_bytes())
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../../secret.bin"), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    data = model.SerializeToString()
    (folder / "image.onnx").write_bytes(data)
    _edit_manifest(
        folder,
        lambda m: m["files"]["image.onnx"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()),
    )
    with pytest.raises(OnnxBundleError, match="points at an external file"):
        load_onnx_encoder(folder)
