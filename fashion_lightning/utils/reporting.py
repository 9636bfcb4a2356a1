"""Run outputs every app shares: metrics.json merging and the terminal summary table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table


def update_json(path: str | Path, values: Mapping) -> dict:
    """Merge ``values`` into a JSON object file (created if missing); returns the merged dict."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
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
