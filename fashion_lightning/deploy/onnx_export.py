"""A trained model -> ONNX graphs (image encoder with its heads, CLIP text encoder), checked against PyTorch.

The image graph takes what the services already hand a model, uint8 letterboxed photos ``[B, 3, 80, 60]``,
and does the preprocessing inside (resize + mean/std, exactly ``DeviceInput``), so a runtime needs nothing
but the graph. Its outputs are the embedding and one ``logits_<task>`` per attribute (the heads; for CLIP
without heads the zero-shot prompt logits, their class-text embeddings folded in as a constant). Every
axis is fixed but the batch.

The folder is built under a temporary name: graphs, tokenizer, ``preprocess.json``, then the manifest;
then it is loaded back through the same :class:`~fashion_lightning.deploy.onnx_encoder.OnnxEncoder` the
services use and compared with PyTorch on real images (and texts). Only a folder that passes is renamed
into place; a failed check names the worst item and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fashion_lightning.data.images import NATIVE_HW
from fashion_lightning.deploy.bundle import (
    EMBEDDING_OUTPUT,
    IMAGE_FILE,
    IMAGE_INPUT,
    LOGITS_PREFIX,
    PREPROCESS_FILE,
    TEXT_FILE,
    TEXT_INPUT,
    TOKENIZER_DIR,
    Preprocess,
    read_bundle,
    require,
    write_manifest,
)
from fashion_lightning.models.base import FashionModule
from fashion_lightning.utils.atomic import atomic_dir

OPSET = 17
MIN_COSINE = 0.9999


class ExportCheckError(ValueError):
    """The exported graphs do not reproduce PyTorch's answers (message names the worst item)."""


@dataclass(frozen=True)
class CheckSample:
    """What the self-check (and int8 calibration / report) runs on: native uint8 photos and their texts."""

    images: np.ndarray  # uint8 [N, 3, H, W]
    ids: list[int]
    texts: list[str]
    labels: np.ndarray | None = None  # [N, tasks] class indices (-100: unknown), for the int8 report


class ImageGraph(nn.Module):
    """uint8 photos -> (embedding, logits of each task): one forward pass, the module's own maths."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module
        self.tasks = list(module.vocabs.tasks)
        self.clip = hasattr(module, "zero_shot_logits")
        if self.clip and not module.heads:  # zero-shot: the class prompts' embeddings become constants
            with torch.no_grad():
                texts = module.class_text_embeddings()
                scale = module.net.scale().detach().float()
            self.class_text = nn.ParameterDict(
                {t: nn.Parameter(scale * texts[t].float(), requires_grad=False) for t in self.tasks}
            )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        module: Any = self.module  # a family's module: its net / heads are typed by the family, not FashionModule
        if not self.clip:
            logits, embedding = module.net(images, flip_tta=bool(module.hparams.flip_tta))
        else:
            embedding = module.embed_images(images)
            if module.heads:
                logits = {t: head(embedding) for t, head in module.heads.items()}
            else:
                logits = {t: embedding.float() @ self.class_text[t].T for t in self.tasks}
        return (embedding.float(), *[logits[t].float() for t in self.tasks])


class TextGraph(nn.Module):
    """int64 token ids -> L2-normalised text embedding (CLIP's text tower)."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.module = module

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        module: Any = self.module
        return module.net.encode_text(tokens).float()


class StaticPadConv2d(nn.Module):
    """A TF-"SAME" convolution whose padding was worked out for the one input size the graph takes.

    Why: timm's ``Conv2dSame`` (the ``tf_*`` EfficientNets' strided convolutions) computes its padding from the
    input's shape at run time; traced, that is a chain of Shape / Gather / Ceil / Cast ops and a ``Pad`` with
    computed amounts, which ONNX Runtime can neither fold into the convolution nor keep in its blocked (NCHWc)
    layout: each one converts the activations out of that layout and back. Measured on lite0 128x96: the five
    pads and their re-orderings were 27% of the graph's time. Here the padding is a constant: symmetric, it is
    the convolution's own; otherwise a constant ``Pad`` that ONNX Runtime fuses into the ``Conv`` after it.
    """

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv = conv  # the original module: same weights, its forward is not used
        self.pads = pads  # left, right, top, bottom (F.pad's order for the last two axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = self.pads
        conv = self.conv
        if left == right and top == bottom:
            return nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, (top, left), conv.dilation, conv.groups)
        x = nn.functional.pad(x, self.pads)
        return nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


