"""Run outputs every app shares: metrics.json merging and the terminal summary table."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fashion_lightning.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


def update_json(path: str | Path, values: Mapping, replace_prefix: str | None = None) -> dict:
    """Merge ``values`` into a JSON object file (created if missing), atomically; returns the result.

    ``replace_prefix`` first drops the file's keys with that prefix (e.g. a stage's stale metrics).
    """
    path = Path(path)
    data: dict = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; rewriting it", path)
    if replace_prefix:
        data = {k: v for k, v in data.items() if not k.startswith(replace_prefix)}
    data.update(values)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def task_table(metrics: Mapping[str, float], stage: str, tasks: list[str]) -> Table:
    """Per-task accuracy / macro-F1 next to the majority-class baseline."""
    table = Table(title=f"{stage} metrics")
    for col in ("task", "accuracy", "macro-F1", "majority baseline", "lift"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for task in tasks:
        acc = metrics.get(f"{stage}/acc/{task}")
        if acc is None:
            continue
        f1 = metrics.get(f"{stage}/f1/{task}", float("nan"))
        base = metrics.get(f"{stage}/baseline/{task}", float("nan"))
        table.add_row(task, f"{acc:.3f}", f"{f1:.3f}", f"{base:.3f}", f"{acc - base:+.3f}")
    return table


def print_summary(metrics: Mapping[str, float], stage: str, tasks: list[str], console: Console | None = None) -> None:
    console = console or Console()
    console.print(task_table(metrics, stage, tasks))
    retrieval = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{stage}/retrieval")}
    if retrieval:
        keys = [k for k in sorted(retrieval) if k.endswith("@10")]
        console.print("retrieval: " + ", ".join(f"{k}={retrieval[k]:.3f}" for k in keys))
