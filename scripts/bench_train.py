"""Training throughput: the loader alone, a bare PyTorch loop and fashion-train's Lightning loop, same model and data.

All three read the same FashionDataModule train loader (image cache, augmentation, workers). The two loops run
the same MultiTaskModule (net + class-weighted loss, the module's own optimiser: fused AdamW on CUDA) for the
same number of steps after the same warm-up; the difference is Lightning's loop, logging and callbacks.
On a GPU (``--accelerator gpu``): bf16 autocast / ``precision=bf16-mixed``, channels_last, pinned memory,
non-blocking copies; ``--compile`` compiles the backbone in both loops.

    python scripts/bench_train.py                      # CPU, synthetic catalog, resnet10t at 80x64
    python scripts/bench_train.py --accelerator gpu --root ../shared/data/fashion-product-images-small-dev-webp.zip \\
        --backbone resnet50 --image-size 224 224 --batch-size 256 --workers 12 --steps 60
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from contextlib import nullcontext

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.transforms import default_train_transform
from fashion_lightning.models.multitask_module import MultiTaskModule


def make_module(dm: FashionDataModule, args) -> MultiTaskModule:
    torch.manual_seed(0)
    net = {"_target_": "fashion_lightning.models.multitask.MultiTaskNet", "backbone": args.backbone,
           "image_size": args.image_size, "pretrained": False, "channels_last": args.gpu}  # fmt: skip
    return MultiTaskModule(net, dm.vocabs, dm.class_weights, label_smoothing=0.1, compile=args.compile)


def batches(loader):
    """Epochs back to back, like ``max_steps``."""
    return (batch for _ in itertools.count() for batch in loader)


class StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, sync: bool) -> None:
        self.warmup, self.sync, self.start, self.end, self.images = warmup, sync, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:  # global: batch_idx restarts every epoch
            if self.sync:
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.images += len(batch["id"])

    def on_train_end(self, trainer, pl_module):
        if self.sync:
            torch.cuda.synchronize()
        self.end = time.perf_counter()


def loader_alone(dm: FashionDataModule, args) -> float:
    """Images/s the train loader delivers (to the device on a GPU) with no model at all."""
    device = torch.device("cuda" if args.gpu else "cpu")
    images, start = 0, 0.0
    for step, batch in enumerate(batches(dm.train_dataloader())):
        if step == args.warmup:
            start = time.perf_counter()
        if step >= args.warmup:
            images += len(batch["id"])
            batch["image"].to(device, non_blocking=True)
        if step + 1 == args.warmup + args.steps:
            break
    if args.gpu:
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def lightning_loop(dm: FashionDataModule, args) -> float:
    module = make_module(dm, args)
    timer = StepTimer(args.warmup, args.gpu)
    trainer = L.Trainer(
        accelerator="gpu" if args.gpu else "cpu", devices=1, precision="bf16-mixed" if args.gpu else "32-true",
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return timer.images / (timer.end - timer.start)


def bare_loop(dm: FashionDataModule, args) -> float:
    device = torch.device("cuda" if args.gpu else "cpu")
    module = make_module(dm, args).to(device)
    module.configure_model()  # the same compile switch as the Lightning run
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01, fused=args.gpu)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.gpu else nullcontext()
    images, start = 0, 0.0
    for step, batch in enumerate(batches(dm.train_dataloader())):
        if step == args.warmup:
            if args.gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
        if step >= args.warmup:
            images += len(batch["id"])
        x = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast:
            logits, _ = module.net(x)
            loss = module.loss(logits, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step + 1 == args.warmup + args.steps:
            break
    if args.gpu:
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--root", default=None, help="Kaggle folder/zip (default: synthetic catalog)")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, nargs=2, default=[80, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times; best of each")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone in both loops")
    parser.add_argument("--num-items", type=int, default=2000, help="synthetic catalog size")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--cache-dir", default=os.environ.get("FASHION_LIGHTNING_CACHE", "~/.cache/fashion-lightning"))
    args = parser.parse_args()
    args.gpu = args.accelerator == "gpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--accelerator gpu: no CUDA device visible")
    torch.set_float32_matmul_precision("high")

    dm = FashionDataModule(root=args.root, cache_dir=args.cache_dir, batch_size=args.batch_size,
                           num_workers=args.workers, pin_memory=args.gpu, train_transform=default_train_transform(),
                           num_items=args.num_items)  # fmt: skip
    dm.setup("fit")
    loader = max(loader_alone(dm, args) for _ in range(args.repeats))
    results = {"bare PyTorch loop": [], "fashion-train loop": []}
    for _ in range(args.repeats):  # alternate so background load hits both alike
        results["bare PyTorch loop"].append(bare_loop(dm, args))
        results["fashion-train loop"].append(lightning_loop(dm, args))
    best = {k: max(v) for k, v in results.items()}
    base = best["bare PyTorch loop"]
    overhead = (base / best["fashion-train loop"] - 1) * 100
    title = (f"training throughput ({args.accelerator}): {args.backbone} @ {args.image_size[0]}x{args.image_size[1]}, "
             f"batch {args.batch_size}, {args.workers} workers, {args.steps} timed steps (best of {args.repeats})"
             f"{', compiled' if args.compile else ''}")  # fmt: skip
    table = Table(title=title)
    for col in ("measure", "images/s", "runs", "vs bare"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    table.add_row("loader alone", f"{loader:.1f}", "", f"{loader / base:.2f}x")
    for name, value in best.items():
        table.add_row(name, f"{value:.1f}", ", ".join(f"{v:.1f}" for v in results[name]), f"{value / base:.3f}x")
    console = Console()
    console.print(table)
    console.print(f"fashion-train loop overhead: {overhead:+.1f}% time per image (goal <= 5% on a GPU)")
    if args.json:
        row = {"accelerator": args.accelerator, "device": torch.cuda.get_device_name() if args.gpu else "cpu",
               "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
               "workers": args.workers, "steps": args.steps, "compile": args.compile, "loader_img_s": loader,
               "bare_img_s": base, "fashion_train_img_s": best["fashion-train loop"],
               "overhead_pct": overhead}  # fmt: skip
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