@contextlib.contextmanager
def static_same_padding(graph: nn.Module, example: torch.Tensor) -> Iterator[int]:
    """While exporting ``graph`` for inputs shaped like ``example``: its run-time "SAME" paddings become
    :class:`StaticPadConv2d` (restored afterwards). Yields how many were replaced. The self-check compares
    the graph with the untouched module, so a wrong padding fails the export."""
    from timm.layers import Conv2dSame

    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(conv: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sizes[conv] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

    hooks = [m.register_forward_pre_hook(record) for m in graph.modules() if isinstance(m, Conv2dSame)]
    try:
        with torch.no_grad():
            graph(example)
    finally:
        for hook in hooks:
            hook.remove()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(graph.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv2dSame) and child in sizes:
                    pads = _same_pads(sizes[child], child)
                    setattr(parent, name, StaticPadConv2d(child, pads))
                    swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _same_pads(size_hw: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """timm's ``pad_same`` amounts for a fixed input size: (left, right, top, bottom)."""
    from timm.layers.padding import get_same_padding

    kh, kw = conv.weight.shape[-2:]
    pad_h = int(get_same_padding(size_hw[0], int(kh), conv.stride[0], conv.dilation[0]))
    pad_w = int(get_same_padding(size_hw[1], int(kw), conv.stride[1], conv.dilation[1]))
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def _export(graph: nn.Module, example: torch.Tensor, path: Path, input_name: str, outputs: list[str]) -> None:
    """TorchScript-based exporter: deterministic graphs, no onnxscript needed; only the batch axis is free."""
    axes = {name: {0: "batch"} for name in [input_name, *outputs]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches fixed at trace time (shapes)
        torch.onnx.export(
            graph, (example,), str(path), input_names=[input_name], output_names=outputs, dynamic_axes=axes,
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )  # fmt: skip
    drop_empty_trailing_inputs(path)


def drop_empty_trailing_inputs(path: Path) -> int:
    """Rewrite the graph at ``path`` without the empty trailing optional inputs the exporter writes (``Pad(x,
    pads, "")``): the same graph by ONNX's rules, but ONNX Runtime's Pad+Conv fusion only fires on a Pad
    whose inputs all exist (a Pad it cannot fuse also breaks its NCHWc layout). Returns how many it dropped."""
    import onnx

    model = onnx.load(str(path))
    dropped = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            while len(node.input) and node.input[-1] == "":
                node.input.pop()
                dropped += 1
            for attribute in node.attribute:
                graphs += [attribute.g] if attribute.HasField("g") else []
                graphs += list(attribute.graphs)
    if dropped:
        onnx.save(model, str(path))
    return dropped


def save_tokenizer(module: Any, folder: Path) -> dict[str, Any]:
    """The tokenizer's files (data: vocabulary, merges, settings) and how to rebuild it from them."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    tokenizer = module.net.tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, HFTokenizer):
        if tokenizer.strip_sep_token or tokenizer.tokenizer_mode:
            raise ValueError("this HF tokenizer uses options the exporter does not record (strip_sep_token, mode)")
        tokenizer.tokenizer.save_pretrained(str(folder))
        return {"kind": "hf", "clean": "whitespace"}
    if isinstance(tokenizer, SimpleTokenizer):
        import open_clip.tokenizer as oc_tokenizer

        bpe = Path(oc_tokenizer.default_bpe())
        shutil.copyfile(bpe, folder / bpe.name)
        return {"kind": "clip_bpe", "bpe_file": bpe.name, "clean": "lower"}
    raise ValueError(f"cannot export the tokenizer {type(tokenizer).__name__}: only HF and CLIP BPE tokenizers")


def export_onnx(
    module: Any,
    out_dir: str | Path,
    identity: str,
    sample: CheckSample,
    quantize: str | None = None,
    calibration: np.ndarray | None = None,
    report_sample: CheckSample | None = None,
    threads: int | None = None,
    keep_fp32: int | None = None,
) -> dict[str, Any]:
    """Write the export folder for ``module`` at ``out_dir`` (atomically) and return its manifest.

    ``sample``: the self-check's photos/texts; ``quantize`` (dynamic | static) adds ``image.int8.onnx``,
    static calibrated on ``calibration`` photos (the ``keep_fp32`` most sensitive layers left fp32), with its
    accuracy cost measured on ``report_sample``.
    """
    from fashion_lightning.models import registry

    require("onnx")
    require("onnxruntime")
    module = module.cpu().eval()
    family = registry.family_of(module)
    clip = family == "clip"
    example = torch.from_numpy(np.ascontiguousarray(sample.images[:2]))
    tasks = list(module.vocabs.tasks)
    pre = _preprocess(module)
    with atomic_dir(Path(out_dir), prefix=".tmp-onnx-") as tmp:
        image_graph = ImageGraph(module).eval()
        with static_same_padding(image_graph, example):
            _export(image_graph, example, tmp / IMAGE_FILE, IMAGE_INPUT,
                    [EMBEDDING_OUTPUT, *[f"{LOGITS_PREFIX}{t}" for t in tasks]])  # fmt: skip
        (tmp / PREPROCESS_FILE).write_text(json.dumps(pre.to_dict(), indent=1) + "\n", encoding="utf-8")
        text = None
        if clip:
            context = int(module.net.tokenize(["a"]).shape[1])
            tokens = module.net.tokenize(sample.texts[:2] or ["a", "b"])
            _export(TextGraph(module).eval(), tokens, tmp / TEXT_FILE, TEXT_INPUT, [EMBEDDING_OUTPUT])
            tokenizer = save_tokenizer(module, tmp / TOKENIZER_DIR)
            text = {"file": TEXT_FILE, "context_length": context, "tokenizer": tokenizer}
        with torch.no_grad():
            embed_dim = int(module.embed_images(example).shape[1])
        record: dict[str, Any] = {
            "family": family,
            "embedding_name": module.embedding_name,
            "embed_dim": embed_dim,
            "model_identity": identity,
            "tasks": module.vocabs.to_dict(),
            "alpha": float(module.hparams.alpha) if clip else None,
            "preprocess": {
                "native_hw": list(pre.native_hw),
                "input_hw": list(pre.input_hw),
                "mean": list(pre.mean),
                "std": list(pre.std),
            },  # fmt: skip
            "text": text,
            "int8": None,
            "opset": OPSET,
            "versions": _versions(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(tmp, record)
        record["check"] = self_check(module, tmp, sample, threads)
        if quantize:
            from fashion_lightning.deploy.quantize import KEEP_FP32, add_int8

            keep = KEEP_FP32 if keep_fp32 is None else keep_fp32
            record["int8"] = add_int8(tmp, quantize, calibration, report_sample or sample, record, threads, keep)
        manifest = write_manifest(tmp, record)
    return manifest


def _preprocess(module: Any) -> Preprocess:
    device_input = module.preprocess if hasattr(module, "zero_shot_logits") else module.net.preprocess
    mean = (device_input.mean.flatten() / 255.0).tolist()
    std = (device_input.std.flatten() / 255.0).tolist()
    return Preprocess(NATIVE_HW, tuple(device_input.image_size), tuple(mean), tuple(std))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def self_check(
    module: FashionModule, folder: Path, sample: CheckSample, threads: int | None = None, batch: int = 64
) -> dict[str, Any]:
    """ONNX Runtime vs PyTorch on ``sample``: cosine >= 0.9999 per embedding, the same argmax per task.

    Raises :class:`ExportCheckError` naming the worst item otherwise; returns what was measured.
    """
    from fashion_lightning.deploy.onnx_encoder import OnnxEncoder

    encoder = OnnxEncoder(read_bundle(folder), threads=threads)
    cosines, disagree = [], []
    for start in range(0, len(sample.images), batch):
        images = sample.images[start : start + batch]
        ours, our_logits = encoder.image_outputs(images)
        with torch.inference_mode():
            theirs, their_logits = module.image_outputs(torch.from_numpy(np.ascontiguousarray(images)))
        cosines.append(cosine_rows(ours, theirs.float().numpy()))
        for task, logits in their_logits.items():
            expected = logits.float().argmax(dim=1).numpy()
            for row in np.flatnonzero(our_logits[task].argmax(axis=1) != expected):
                disagree.append((task, start + int(row)))
    cos = np.concatenate(cosines)
    worst: int = int(np.argmin(cos))
    if cos[worst] < MIN_COSINE:
        raise ExportCheckError(
            f"self-check failed: item {sample.ids[worst]} embeds with cosine {cos[worst]:.6f} between ONNX Runtime "
            f"and PyTorch (need >= {MIN_COSINE}); {int((cos < MIN_COSINE).sum())} of {len(cos)} items below"
        )
    if disagree:
        task, first = disagree[0]
        raise ExportCheckError(
            f"self-check failed: item {sample.ids[first]}'s {task} prediction differs between ONNX Runtime and "
            f"PyTorch ({len(disagree)} disagreements over {len(cos)} items x {len(module.vocabs.tasks)} tasks)"
        )
    result: dict[str, Any] = {"images": len(cos), "min_cosine": float(cos.min()), "argmax_agree": 1.0}
    if encoder.has_text and sample.texts:
        ours_text = encoder.embed_texts(sample.texts)
        with torch.inference_mode():
            theirs_text = module.embed_texts(sample.texts).float().numpy()
        tcos = cosine_rows(ours_text, theirs_text)
        worst = int(np.argmin(tcos))
        if tcos[worst] < MIN_COSINE:
            raise ExportCheckError(
                f"self-check failed: the text of item {sample.ids[worst]} ({sample.texts[worst][:80]!r}) embeds with "
                f"cosine {tcos[worst]:.6f} between ONNX Runtime and PyTorch (need >= {MIN_COSINE})"
            )
        result |= {"texts": len(tcos), "min_text_cosine": float(tcos.min())}
    return result


def sample_from_loader(loader: Any, n: int, with_labels: bool = False) -> CheckSample:
    """The first ``n`` items of a predict / eval loader as a :class:`CheckSample`."""
    images, ids, texts, labels = [], [], [], []
    seen = 0
    for batch in loader:
        take = min(len(batch["id"]), n - seen)
        images.append(batch["image"][:take].numpy())
        ids += [int(i) for i in batch["id"][:take]]
        texts += [str(t) for t in batch.get("text", [""] * take)[:take]]
        if with_labels:
            labels.append(batch["labels"][:take].numpy())
        seen += take
        if seen >= n:
            break
    if not images:
        raise ValueError("the catalog split has no items to check the export on")
    return CheckSample(
        np.ascontiguousarray(np.concatenate(images)), ids, texts, np.concatenate(labels) if labels else None
    )
