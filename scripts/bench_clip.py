"""Throughput of the CLIP fusion model on this machine, against the bare open_clip model.

Measures, for one ClipFusionNet config (default: the offline ``lite0-minilm`` at its input size):

* image embedding: ``ClipFusionModule.embed_images`` on native uint8 80x60 batches (on-device
  resize + normalise + encode + L2) vs ``open_clip`` ``encode_image`` on pre-normalised input;
* text embedding: ``embed_texts`` on raw strings (tokenise + encode) vs ``encode_text`` on
  pre-tokenised ids;
* fine-tuning: one optimiser step of the module (preprocess + both towers + ClipLoss + backward)
  vs the same step written by hand on the bare model with pre-processed inputs.

Overhead % = (ours - bare) / bare time. Run:
    python scripts/bench_clip.py --threads 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from fashion_lightning.data.vocab import LabelVocabs
from fashion_lightning.models.clip_module import ClipFusionModule

NAMES = ["Peter England Men Party Blue Jeans", "Titan Women Silver Watch", "Nike Men Grey Sweatshirt",
         "Puma Unisex Black Backpack", "Lakme Absolute Gloss Lip Colour"]  # fmt: skip


def timed_pair(ours: Callable[[], object], bare: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds per call of each, measured alternately so that load drift on a shared
    machine hits both sides equally; one warm-up call each."""
    ours()
    bare()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (bare, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", default="lite0-minilm")
    parser.add_argument("--pretrained", default="offline", help="'offline', an open_clip tag, or 'none'")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lock-text", action="store_true", help="fine-tune with the text tower frozen")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console()

    net_cfg = {
        "_target_": "fashion_lightning.models.clip.ClipFusionNet",
        "model_name": args.model_name,
        "pretrained": None if args.pretrained.lower() == "none" else args.pretrained,
        "image_size": args.image_size,
        "lock_text": args.lock_text,
    }
    vocabs = LabelVocabs.from_dict({"articleType": ["Jeans", "Watches", "Sweatshirts"]})
    module = ClipFusionModule(net_cfg, vocabs, mode="finetune", kagl=False).to(device)
    net, bare = module.net, module.net.model
    bs, (h, w) = args.batch_size, module.net.image_size
    images = torch.randint(0, 256, (bs, 3, 80, 60), dtype=torch.uint8, device=device)
    texts = [NAMES[i % len(NAMES)] + f" {i}" for i in range(bs)]
    pixels = module.preprocess(images)  # bare model gets what it would get from a tuned data pipeline
    tokens = net.tokenize(texts).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            fn()
            sync()

        return call

    rows = []
    module.eval()
    with torch.no_grad():
        ours, base = timed_pair(
            run(lambda: module.embed_images(images)),
            run(lambda: bare.encode_image(pixels, normalize=True)),
            args.repeats,
        )
        rows.append(("image embedding", bs / ours, bs / base, "images/s"))
        ours, base = timed_pair(
            run(lambda: module.embed_texts(texts)), run(lambda: bare.encode_text(tokens, normalize=True)), args.repeats
        )
        rows.append(("text embedding", bs / ours, bs / base, "texts/s"))

    module.train()
    module.log = lambda *a, **k: None  # no Trainer here; logging is not what we measure
    batch = {"image": images, "text": texts, "labels": torch.zeros(bs, 1, dtype=torch.long, device=device),
             "id": torch.arange(bs, device=device)}  # fmt: skip
    opt_ours = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)

    def ours_step() -> None:
        loss = module.training_step(batch, 0)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    opt_bare = torch.optim.AdamW([p for p in bare.parameters() if p.requires_grad], lr=1e-6)

    def bare_step() -> None:
        image_f = bare.encode_image(pixels, normalize=True)
        text_f = bare.encode_text(tokens, normalize=True)
        loss = loss_fn(image_f, text_f, bare.logit_scale.exp())
        loss.backward()
        opt_bare.step()
        opt_bare.zero_grad(set_to_none=True)

    ours, base = timed_pair(run(ours_step), run(bare_step), args.repeats)
    rows.append(("fine-tune step", bs / ours, bs / base, "images/s"))

    summary = net.trainable_summary()
    locked = ", text tower locked" if args.lock_text else ""
    table = Table(title=f"{args.model_name} ({args.pretrained}) {h}x{w}, batch {bs}, {device}, "
                        f"{torch.get_num_threads()} threads{locked}")  # fmt: skip
    for col in ("measure", "ours", "bare open_clip", "unit", "overhead %"):
        table.add_column(col, justify="right" if col != "measure" else "left")
    for name, ours_rate, bare_rate, unit in rows:
        table.add_row(name, f"{ours_rate:,.1f}", f"{bare_rate:,.1f}", unit, f"{(bare_rate / ours_rate - 1) * 100:+.1f}")
    console.print(table)
    trainable = sum(v["trainable"] for v in summary.values())
    total = sum(v["total"] for v in summary.values())
    console.print(f"parameters: {total / 1e6:.1f}M, trainable in the fine-tune step: {trainable / 1e6:.1f}M")


if __name__ == "__main__":
    main()
