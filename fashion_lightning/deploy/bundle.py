"""The ONNX export folder: what ``manifest.json`` records and how a folder is checked against it.

A folder written by ``fashion-export``::

    onnx/
      image.onnx          uint8 [B, 3, 80, 60] native photos -> embedding [B, D] + logits_<task> [B, C_task]
      image.int8.onnx     optional (quantize=dynamic|static): the same graph in int8
      text.onnx           CLIP only: int64 token ids [B, L] -> embedding [B, D]
      tokenizer/          CLIP only: the tokenizer's own files (vocabulary, merges, settings: data, no code)
      preprocess.json     what the image graph does first: native size, resize, mean/std (for other runtimes)
      manifest.json       format, model identity, tasks and labels, graph names, sizes + sha256 of every file

The manifest is written last and every file is checked against it (size + sha256) before any byte reaches
ONNX Runtime, whose sessions are built from those same verified bytes (never from a path, so a graph cannot
pull in external data from elsewhere). Nothing here imports onnx, onnxruntime or torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fashion_lightning.data.images import NATIVE_HW
from fashion_lightning.retrieval.manifest import ModelLoadError
from fashion_lightning.utils.atomic import atomic_write_text
from fashion_lightning.utils.bounded import Limits, load_json_or

FORMAT = "fashion-lightning-onnx"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
IMAGE_FILE = "image.onnx"
IMAGE_INT8_FILE = "image.int8.onnx"
TEXT_FILE = "text.onnx"
PREPROCESS_FILE = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
IMAGE_INPUT = "images"
TEXT_INPUT = "tokens"
EMBEDDING_OUTPUT = "embedding"
LOGITS_PREFIX = "logits_"
PRECISIONS = ("fp32", "int8")
TOKENIZER_KINDS = ("hf", "clip_bpe")
QUANTIZE_METHODS = ("dynamic", "static")
MANIFEST_LIMITS = Limits(max_depth=8, max_nodes=400_000, max_string=4096, max_bytes=16 * 2**20)
FAMILIES = ("multitask", "clip")  # models/registry.py's families, named here so reading stays torch-free (tested)
MAX_FILE_BYTES = 2**31 - 1  # one protobuf file (no external data): ONNX's own ceiling
MAX_DIM = 65_536
MAX_TASKS = 64
MAX_CLASSES = 100_000
MAX_CONTEXT = 4096
_NAME = re.compile(rf"(?:{TOKENIZER_DIR}/)?[A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class OnnxBundleError(ModelLoadError):
    """An export folder that cannot be used: missing, edited, damaged or out of bounds (message names it)."""


class MissingRuntimeError(OnnxBundleError):
    """onnx / onnxruntime are not installed (they come with the ``[export]`` extra)."""


def require(module: str) -> Any:
    """Import ``onnxruntime`` / ``onnx`` / ``onnxruntime.quantization``, or one line naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingRuntimeError(
            f"{top} is not installed: ONNX export and runtime=onnx need it; pip install 'fashion-lightning[export]'"
        ) from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": sha256_bytes(data)}


@dataclass(frozen=True)
class Preprocess:
    """What the image graph does before the network (recorded for runtimes outside this package)."""

    native_hw: tuple[int, int]  # what the graph takes: letterboxed catalog-size photos, uint8 RGB, NCHW
    input_hw: tuple[int, int]  # what the network sees after the resize
    mean: tuple[float, float, float]  # on the 0..1 scale
    std: tuple[float, float, float]
    resize: str = "bilinear, align_corners=False, no antialias (torch.nn.functional.interpolate)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": {"name": IMAGE_INPUT, "dtype": "uint8", "layout": "NCHW RGB", "height_width": self.native_hw},
            "letterbox": f"keep aspect ratio, pad with white to {self.native_hw[0]}x{self.native_hw[1]} (h x w)",
            "resize": {"height_width": self.input_hw, "mode": self.resize},
            "normalize": {"mean": self.mean, "std": self.std, "formula": "(x / 255 - mean) / std"},
        }


