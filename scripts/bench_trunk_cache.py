"""Cached partial trunk vs uncached training, same data, same machine, same run: cache build cost and step time.

``--family multitask`` (default) benches ``model.cache_trunk``; ``--family clip`` benches ``model.cache_text`` on
the ``clip_offline_finetune`` recipe (its config, composed with Hydra): the same recipe's training step with the
text tower's lower layers read from the text cache vs run on every title, timed alternately ``--rounds`` times
(a shared machine's load drifts) and reported as the median ratio.

For each ``--cuts`` value it builds the train split's trunk cache (``--views`` augmented views per item) and times
Lightning training steps that read it; the baseline is the same network fine-tuned end to end from images
(``cache_trunk: null``), timed first in the same process. Reported as ratios against that baseline: step speedup,
the build's cost in uncached epochs, and the epoch count after which the cache has paid for itself. Disk per
item and view is measured; the full-catalog figure is that times the split size.

    python scripts/bench_trunk_cache.py --root ../shared/data/fashion-product-images-small-dev.zip \\
        --max-items 300 --cuts 4 5 6 --views 2 --steps 3
    python scripts/bench_trunk_cache.py --family clip --root ../shared/data/fashion-product-images-small-dev.zip \\
        --max-items 300 --text-layers 5 --batch-size 32 --steps 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
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


def clip_recipe(args, text_layer: int | None):
    """``clip_offline_finetune`` as shipped (datamodule + module configs), with ``cache_text`` set or off."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cache = "null" if text_layer is None else f"{{layer:{text_layer},dtype:{args.dtype}}}"
    overrides = [f"experiment={args.experiment}", f"data.root={Path(args.root).expanduser().resolve()}",
                 f"data.max_items={args.max_items}", f"data.batch_size={args.batch_size}", "data.num_workers=0",
                 f"++model.cache_text={cache}"]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_module("fashion_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.cache_dir = tempfile.mkdtemp(prefix="bench-text-"), args.cache_dir
        del cfg.hydra
    return cfg


def model_step_ratio(module, batches: list[dict], rounds: int) -> list[float]:
    """CPU seconds of the module's own training step (forward, backward, optimiser step) on prefetched batches
    without vs with their cached token states, alternated ``rounds`` times, on one thread: the loader is left
    out, and the process's CPU time (not wall time) is what a machine shared with other jobs cannot inflate."""
    import warnings

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    module.train()
    plain = [{k: v for k, v in b.items() if k not in ("text_states", "text_mask")} for b in batches]

    def run(data: list[dict]) -> float:
        start = time.process_time()
        for batch in data:
            module.training_step(batch, 0).backward()
            optimizer.step()
            optimizer.zero_grad()
        return time.process_time() - start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log outside a Trainer
            run(batches[:1]), run(plain[:1])  # warm-up
            return [run(plain) / run(batches) for _ in range(rounds)]
    finally:
        torch.set_num_threads(threads)


def bench_clip(args) -> None:
    """Step time of the CLIP recipe with the text cache at each ``--text-layers`` L vs without it."""
    from hydra.utils import instantiate

    from fashion_lightning.models.text_trunk import TextEncoder

    base = clip_recipe(args, None)
    dm: FashionDataModule = instantiate(base.data)
    dm.prepare_data()
    dm.setup("fit")
    n_train = len(dm.datasets["train"])
    use_text_cache = dm.use_text_cache

    def module_for(layer: int | None):
        torch.manual_seed(0)
        return instantiate(clip_recipe(args, layer).model, vocabs=dm.vocabs, class_weights=dm.class_weights)

    def timed(layer: int | None) -> float:
        module = module_for(layer)
        dm.use_text_cache = use_text_cache if layer is not None else (lambda *a, **k: None)  # type: ignore[method-assign]
        if layer is None:
            dm._text = None
        return time_steps(module, dm, args)

    load = os.getloadavg()
    results: dict = {"family": "clip", "experiment": args.experiment, "train_items": n_train,
                     "titles": len({t for d in dm.datasets.values() for t in d.texts}), "batch_size": args.batch_size,
                     "machine": f"{os.cpu_count()} CPU(s), load {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at start",
                     "layers": {}}  # fmt: skip
    for layer in args.text_layers:
        module = module_for(layer)
        start = time.perf_counter()
        dm.use_text_cache(TextEncoder(module.net, module.text_split), args.dtype)
        cache = dm.text_cache()
        build = time.perf_counter() - start
        uncached, cached = [], []
        for _ in range(args.rounds):  # alternate: load drift on a shared machine hits both sides
            uncached.append(timed(None))
            cached.append(timed(layer))
        u, c = statistics.median(uncached), statistics.median(cached)
        loader = dm.train_dataloader()
        batches = [b for b, _ in zip(loader, range(args.steps))]
        model_only = model_step_ratio(module_for(layer), batches, args.model_rounds)
        results["layers"][layer] = {
            "uncached_s_per_image": u, "cached_s_per_image": c, "step_speedup": u / c,
            "step_speedups": [a / b for a, b in zip(uncached, cached)],
            "model_step_speedup": statistics.median(model_only), "model_step_speedups": model_only,
            "cache_mb": cache.nbytes / 1e6, "kb_per_title": cache.nbytes / len(cache.titles) / 1024,
            "build_s_per_title": build / len(cache.titles), "build_in_uncached_epochs": build / (u * n_train),
            "break_even_epochs": build / max((u - c) * n_train, 1e-9),
        }  # fmt: skip
        print(json.dumps({"layer": layer, **results["layers"][layer]}), flush=True)
    load = os.getloadavg()
    results["machine"] += f", {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at end"
    table = Table(title=f"{args.experiment}: text cache vs whole text tower ({results['machine']}; {n_train} train "
                        f"items, {results['titles']} titles, batch {args.batch_size})")  # fmt: skip
    for column in ("layer", "KB/title", "Lightning step speedup (per round)", "model step CPU-time speedup (per round)",
                   "build (uncached epochs)", "break-even epochs"):  # fmt: skip
        table.add_column(column, justify="right")
    for layer, row in results["layers"].items():
        rounds = ", ".join(f"{v:.2f}" for v in row["step_speedups"])
        model = ", ".join(f"{v:.2f}" for v in row["model_step_speedups"])
        table.add_row(str(layer), f"{row['kb_per_title']:.1f}", f"{row['step_speedup']:.2f}x ({rounds})",
                      f"{row['model_step_speedup']:.2f}x ({model})",
                      f"{row['build_in_uncached_epochs']:.2f}", f"{row['break_even_epochs']:.2f}")  # fmt: skip
    Console().print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("multitask", "clip"), default="multitask")
    parser.add_argument("--experiment", default="clip_offline_finetune", help="--family clip: the recipe")
    parser.add_argument("--text-layers", type=int, nargs="+", default=[5], help="--family clip: cache_text layers")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--rounds", type=int, default=2, help="--family clip: alternating timing rounds")
    parser.add_argument("--model-rounds", type=int, default=5, help="--family clip: model-only CPU-time rounds")
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
    if args.family == "clip":
        bench_clip(args)
        return

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
