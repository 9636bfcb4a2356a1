"""Embedding throughput: PyTorch eager vs the fashion-export graphs in ONNX Runtime (fp32, int8), one run.

    python scripts/bench_embed.py --model outputs/train/runs/<run>/model --onnx outputs/export/runs/<run>/onnx \\
        --catalog ../shared/data/fashion-product-images-small-dev.zip --items 512 --batch-size 64 --threads 2

What fashion-index does per catalog item (``embed_items``: the photo, plus for CLIP its product name through
the text tower and the fusion), at the same batch size and the same intra-op thread count for every runtime,
on the same decoded photos (decoding is not timed). Also one photo at a time (what a photo query costs).
Runtimes are timed in alternating rounds so load drift on a shared machine hits each alike; the table gives
median items/s and the ratio to PyTorch measured in this run, plus how closely each agrees with PyTorch
(min cosine of the embeddings, share of identical predicted attributes).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fashion_lightning.data.catalog import load_catalog
from fashion_lightning.data.images import ImageDecodeError, to_native
from fashion_lightning.deploy.onnx_encoder import load_onnx_encoder
from fashion_lightning.models.base import load_module
from fashion_lightning.utils.app import quiet_runtime


def catalog_items(root: Path, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` seeded random catalog photos as uint8 [n, 3, 80, 60] and their product names."""
    catalog = load_catalog(root)
    frame = catalog.frame.sample(n=min(n, len(catalog.frame)), random_state=seed)
    photos, names = [], []
    for item_id, name in zip(frame["id"], frame["productDisplayName"]):
        data = catalog.source.image_bytes(int(item_id))
        try:
            photos.append(to_native(data or b""))
        except ImageDecodeError:  # the catalog's few broken files are skipped, as the image cache does
            continue
        names.append(str(name))
    return np.ascontiguousarray(np.stack(photos).transpose(0, 3, 1, 2)), names


def torch_items(module: Any) -> Callable[[np.ndarray, list[str]], dict[str, np.ndarray]]:
    def run(images: np.ndarray, texts: list[str]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = module.embed_items({"image": torch.from_numpy(images), "text": texts})
        return {k: v.float().numpy() for k, v in out.items()}

    return run


def timed(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each, alternating, after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the model artefact (<run>/model) or a .ckpt")
    parser.add_argument("--onnx", type=Path, required=True, help="fashion-export folder of that model")
    parser.add_argument("--catalog", type=Path, required=True, help="Kaggle-layout catalog folder or zip")
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime (1: see serve.yaml)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", type=int, default=30, help="one-photo calls per runtime (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quiet_runtime()  # what the apps do: glibc keeps freed memory (large eager batches otherwise page-fault)
    torch.set_num_threads(args.threads)
    console = Console(width=150)

    module = load_module(args.model)
    photos, names = catalog_items(args.catalog, args.items, args.seed)
    runtimes: dict[str, Any] = {"pytorch eager": None, "onnx fp32": load_onnx_encoder(args.onnx, args.threads)}
    if runtimes["onnx fp32"].bundle.int8 is not None:
        method = runtimes["onnx fp32"].bundle.int8["method"]
        runtimes[f"onnx int8 ({method})"] = load_onnx_encoder(args.onnx, args.threads, "int8")
    if runtimes["onnx fp32"].bundle.model_identity != _identity(module, args.model):
        raise SystemExit(f"{args.onnx} was exported from another model than {args.model}")
    items = {
        name: (torch_items(module) if encoder is None else encoder.embed_items) for name, encoder in runtimes.items()
    }
    batches = [(photos[i : i + args.batch_size], names[i : i + args.batch_size])
               for i in range(0, len(photos), args.batch_size)]  # fmt: skip

    def whole(fn: Callable[..., Any]) -> Callable[[], Any]:
        return lambda: [fn(images, texts) for images, texts in batches]

    batch_s = timed({name: whole(fn) for name, fn in items.items()}, args.rounds)
    single_s: dict[str, float] = {}
    if args.single:
        one = photos[:1]

        def torch_photo() -> Any:
            with torch.inference_mode():
                return module.embed_and_predict(torch.from_numpy(one))

        photo_fns = {name: torch_photo if enc is None else (lambda e=enc: e.embed_and_predict(one))
                     for name, enc in runtimes.items()}  # fmt: skip
        single_s = timed({name: _repeat(fn, args.single) for name, fn in photo_fns.items()}, args.rounds)
    reference = np.concatenate([items["pytorch eager"](i, t)["embedding"] for i, t in batches])
    with torch.inference_mode():
        _, their_logits = module.image_outputs(torch.from_numpy(photos))

    console.print(
        f"bench_embed: {len(photos)} catalog items ({args.catalog.name}), batch {args.batch_size}, "
        f"{args.threads} intra-op threads, {args.rounds} rounds; {module.embedding_name}; "
        f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    table = Table()
    for column in ("runtime", "items/s", "x PyTorch", "1 photo ms", "x PyTorch ", "min cosine", "same attributes"):
        table.add_column(column, justify="left" if column == "runtime" else "right")
    base = len(photos) / batch_s["pytorch eager"]
    for name, encoder in runtimes.items():
        rate = len(photos) / batch_s[name]
        if encoder is None:
            cos, agree = 1.0, 1.0
        else:
            ours = np.concatenate([encoder.embed_items(i, t)["embedding"] for i, t in batches])
            cos = float(_cosine(ours, reference).min())
            _, logits = encoder.image_outputs(photos)
            agree = float(np.mean([
                (logits[t].argmax(1) == their_logits[t].argmax(1).numpy()).mean() for t in their_logits
            ]))  # fmt: skip
        one = single_s.get(name)
        base_one = single_s.get("pytorch eager")
        table.add_row(
            name, f"{rate:.1f}", f"{rate / base:.2f}",
            f"{1e3 * one / args.single:.2f}" if one else "-", f"{base_one / one:.2f}" if one and base_one else "-",
            f"{cos:.5f}", f"{agree:.4f}",
        )  # fmt: skip
    console.print(table)


def _repeat(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(n):
            fn()

    return run


def _identity(module: Any, path: Path) -> str:
    from fashion_lightning.models.artifact import model_identity

    return model_identity(path, module)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


if __name__ == "__main__":
    main()