@dataclass
class OnnxBundle:
    """A checked export folder (see module doc); ``graph(name)`` returns a verified graph's bytes."""

    root: Path
    family: str
    embedding_name: str
    embed_dim: int
    model_identity: str
    tasks: dict[str, list[str]]
    alpha: float | None  # CLIP: the catalog embedding fuses image and text with this share
    preprocess: Preprocess
    text: dict[str, Any] | None  # {"file", "context_length", "tokenizer": {"kind", ...}}
    int8: dict[str, Any] | None  # {"file", "method", ...}
    files: dict[str, dict[str, Any]]
    record: dict[str, Any] = field(repr=False)

    def graph(self, name: str) -> bytes:
        """The file's bytes after checking them against the manifest (the bytes ORT then parses)."""
        return read_verified(self.root, name, self.files)

    def image_file(self, precision: str = "fp32") -> str:
        if precision not in PRECISIONS:
            raise OnnxBundleError(f"onnx precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "int8":
            if self.int8 is None:
                raise OnnxBundleError(
                    f"{self.root}: has no int8 image graph; export it with fashion-export quantize=dynamic|static"
                )
            return str(self.int8["file"])
        return IMAGE_FILE


def read_verified(root: Path, name: str, files: Mapping[str, Mapping[str, Any]]) -> bytes:
    record = files.get(name)
    path = root / name
    if record is None:
        raise OnnxBundleError(f"{root / MANIFEST_FILE}: lists no size and sha256 for {name}")
    if not path.is_file():
        raise OnnxBundleError(f"{path}: listed in {MANIFEST_FILE} but missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise OnnxBundleError(
            f"{path}: {size} bytes, but {MANIFEST_FILE} recorded {record['bytes']} (truncated or replaced)"
        )
    data = path.read_bytes()
    if sha256_bytes(data) != record["sha256"]:
        raise OnnxBundleError(
            f"{path}: sha256 does not match {MANIFEST_FILE}: the file is damaged or was edited; export again"
        )
    return data


def write_manifest(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Record the size + sha256 of every file in ``root`` (recursively), then write the manifest last."""
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    files = {name: file_record(root / name) for name in names}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, **record, "files": files}
    check_record(manifest, root / MANIFEST_FILE)  # what a reader would refuse is never written
    atomic_write_text(root / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_bundle(path: str | Path, verify: bool = True) -> OnnxBundle:
    """The export folder at ``path``, its manifest parsed with limits and checked; with ``verify`` every
    listed file's size + sha256 too (graphs are checked again, as bytes, when a session is built)."""
    root = Path(path).expanduser()
    where = root / MANIFEST_FILE
    if not root.is_dir():
        raise OnnxBundleError(f"onnx_dir {root}: no such folder (write one with fashion-export)")
    record = load_json_or(
        where,
        MANIFEST_LIMITS,
        missing=lambda: OnnxBundleError(f"{where}: missing, so {root} is not a fashion-export folder"),
        refused=lambda why: OnnxBundleError(f"refusing {where}: {why}"),
    )
    check_record(record, where)
    if verify:
        for name in record["files"]:
            if name.endswith(".onnx"):
                continue  # read_verified when the session is built: hashed once, from the bytes ORT gets
            read_verified(root, name, record["files"])
    pre = record["preprocess"]
    return OnnxBundle(
        root=root,
        family=record["family"],
        embedding_name=record["embedding_name"],
        embed_dim=record["embed_dim"],
        model_identity=record["model_identity"],
        tasks={task: list(labels) for task, labels in record["tasks"].items()},
        alpha=record.get("alpha"),
        preprocess=Preprocess(
            tuple(pre["native_hw"]),
            tuple(pre["input_hw"]),
            tuple(pre["mean"]),
            tuple(pre["std"]),
        ),
        text=record.get("text"),
        int8=record.get("int8"),
        files=record["files"],
        record=record,
    )


def check_record(data: Any, where: Path | str) -> None:
    """Types and bounds of every field a reader uses, so an edited manifest is refused in one line."""

    def fail(what: str) -> NoReturn:
        raise OnnxBundleError(f"{where}: {what}"[:500])

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    def integer(value: Any, name: str, low: int, high: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            fail(f"{name} must be an integer in [{low}, {high}], got {short(value)}")
        return value

    def number(value: Any, name: str, low: float, high: float) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            fail(f"{name} must be a number in [{low}, {high}], got {short(value)}")
        return float(value)

    def string(value: Any, name: str) -> str:
        if not isinstance(value, str) or not value:
            fail(f"{name} must be a non-empty string, got {short(value)}")
        return value

    def obj(value: Any, name: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            fail(f"{name} must be an object, got {type(value).__name__}")
        return value

    obj(data, "the manifest")
    if data.get("format") != FORMAT:
        fail(f"format is {short(data.get('format'))}, expected {FORMAT!r} (not a fashion-export folder)")
    if data.get("version") != FORMAT_VERSION:
        fail(f"version {short(data.get('version'))} is not supported (this release reads {FORMAT_VERSION})")
    if data.get("family") not in FAMILIES:
        fail(f"family must be one of {FAMILIES}, got {short(data.get('family'))}")
    string(data.get("embedding_name"), "embedding_name")
    integer(data.get("embed_dim"), "embed_dim", 1, MAX_DIM)
    if not isinstance(data.get("model_identity"), str) or not _SHA256.fullmatch(data["model_identity"]):
        fail("model_identity must be a sha256 hex digest")
    tasks = obj(data.get("tasks"), "tasks")
    if len(tasks) > MAX_TASKS:
        fail(f"more than {MAX_TASKS} tasks")
    for task, labels in tasks.items():
        if not isinstance(labels, list) or not 1 <= len(labels) <= MAX_CLASSES:
            fail(f"tasks.{short(task)} must be a list of 1..{MAX_CLASSES} labels")
        if not all(isinstance(label, str) for label in labels):
            fail(f"tasks.{short(task)} holds a label that is not a string")
    if data.get("alpha") is not None:
        number(data["alpha"], "alpha", 0.0, 1.0)
    pre = obj(data.get("preprocess"), "preprocess")
    for key in ("native_hw", "input_hw"):
        hw = pre.get(key)
        if not isinstance(hw, list) or len(hw) != 2:
            fail(f"preprocess.{key} must be [height, width]")
        for value in hw:
            integer(value, f"preprocess.{key}", 1, MAX_CONTEXT)
    if list(pre["native_hw"]) != list(NATIVE_HW):
        fail(f"preprocess.native_hw is {pre['native_hw']}, this release feeds {list(NATIVE_HW)} photos")
    for key, low, high in (("mean", 0.0, 1.0), ("std", 1e-6, 10.0)):
        values = pre.get(key)
        if not isinstance(values, list) or len(values) != 3:
            fail(f"preprocess.{key} must hold 3 numbers")
        for value in values:
            number(value, f"preprocess.{key}", low, high)
    files = obj(data.get("files"), "files")
    for name, rec in files.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
            fail(f"files: {short(name)} is not a plain file name of this folder")
        rec = obj(rec, f"files.{name}")
        integer(rec.get("bytes"), f"files.{name}.bytes", 0, MAX_FILE_BYTES)
        if not isinstance(rec.get("sha256"), str) or not _SHA256.fullmatch(rec["sha256"]):
            fail(f"files.{name}.sha256 must be a sha256 hex digest")
    for name in (IMAGE_FILE, PREPROCESS_FILE):
        if name not in files:
            fail(f"lists no {name}")
    text = data.get("text")
    if text is not None:
        text = obj(text, "text")
        if text.get("file") != TEXT_FILE or TEXT_FILE not in files:
            fail(f"text.file must be {TEXT_FILE!r} and listed in files")
        integer(text.get("context_length"), "text.context_length", 1, MAX_CONTEXT)
        tokenizer = obj(text.get("tokenizer"), "text.tokenizer")
        if tokenizer.get("kind") not in TOKENIZER_KINDS:
            fail(f"text.tokenizer.kind must be one of {TOKENIZER_KINDS}, got {short(tokenizer.get('kind'))}")
        if not any(name.startswith(f"{TOKENIZER_DIR}/") for name in files):
            fail(f"lists no {TOKENIZER_DIR}/ files for its text graph")
    elif data["family"] == "clip":
        fail("a clip export needs its text graph (text)")
    int8 = data.get("int8")
    if int8 is not None:
        int8 = obj(int8, "int8")
        if int8.get("file") != IMAGE_INT8_FILE or IMAGE_INT8_FILE not in files:
            fail(f"int8.file must be {IMAGE_INT8_FILE!r} and listed in files")
        if int8.get("method") not in QUANTIZE_METHODS:
            fail(f"int8.method must be one of {QUANTIZE_METHODS}, got {short(int8.get('method'))}")
