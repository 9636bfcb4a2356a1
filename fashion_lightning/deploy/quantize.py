"""int8 image graphs (ONNX Runtime quantization) and what they cost in accuracy, measured, not assumed.

``dynamic``: weights stored as int8, activations quantized per batch at run time (no calibration).
``static``: activations' ranges calibrated once on catalog photos (QDQ, per-channel weights): the faster
kind on CPUs with VNNI, and the one that can lose more. Either way the report compares the int8 graph with
the fp32 one on labelled photos (the validation split): per-task accuracy of both, and retrieval overlap@10
(how many of an item's 10 nearest neighbours among the same photos stay the same), so a user can decide.
"""

from __future__ import annotations

import logging
import tempfile
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
# normalisation stay fp32, and so do the first and last convolution, which cost little time and most accuracy:
# on the lite0 model of README's Results, keeping them fp32 raised the int8 embeddings' mean cosine to fp32
# from 0.88 to 0.94 and the attribute agreement from 0.84 to 0.89 (200 catalog photos).
STATIC_OPS = ("Conv", "MatMul")


def _kept_in_fp32(model_path: Path) -> list[str]:
    import onnx

    convs = [node.name for node in onnx.load(str(model_path)).graph.node if node.op_type == "Conv"]
    return sorted({convs[0], convs[-1]}) if convs else []


class _Photos:
    """onnxruntime's CalibrationDataReader over uint8 photos, ``batch`` at a time."""

    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self.batches = [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images), batch)]

    def get_next(self) -> dict[str, np.ndarray] | None:
        return {IMAGE_INPUT: self.batches.pop(0)} if self.batches else None

    def rewind(self) -> None:  # ORT >= 1.18 may call it; the reader is used once
        pass


def quantize_image(folder: Path, method: str, calibration: np.ndarray | None) -> Path:
    """Write ``image.int8.onnx`` beside ``image.onnx``."""
    quant = require("onnxruntime.quantization")
    source, target = folder / IMAGE_FILE, folder / IMAGE_INT8_FILE
    logging.getLogger("root").setLevel(logging.WARNING)  # ORT's quantizer logs every node at INFO
    if method == "dynamic":
        quant.quantize_dynamic(str(source), str(target), weight_type=quant.QuantType.QInt8)
        return target
    if method != "static":
        raise ValueError(f"quantize must be dynamic or static, got {method!r}")
    if calibration is None or not len(calibration):
        raise ValueError("quantize=static needs calibration photos (calibration_items > 0)")
    with tempfile.TemporaryDirectory(prefix=".tmp-quant-", dir=folder.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quant.quantize_static(
            str(prepared), str(target), _Photos(calibration), quant_format=quant.QuantFormat.QDQ,
            per_channel=True, activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8,
            calibrate_method=quant.CalibrationMethod.MinMax, op_types_to_quantize=list(STATIC_OPS),
            nodes_to_exclude=_kept_in_fp32(prepared),
        )  # fmt: skip
    return target


def add_int8(
    folder: Path, method: str, calibration: np.ndarray | None, sample: Any, record: dict[str, Any],
    threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Quantize, record the graph in the manifest, then measure it against fp32 on ``sample``."""
    from fashion_lightning.deploy.onnx_encoder import OnnxEncoder

    quantize_image(folder, method, calibration)
    int8: dict[str, Any] = {"file": IMAGE_INT8_FILE, "method": method}
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
