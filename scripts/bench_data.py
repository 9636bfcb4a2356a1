#!/usr/bin/env python
"""Training-dataloader throughput: FashionDataModule (image cache + native-size augmentation) vs a naive loader.

Both run in the same process with the same number of workers and batch size:

* **fast**: ``FashionDataModule.train_dataloader()`` with the default augmentation
  (``fashion_lightning.data.transforms.default_train_transform()``, the same pipeline as
  ``conf/data/default.yaml``): uint8 [B,3,80,60] read from the memory-mapped cache; the
  resize to the model's input size happens later on the model's device.
* **naive**: the usual torchvision recipe per sample: PIL open from an extracted image folder,
  ``Resize((224, 224))`` + ``ToTensor`` + ``Normalize`` (the study's 224x224 geometry; a
  shorter-side ``Resize(224)`` would give odd-sized images shapes that cannot be batched).

Uses the shared dev zip when present (a subset of its images is extracted to a temp folder for
the naive path), else the synthetic catalog. Steady-state images/s exclude the first batches
(worker start-up), which are reported separately.

    python scripts/bench_data.py                       # dev zip if ../shared is there, else synthetic
    python scripts/bench_data.py --root /path/to/fashion-product-images-small --workers 4
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T

from fashion_lightning.data.datamodule import FashionDataModule
from fashion_lightning.data.source import CatalogSource
from fashion_lightning.data.transforms import albumentations_train_transform, default_train_transform

REPO = Path(__file__).resolve().parents[1]
SHARED_ZIP = REPO.parent / "shared" / "data" / "fashion-product-images-small-dev.zip"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*is not writable.*")


class NaiveDataset(Dataset):
    """Per sample: open the JPEG with PIL, resize to 224x224, to a float tensor, normalise."""

    def __init__(self, paths: list[Path], labels: np.ndarray, ids: np.ndarray) -> None:
        self.paths, self.labels, self.ids = [str(p) for p in paths], torch.as_tensor(labels), torch.as_tensor(ids)
        self.transform = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.paths[index]) as img:
            image = self.transform(img.convert("RGB"))
        return {"image": image, "labels": self.labels[index], "id": self.ids[index]}


def _cycle(loader: DataLoader) -> Iterator[dict]:
    """Batches over as many epochs as needed (persistent workers are reused between epochs)."""
    for _ in itertools.count():
        yield from loader


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by this process and the given worker processes (Linux /proc)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            return float("nan")
    return total


def measure(make_loader: Callable[[], DataLoader], batches: int, warmup: int) -> dict[str, float]:
    """Seconds to the first batch, then steady-state images/s over ``batches`` batches after ``warmup``.

    Also the CPU seconds the main process and the workers spent in that window: images per
    CPU-second is what the loader costs, which a busy machine distorts much less than images/s.
    """
    loader = make_loader()
    it = _cycle(loader)
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        next(it)
    workers = getattr(getattr(loader, "_iterator", None), "_workers", [])
    pids = [w.pid for w in workers]
    images, cpu0, start = 0, _cpu_seconds(pids), time.perf_counter()
    for _ in range(batches):
        images += len(next(it)["image"])
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu0
    it.close()
    if getattr(loader, "_iterator", None) is not None:
        loader._iterator._shutdown_workers()  # persistent workers: stop them before the next measurement
    del it, loader
    gc.collect()
    return {"first_batch_s": first, "images": images, "seconds": elapsed, "images_per_s": images / elapsed,
            "images_per_cpu_s": images / cpu if cpu > 0 else float("nan")}  # fmt: skip


def naive_folder(source: CatalogSource, ids: list[int], workdir: Path) -> list[Path]:
    """Image paths of ``ids`` in a plain folder: the source's own files, or extracted from a zip."""
    if not source.is_zip:
        return [source.root / source.image_paths[i] for i in ids]
    folder = workdir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in ids:
        path = folder / Path(source.image_paths[i]).name
        path.write_bytes(source.image_bytes(i))
        paths.append(path)
    return paths


