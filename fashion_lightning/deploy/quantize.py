"""int8 image graphs (ONNX Runtime quantization) and what they cost in accuracy, measured, not assumed.

``dynamic``: the matrix products' weights stored as int8, activations quantized per batch at run time (no
calibration; for transformer towers). ``static``: activations' ranges calibrated once on catalog photos (QDQ,
per-channel weights): the faster kind on CPUs with VNNI, and the one that can lose more, so the layers that
lose most (a per-layer sensitivity search on the calibration photos) stay fp32. Either way the report
compares the int8 graph with the fp32 one on labelled photos (the validation split): per-task accuracy of
both, and retrieval overlap@10 (how many of an item's 10 nearest neighbours among the same photos stay the
same), so a user can decide.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fashion_lightning.deploy.bundle import (
    IMAGE_FILE,
    IMAGE_INPUT,
    IMAGE_INT8_FILE,
    read_bundle,
    require,
    write_manifest,
)

IGNORE_INDEX = -100
OVERLAP_K = 10


# Static: the convolutions and transformer matmuls carry the time; the heads (Gemm), the preprocessing and the
# normalisation stay fp32, and so do the ``keep_fp32`` layers whose int8 version alone moves the outputs most
# on the calibration photos (the sensitivity search below). Measured on the lite0 model of README's Results
# (512 catalog photos, int8 vs fp32): the stem and the first depthwise convolution stand out (1 - cosine 0.088
# and 0.041, the next 0.005); first + last conv fp32 (the old rule) gave mean cosine 0.937 and overlap@10 0.750,
# the 8 most sensitive fp32 0.994 and 0.913, at 0.87x the all-int8 graph's speed.
STATIC_OPS = ("Conv", "MatMul")
# Dynamic: weights int8, activations quantized per batch at run time: only matrix products (transformer
# towers, heads). Dynamic convolutions (ConvInteger) measured both slower than fp32 and far off it on lite0
# (mean cosine 0.77, articleType -7.3 points).
DYNAMIC_OPS = ("MatMul", "Gemm")
KEEP_FP32 = 8
SENSITIVITY_ITEMS = 64


class _Photos:
    """onnxruntime's CalibrationDataReader over uint8 photos, ``batch`` at a time."""

    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self.batches = [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images), batch)]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return {IMAGE_INPUT: self.batches.pop(0)} if self.batches else None

    def rewind(self) -> None:  # ORT >= 1.18 may call it; the reader is used once
        pass


def quantize_image(
    folder: Path, method: str, calibration: np.ndarray | None, keep_fp32: int = KEEP_FP32, threads: int | None = None
) -> dict[str, Any]:
    """Write ``image.int8.onnx`` beside ``image.onnx``; returns what the manifest records about it (static: the
    layers kept fp32 and their sensitivity)."""
    quant = require("onnxruntime.quantization")
    source, target = folder / IMAGE_FILE, folder / IMAGE_INT8_FILE
    logging.getLogger("root").setLevel(logging.WARNING)  # ORT's quantizer logs every node at INFO
    if method == "dynamic":
        quant.quantize_dynamic(
            str(source), str(target), weight_type=quant.QuantType.QInt8, op_types_to_quantize=list(DYNAMIC_OPS)
        )
        return {"ops": list(DYNAMIC_OPS)}
    if method != "static":
        raise ValueError(f"quantize must be dynamic or static, got {method!r}")
    if calibration is None or not len(calibration):
        raise ValueError("quantize=static needs calibration photos (calibration_items > 0)")
    if not isinstance(keep_fp32, int) or isinstance(keep_fp32, bool) or keep_fp32 < 0:
        raise ValueError(f"keep_fp32 must be a whole number >= 0, got {keep_fp32!r}")
    with tempfile.TemporaryDirectory(prefix=".tmp-quant-", dir=folder.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        cache = Path(scratch) / "ranges.json"  # activation ranges: calibrated once, reused by every variant

        def static(output: Path, include: list[str] | None = None, exclude: Sequence[str] = ()) -> None:
            quant.quantize_static(
                str(prepared), str(output), _Photos(calibration), quant_format=quant.QuantFormat.QDQ,
                per_channel=True, activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
                calibrate_method=quant.CalibrationMethod.MinMax, op_types_to_quantize=list(STATIC_OPS),
                nodes_to_quantize=include, nodes_to_exclude=list(exclude), calibration_cache_path=str(cache),
            )  # fmt: skip

        static(target)  # calibrates (and is the answer when nothing stays fp32)
        ranked = sensitivity(prepared, calibration[:SENSITIVITY_ITEMS], static, Path(scratch), threads)
        kept = ranked[:keep_fp32]
        if kept:
            static(target, exclude=[name for name, _ in kept])
    return {
        "keep_fp32": keep_fp32,
        "kept_fp32": [{"node": name, "sensitivity": score} for name, score in kept],
        "sensitivity_items": int(min(len(calibration), SENSITIVITY_ITEMS)),
    }


def sensitivity(
    prepared: Path, photos: np.ndarray, static: Callable[..., None], scratch: Path, threads: int | None = None
) -> list[tuple[str, float]]:
    """Each quantizable layer's sensitivity, most sensitive first: the graph with only that layer in int8 (the
    calibrated ranges), run on ``photos``, vs fp32; 1 - mean cosine per output, averaged over the outputs
    (embedding and every task's logits). Why per layer: a few layers (on an EfficientNet the stem, whose input
    is the normalised photo, and the first depthwise convolution) carry most of the int8 error."""
    import onnx

    nodes = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type in STATIC_OPS]
    reference = _outputs(prepared, photos, threads)
    scores = []
    for name in nodes:
        variant = scratch / "one-layer.onnx"
        static(variant, include=[name])
        ours = _outputs(variant, photos, threads)
        scores.append((name, float(np.mean([1.0 - _cosine(a, b).mean() for a, b in zip(ours, reference)]))))
    return sorted(scores, key=lambda item: -item[1])


