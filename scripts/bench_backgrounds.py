"""Background robustness of a saved model: photo queries on plain vs busy backgrounds.

Shoppers' photos have backgrounds; the catalog's do not. This embeds a split of the catalog as the
gallery (what an index built from the model serves), then queries it with a seeded sample of the
split's own photos, "re-shot" (mild shift / zoom / brightness) once on their plain background and once
cut out and pasted on busy backgrounds (other products, blurred, tinted): the protocol of
:mod:`fashion_lightning.evaluation.backgrounds`, deterministic for a seed. Reports exact-item top-1 /
top-5 and same-articleType precision@5 for both query sets, and busy / plain as a ratio.

    python scripts/bench_backgrounds.py --model outputs/<run>/model --root <catalog.zip> \\
        --splits outputs/<run>/splits.csv --split test --queries 1000

Use the run's own ``splits.csv`` so the queries are items the model was not trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fashion_lightning.utils.atomic import atomic_write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model artefact folder (<run>/model) or .ckpt")
    parser.add_argument("--root", default=None, help="catalog folder or .zip (default: the synthetic catalog)")
    parser.add_argument("--splits", default=None, help="the run's splits.csv (default: a fresh seeded split)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    parser.add_argument("--max-items", type=int, default=None, help="seeded catalog subset (as data.max_items)")
    parser.add_argument("--queries", type=int, default=1000, help="photo queries (a seeded sample of the split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="~/.cache/fashion-lightning")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.batch_size < 1:
        parser.error("--queries and --batch-size must be >= 1")
    return args


@torch.no_grad()
def run(args: argparse.Namespace) -> dict[str, float]:
    from fashion_lightning.data.datamodule import FashionDataModule
    from fashion_lightning.evaluation.backgrounds import background_robustness
    from fashion_lightning.models.base import load_module

    module = load_module(args.model)
    dm = FashionDataModule(
        root=args.root, cache_dir=args.cache_dir, splits_path=args.splits, split=args.split, vocabs=module.vocabs,
        max_items=args.max_items, train_transform=None, eval_batch_size=args.batch_size, num_workers=0,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("test")
    dataset = dm.datasets[args.split]
    if "articleType" not in module.vocabs.tasks:
        raise ValueError("the model's vocabulary has no articleType task")
    embeddings, ids = [], []
    for batch in dm.test_dataloader():
        embeddings.append(module.embed_items(batch)["embedding"].float().cpu())
        ids += batch["id"].tolist()
    types = dataset.labels[:, module.vocabs.tasks.index("articleType")]
    row_of = {int(item): row for row, item in enumerate(dataset.ids.tolist())}
    return background_robustness(
        module.embed_images, torch.cat(embeddings), ids, types,
        lambda item: dataset.image(row_of[item]), args.queries, args.seed,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not Path(args.model).exists():
        print(f"error: --model {args.model}: no such file or folder", file=sys.stderr)
        raise SystemExit(2)
    try:
        metrics = run(args)
    except (ValueError, FileNotFoundError, OSError) as err:  # bad model / catalog / splits: one line, exit 2
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        raise SystemExit(2) from None
    table = Table(title=f"background robustness ({args.split} split, {args.queries} queries, seed {args.seed})")
    for column in ("metric", "plain", "busy", "busy / plain"):
        table.add_column(column, justify="right" if column != "metric" else "left")
    for key in ("top1", "top5", "same_type_p@5"):
        plain, busy = metrics[f"plain/{key}"], metrics[f"busy/{key}"]
        table.add_row(key, f"{plain:.3f}", f"{busy:.3f}", f"{busy / plain:.2f}x" if plain else "-")
    Console().print(table)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(metrics, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
