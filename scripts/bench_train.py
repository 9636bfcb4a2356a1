"""Training throughput of fashion-train's Lightning loop vs a bare PyTorch loop, same model and data.

Both loops run the same MultiTaskModule (net + class-weighted loss + AdamW/warmup-cosine) over the
same FashionDataModule train loader (image cache, augmentation, workers), for the same number of
steps after the same warm-up; the difference is Lightning's loop, logging and callbacks.

    python scripts/bench_train.py                      # synthetic catalog, resnet10t at 80x64
    python scripts/bench_train.py --root ../shared/data/fashion-product-images-small-dev.zip --backbone tf_efficientnet_lite0
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

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
           "input_size": args.input_size, "pretrained": False}
    return MultiTaskModule(net, dm.vocabs, dm.class_weights, label_smoothing=0.1)


class StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.images = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:  # global: batch_idx restarts every epoch
            self.start = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.images += len(batch["id"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def lightning_loop(dm: FashionDataModule, args) -> float:
    module = make_module(dm, args)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return timer.images / (timer.end - timer.start)


def bare_loop(dm: FashionDataModule, args) -> float:
    module = make_module(dm, args)
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)
    images, start = 0, 0.0
    loader = dm.train_dataloader()
    batches = (batch for _ in itertools.count() for batch in loader)  # epochs back to back, like max_steps
    for step, batch in enumerate(batches):
        if step == args.warmup:
            start = time.perf_counter()
        if step >= args.warmup:
            images += len(batch["id"])
        logits, _ = module.net(batch["image"])
        loss = module.loss(logits, batch["labels"])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step + 1 == args.warmup + args.steps:
            break
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="Kaggle folder/zip (default: synthetic catalog)")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--input-size", type=int, nargs=2, default=[80, 64])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times; best of each")
    parser.add_argument("--cache-dir", default=os.environ.get("FASHION_LIGHTNING_CACHE", "~/.cache/fashion-lightning"))
    args = parser.parse_args()

    dm = FashionDataModule(root=args.root, cache_dir=args.cache_dir, batch_size=args.batch_size,
                           num_workers=args.workers, train_transform=default_train_transform(), num_items=2000)
    dm.setup("fit")
    results = {"bare PyTorch loop": [], "Lightning (fashion-train)": []}
    for _ in range(args.repeats):  # alternate so background load hits both alike
        results["bare PyTorch loop"].append(bare_loop(dm, args))
        results["Lightning (fashion-train)"].append(lightning_loop(dm, args))
    best = {k: max(v) for k, v in results.items()}
    base = best["bare PyTorch loop"]
    table = Table(title=f"training throughput: {args.backbone} @ {args.input_size[0]}x{args.input_size[1]}, "
                        f"batch {args.batch_size}, {args.workers} workers, {args.steps} timed steps (best of {args.repeats})")
    for col in ("loop", "images/s", "runs", "vs bare"):
        table.add_column(col, justify="left" if col == "loop" else "right")
    for name, value in best.items():
        table.add_row(name, f"{value:.1f}", ", ".join(f"{v:.1f}" for v in results[name]), f"{value / base:.3f}x")
    console = Console()
    console.print(table)
    overhead = (base / best["Lightning (fashion-train)"] - 1) * 100
    console.print(f"Lightning loop overhead: {overhead:+.1f}% time per image (target <= 10%)")


if __name__ == "__main__":
    main()