def _outputs(graph: Path, photos: np.ndarray, threads: int | None, batch: int = 64) -> list[np.ndarray]:
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(threads or 0))
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    runs = [session.run(None, {IMAGE_INPUT: photos[i : i + batch]}) for i in range(0, len(photos), batch)]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(runs[0]))]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def add_int8(
    folder: Path, method: str, calibration: np.ndarray | None, sample: Any, record: dict[str, Any],
    threads: int | None = None, keep_fp32: int = KEEP_FP32,
) -> dict[str, Any]:  # fmt: skip
    """Quantize, record the graph in the manifest, then measure it against fp32 on ``sample``."""
    from fashion_lightning.deploy.onnx_encoder import OnnxEncoder

    how = quantize_image(folder, method, calibration, keep_fp32, threads)
    int8: dict[str, Any] = {"file": IMAGE_INT8_FILE, "method": method, **how}
    if method == "static":
        int8["calibration_items"] = len(calibration) if calibration is not None else 0
    write_manifest(folder, {**record, "int8": int8})
    bundle = read_bundle(folder)
    report = compare_precisions(OnnxEncoder(bundle, threads), OnnxEncoder(bundle, threads, "int8"), sample)
    return {**int8, "report": report}


def compare_precisions(fp32: Any, int8: Any, sample: Any, batch: int = 64) -> dict[str, Any]:
    """Per-task accuracy of both graphs on labelled photos, and retrieval overlap@10 among those photos."""
    embeddings: dict[str, list[np.ndarray]] = {"fp32": [], "int8": []}
    predicted: dict[str, dict[str, list[np.ndarray]]] = {"fp32": {}, "int8": {}}
    for start in range(0, len(sample.images), batch):
        images = sample.images[start : start + batch]
        for name, encoder in (("fp32", fp32), ("int8", int8)):
            embedding, logits = encoder.image_outputs(images)
            embeddings[name].append(embedding)
            for task, out in logits.items():
                predicted[name].setdefault(task, []).append(out.argmax(axis=1))
    vectors = {name: np.concatenate(parts) for name, parts in embeddings.items()}
    report: dict[str, Any] = {"items": len(sample.images), "accuracy": {}}
    for column, task in enumerate(fp32.tasks):
        labels = sample.labels[:, column] if sample.labels is not None else None
        if labels is None or not (labels != IGNORE_INDEX).any():
            continue
        known = labels != IGNORE_INDEX
        acc = {name: float((np.concatenate(predicted[name][task])[known] == labels[known]).mean()) for name in vectors}
        report["accuracy"][task] = {**acc, "delta_points": 100 * (acc["int8"] - acc["fp32"])}
    report["overlap_at_10"] = overlap_at_k(vectors["fp32"], vectors["int8"], OVERLAP_K)
    cos = (vectors["fp32"] * vectors["int8"]).sum(axis=1) / np.maximum(
        np.linalg.norm(vectors["fp32"], axis=1) * np.linalg.norm(vectors["int8"], axis=1), 1e-12
    )
    report["cosine"] = {"min": float(cos.min()), "mean": float(cos.mean())}
    return report


def overlap_at_k(a: np.ndarray, b: np.ndarray, k: int = OVERLAP_K) -> float:
    """Mean share of each item's ``k`` nearest neighbours (itself excluded) that two embeddings agree on."""
    n = len(a)
    k = min(k, n - 1)
    if k < 1:
        return 1.0

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        scores = x @ x.T
        np.fill_diagonal(scores, -np.inf)
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    first, second = neighbours(a), neighbours(b)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(first, second)]))
