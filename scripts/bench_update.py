"""Living catalog: CPU time of an update (1% of items changed) against a full rebuild, measured in one run.

    nice python scripts/bench_update.py                        # synthetic catalog of 4,000 items, resnet18
    nice python scripts/bench_update.py --items 20000 --changed 0.01
    nice python scripts/bench_update.py --catalog <Kaggle zip or folder> --model <run>/model

Yesterday's index is built first (not measured). Today's catalog is yesterday's with ``--changed`` of the
items changed: a third recoloured (metadata), a third with a new photo, a third new items, plus as many
retired. Then, each from a cold image cache of today's catalog (both must read and decode it):

* ``fashion-index index.update_from=<yesterday> data.root=<today>`` (embeds only the changed items);
* ``fashion-index ckpt_path=<model> data.root=<today>`` (the full rebuild, the baseline).

CPU time = user + system of this process and its children (decode workers), from ``getrusage``. The
update must equal the rebuild: same ids in the same order, vectors within 1e-5, same top-10 for 200 items.
"""

from __future__ import annotations

import argparse
import platform
import resource
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

QUIET = ["data.num_workers=0", "+trainer.enable_progress_bar=false"]


def cfg(name: str, run: Path, cache: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_module("fashion_lightning.conf", version_base="1.3"):
        config = compose(name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(config)
    with open_dict(config):
        config.paths.output_dir, config.paths.cache_dir = str(run), str(cache)
        del config.hydra
    return config


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn):
    cpu, wall = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, cpu_seconds() - cpu, time.perf_counter() - wall


def today_from(yesterday: Path, out: Path, ids: list[int], share: float, seed: int) -> dict[str, int]:
    """Copy of the catalog folder with ``share`` of ``ids`` changed (recolour / new photo / new item) and as
    many retired."""
    shutil.copytree(yesterday, out)
    rng = np.random.default_rng(seed)
    lines = (out / "styles.csv").read_text(encoding="utf-8").splitlines()
    rows = {int(r.split(",", 1)[0]): r for r in lines[1:] if r.count(",") == 9 and r.split(",", 1)[0].isdigit()}
    pool = [i for i in ids if i in rows and (out / "images" / f"{i}.jpg").exists()]
    n = max(3, int(round(len(ids) * share)))
    picked = [int(i) for i in rng.choice(pool, size=n + n // 3 + 8, replace=False)]
    recolour, rephoto, donors = picked[: n // 3], picked[n // 3 : 2 * n // 3], picked[2 * n // 3 : n]
    retired = picked[n : n + n // 3]
    for item in recolour:
        fields = rows[item].split(",")
        fields[5] = "Red" if fields[5] != "Red" else "Blue"
        rows[item] = ",".join(fields)
    for item, donor in zip(rephoto, picked[-8:] * n):
        shutil.copyfile(out / "images" / f"{donor}.jpg", out / "images" / f"{item}.jpg")
    next_id = max(rows) + 1
    for offset, donor in enumerate(donors):
        rows[next_id + offset] = ",".join([str(next_id + offset), *rows[donor].split(",")[1:]])
        shutil.copyfile(out / "images" / f"{donor}.jpg", out / "images" / f"{next_id + offset}.jpg")
    for item in retired:
        del rows[item]
    (out / "styles.csv").write_text("\n".join([lines[0], *rows.values()]) + "\n", encoding="utf-8")
    return {"recoloured": len(recolour), "new photo": len(rephoto), "new": len(donors), "retired": len(retired)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4000, help="synthetic catalog size (without --catalog)")
    parser.add_argument("--catalog", type=Path, help="a Kaggle-layout catalog folder or zip instead")
    parser.add_argument("--model", type=Path, help="a model artefact (<run>/model); default: train one briefly")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", default="[112,96]")
    parser.add_argument("--changed", type=float, default=0.01)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    from fashion_lightning.apps.index import build
    from fashion_lightning.apps.train import train
    from fashion_lightning.data.synthetic import ensure_synthetic_catalog
    from fashion_lightning.retrieval import Recommender, load_index

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-update-"))
    cache = work / "cache"
    if args.catalog is None:
        yesterday = ensure_synthetic_catalog(cache, args.items, 0)
    elif args.catalog.suffix == ".zip":
        yesterday = work / "yesterday"
        with zipfile.ZipFile(args.catalog) as archive:
            archive.extractall(yesterday)  # the benchmark's own copy: today's catalog is edited from it
    else:
        yesterday = args.catalog
    data = [f"data.root={yesterday}", "data.min_count=5"]
    model = args.model
    if model is None:
        train(cfg("train", work / "train", cache, [
            f"model.net.backbone={args.backbone}", f"model.net.image_size={args.image_size}", *data,
            "data.train_transform=null", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
            "+trainer.limit_val_batches=1", "test=false", "logger=csv", "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null", "callbacks.early_stopping=null", *QUIET,
        ]))  # fmt: skip
        model = work / "train" / "model"
    parent = build(cfg("index", work / "yesterday-index", cache, [f"ckpt_path={model}", *data, *QUIET]))
    ids = pd.read_csv(parent / "items.csv", usecols=["id"])["id"].tolist()
    changes = today_from(yesterday, work / "today", ids, args.changed, seed=1)
    today = [f"data.root={work / 'today'}", "data.min_count=5"]
    updated, update_cpu, update_wall = measured(lambda: build(cfg(
        "index", work / "update", work / "cache-update", [f"index.update_from={parent}", *today, *QUIET]
    )))  # fmt: skip
    full, full_cpu, full_wall = measured(lambda: build(cfg(
        "index", work / "full", work / "cache-full", [f"ckpt_path={model}", *today, *QUIET]
    )))  # fmt: skip
    a, b = load_index(updated), load_index(full)
    assert a.ids.tolist() == b.ids.tolist(), "update and rebuild hold different items"
    max_diff = float(np.abs(a.vectors() - b.vectors()).max())
    rec_a, rec_b = Recommender(a), Recommender(b)
    probe = np.random.default_rng(2).choice(a.ids, size=min(200, a.n), replace=False)
    same = sum(rec_a.recommend(item_id=int(i), k=10).ids == rec_b.recommend(item_id=int(i), k=10).ids for i in probe)
    print(f"catalog: {a.n:,} items ({yesterday}); changes: {changes}; model {model}")
    print(f"machine: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs")
    print(f"{'run':<14} {'CPU s':>9} {'wall s':>9}")
    print(f"{'full rebuild':<14} {full_cpu:>9.1f} {full_wall:>9.1f}")
    print(f"{'update':<14} {update_cpu:>9.1f} {update_wall:>9.1f}")
    print(f"update / rebuild CPU time: {update_cpu / full_cpu:.3f} (goal <= 0.05)")
    print(f"equal to the rebuild: ids and order yes, max |vector diff| {max_diff:.2e}, same top-10 {same}/{len(probe)}")


if __name__ == "__main__":
    main()
