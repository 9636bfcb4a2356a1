"""Cached partial trunk vs uncached training, same data, same machine, same run: cache build cost and step time.

For each ``--cuts`` value it builds the train split's trunk cache (``--views`` augmented views per item) and times
Lightning training steps that read it; the baseline is the same network fine-tuned end to end from images
(``cache_trunk: null``), timed first in the same process. Reported as ratios against that baseline: step speedup,
the build's cost in uncached epochs, and the epoch count after which the cache has paid for itself. Disk per
item and view is measured; the full-catalog figure is that times the split size.

    python scripts/bench_trunk_cache.py --root ../shared/data/fashion-product-images-small-dev.zip \\
        --max-items 300 --cuts 4 5 6 --views 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.transforms import default_train_transform
from fashion_lightning.models.multitask_module import MultiTaskModule
from fashion_lightning.models.trunk import TrunkEncoder


class StepTimer(L.Callback):
    """Seconds per training image from the start of step ``warmup`` to the end of the run."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.images = warmup, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        if trainer.global_step >= self.warmup:
            self.images += len(batch["id"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds_per_image = (time.perf_counter() - self.start) / max(self.images, 1)


def make_module(dm: FashionDataModule, args, cut: int | None) -> MultiTaskModule:
    torch.manual_seed(0)
    net = {"_target_": "fashion_lightning.models.multitask.MultiTaskNet", "backbone": args.backbone,
           "pretrained": args.pretrained, "image_size": args.image_size}  # fmt: skip
    cache = {"cut": cut, "views": args.views} if cut is not None else None
    return MultiTaskModule(net, dm.vocabs, dm.class_weights, label_smoothing=0.1, cache_trunk=cache)


def time_steps(module: MultiTaskModule, dm: FashionDataModule, args) -> float:
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.warmup + args.steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    return timer.seconds_per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/fashion-product-images-small-dev.zip")
    parser.add_argument("--max-items", type=int, default=300)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--pretrained", default="offline")
    parser.add_argument("--image-size", type=int, nargs=2, default=[224, 168])
    parser.add_argument("--cuts", type=int, nargs="+", default=[5])
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cache-dir", default=os.environ.get("FASHION_LIGHTNING_CACHE", "~/.cache/fashion-lightning"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not Path(args.root).expanduser().exists():
        parser.exit(2, f"bench_trunk_cache: no catalog at {args.root}\n")

    dm = FashionDataModule(root=args.root, max_items=args.max_items, cache_dir=args.cache_dir, num_workers=0,
                           batch_size=args.batch_size, train_transform=default_train_transform())  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    n_train = len(dm.datasets["train"])
    uncached = time_steps(make_module(dm, args, None), dm, args)
    machine = f"{os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.1f} at start"
    results = {"machine": machine, "train_items": n_train, "image_size": args.image_size, "views": args.views,
               "uncached_s_per_image": uncached, "cuts": {}}  # fmt: skip
    for cut in args.cuts:
        module = make_module(dm, args, cut)
        dm.use_trunk_cache(TrunkEncoder(module.net, module.trunk), args.views)  # type: ignore[arg-type]
        start = time.perf_counter()
        cache = dm.trunk_dataset("train", train=True).cache
        build = time.perf_counter() - start
        cached = time_steps(module, dm, args)
        epoch_uncached, epoch_cached = uncached * n_train, cached * n_train
        results["cuts"][cut] = {
            "activation_shape": list(cache.shape[2:]),
            "kb_per_item_view": cache.nbytes / cache.shape[0] / cache.shape[1] / 1024,
            "cache_mb": cache.nbytes / 1e6,
            "build_s_per_item_view": build / (cache.shape[0] * cache.shape[1]),
            "step_speedup": uncached / cached,
            "build_in_uncached_epochs": build / epoch_uncached,
            "break_even_epochs": build / max(epoch_uncached - epoch_cached, 1e-9),
        }
        print(json.dumps({"uncached_s_per_image": uncached, "cut": cut, **results["cuts"][cut]}), flush=True)
    table = Table(title=f"cached trunk vs end-to-end ({results['machine']}, {n_train} train items, "
                        f"{args.image_size[0]}x{args.image_size[1]}, {args.views} views)")  # fmt: skip
    for column in ("cut", "activation", "KB/item-view", "step speedup", "build (uncached epochs)", "break-even epochs"):
        table.add_column(column, justify="right")
    for cut, row in results["cuts"].items():
        table.add_row(str(cut), "x".join(map(str, row["activation_shape"])), f"{row['kb_per_item_view']:.1f}",
                      f"{row['step_speedup']:.2f}x", f"{row['build_in_uncached_epochs']:.2f}",
                      f"{row['break_even_epochs']:.2f}")  # fmt: skip
    Console().print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