def profile_fast_path(dm: FashionDataModule, samples: int = 2000) -> dict[str, float]:
    """Single-process cost per sample of each stage of the fast path (microseconds)."""
    ds = dm.datasets["train"]
    n = min(samples, len(ds))
    transform, stock = default_train_transform(), albumentations_train_transform()
    images = [ds.image(i) for i in range(n)]  # warm the page cache
    start = time.perf_counter()
    images = [ds.image(i) for i in range(n)]
    read = time.perf_counter() - start
    start = time.perf_counter()
    for img in images:
        transform(image=img)
    aug = time.perf_counter() - start
    start = time.perf_counter()
    for img in images:
        stock(image=img)
    stock_aug = time.perf_counter() - start
    start = time.perf_counter()
    items = [ds[i] for i in range(n)]
    getitem = time.perf_counter() - start
    bs = dm.hparams.batch_size
    start = time.perf_counter()
    for k in range(0, n - bs + 1, bs):
        default_collate(items[k : k + bs])
    collate = time.perf_counter() - start
    return {
        "memmap read": 1e6 * read / n,
        "augmentation (default: stock warp + LUT)": 1e6 * aug / n,
        "augmentation (stock albumentations chain)": 1e6 * stock_aug / n,
        "__getitem__ (read + aug + tensors)": 1e6 * getitem / n,
        "collate (per sample)": 1e6 * collate / max(1, (n // bs) * bs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", default=None, help="Kaggle folder / nested folder / zip (default: shared dev zip, else synthetic)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=300, help="timed batches of the fast loader")
    parser.add_argument(
        "--naive-batches", type=int, default=None, help="timed batches of the naive loader (default: batches/10)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="both loaders (conf/data default: 64)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    parser.add_argument("--cache-dir", default=os.environ.get("FASHION_LIGHTNING_CACHE", "~/.cache/fashion-lightning"))
    parser.add_argument("--num-items", type=int, default=1200, help="synthetic catalog size when no real data is used")
    parser.add_argument("--no-profile", action="store_true", help="skip the single-process per-stage profile")
    parser.add_argument(
        "--no-stock", action="store_true", help="skip the stock-albumentations variant of the fast loader"
    )
    args = parser.parse_args()
    console = Console()

    root = args.root or (str(SHARED_ZIP) if SHARED_ZIP.is_file() else None)
    console.print(f"data: {root or f'synthetic catalog ({args.num_items} items)'}; cache: {args.cache_dir}")
    start = time.perf_counter()
    dm = FashionDataModule(
        root=root, num_items=args.num_items, cache_dir=args.cache_dir, output_dir=None, min_count=5,
        train_transform=default_train_transform(), batch_size=args.batch_size, num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    console.print(f"datamodule ready in {time.perf_counter() - start:.1f}s (image cache built or reused): "
                  f"{len(dm.datasets['train'])} train items")  # fmt: skip

    fast = measure(dm.train_dataloader, args.batches, args.warmup)
    stock = None
    if not args.no_stock:
        default = dm.datasets["train"].transform
        dm.datasets["train"].transform = albumentations_train_transform()
        stock = measure(dm.train_dataloader, args.batches, args.warmup)
        dm.datasets["train"].transform = default

    naive_batches = args.naive_batches or max(5, args.batches // 10)
    needed = (naive_batches + args.warmup) * args.batch_size
    train = dm.frames["train"]
    rng = np.random.default_rng(0)
    pick = rng.choice(len(train), size=min(needed, len(train)), replace=False)
    workdir = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        t0 = time.perf_counter()
        ids = train["id"].to_numpy()[pick]
        paths = naive_folder(dm.catalog.source, ids.tolist(), workdir)
        extract_s = time.perf_counter() - t0
        naive_ds = NaiveDataset(paths, dm.vocabs.encode(train.iloc[pick]), ids)
        naive = measure(
            lambda: DataLoader(naive_ds, batch_size=args.batch_size, shuffle=True, drop_last=True,
                               num_workers=args.workers, persistent_workers=args.workers > 0),
            naive_batches, args.warmup,
        )  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    load = os.getloadavg()
    table = Table(title=f"training dataloader, {args.workers} workers, batch {args.batch_size}, {os.cpu_count()} CPUs")
    for col in ("loader", "output per sample", "timed images", "first batch (s)", "images/s", "images/CPU-s"):
        table.add_column(col, justify="left" if col in ("loader", "output per sample") else "right")
    rows = [("fast: cache + default augmentation (80x60)", "uint8 [3,80,60]", fast),
            ("naive: PIL + Resize 224 + ToTensor + Normalize", "float32 [3,224,224]", naive)]  # fmt: skip
    if stock is not None:
        rows.insert(1, ("fast, stock albumentations chain", "uint8 [3,80,60]", stock))
    for name, shape, r in rows:
        table.add_row(name, shape, f"{r['images']:,}", f"{r['first_batch_s']:.2f}", f"{r['images_per_s']:,.0f}",
                      f"{r['images_per_cpu_s']:,.0f}")  # fmt: skip
    console.print(table)
    ratio = fast["images_per_s"] / naive["images_per_s"]
    cpu_ratio = fast["images_per_cpu_s"] / naive["images_per_cpu_s"]
    ok_ratio, ok_abs = ratio >= 10, fast["images_per_s"] >= 5000
    if stock is not None:
        stock_ratio = stock["images_per_s"] / naive["images_per_s"]
        stock_cpu_ratio = stock["images_per_cpu_s"] / naive["images_per_cpu_s"]
        console.print(f"stock albumentations chain: {stock_ratio:.1f}x images/s, "
                      f"{stock_cpu_ratio:.1f}x per CPU-second vs naive")  # fmt: skip
    console.print(f"ratio fast/naive: [bold]{ratio:.1f}x[/bold] images/s, {cpu_ratio:.1f}x per CPU-second "
                  f"(target >= 10x: {'met' if ok_ratio else 'MISSED'}); "
                  f"fast >= 5,000 images/s: {'met' if ok_abs else 'MISSED'}")  # fmt: skip
    console.print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs"
                  f"{' (busy machine: numbers are lower bounds)' if load[0] > (os.cpu_count() or 1) else ''}; "
                  f"naive images extracted in {extract_s:.1f}s")  # fmt: skip

    if not args.no_profile:
        prof = Table(title="fast path, one process, per sample")
        prof.add_column("stage")
        prof.add_column("µs", justify="right")
        prof.add_column("≙ images/s/core", justify="right")
        for stage, us in profile_fast_path(dm).items():
            prof.add_row(stage, f"{us:.1f}", f"{1e6 / us:,.0f}")
        console.print(prof)


if __name__ == "__main__":
    main()
