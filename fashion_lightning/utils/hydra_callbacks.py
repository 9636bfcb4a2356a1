"""Hydra callbacks: a sweep summary so a multirun ends with one table, not N folders to open."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """On multirun end, collect every job's overrides + metrics.json into ``sweep_summary.csv``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = []
        for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").exists()):
            row: dict[str, Any] = {"job": job_dir.name}
            overrides = job_dir / ".hydra" / "overrides.yaml"
            if overrides.exists():
                row["overrides"] = " ".join(line.lstrip("- ").strip() for line in overrides.read_text().splitlines())
            metrics = job_dir / "metrics.json"
            if metrics.exists():
                row.update(json.loads(metrics.read_text()))
            rows.append(row)
        if not rows:
            return
        frame = pd.DataFrame(rows)
        metric = config.get("optimized_metric")
        if metric and metric in frame:
            frame = frame.sort_values(metric, ascending=False)
        out = sweep_dir / "sweep_summary.csv"
        frame.to_csv(out, index=False)
        best = frame.iloc[0]
        log.info(
            "sweep summary: %s (%d jobs; best job %s %s)",
            out,
            len(frame),
            best["job"],
            f"{metric}={best[metric]:.4f}" if metric in frame else "",
        )
