"""Hydra callbacks: a sweep summary so a multirun ends with one table, not N folders to open.

With a parallel launcher (``hydra/launcher=local|slurm|ray_cluster``) every job is its own process,
possibly on another machine: the summary reads what each job left in its run dir (overrides,
metrics.json with the ``job/*`` record of the cluster job that ran it, FAILED.txt), so it holds every
job, also one that failed or was killed before writing metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from fashion_lightning.utils.atomic import atomic_write_text
from fashion_lightning.utils.cluster import env_rank
from fashion_lightning.utils.task_wrapper import FAILURE_MARKER

log = logging.getLogger(__name__)


#: Hydra's launcher that runs jobs one after another (any other launcher runs a sweeper's batch at once)
SERIAL_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


class SweepSummary(Callback):
    """On multirun end, collect every job's overrides + metrics.json into ``sweep_summary.csv``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        n_jobs = config.hydra.sweeper.get("n_jobs")
        if n_jobs == 1 and launcher != SERIAL_LAUNCHER:
            log.warning(
                "hydra.sweeper.n_jobs=1: the sweeper hands %s one trial at a time, so trials run one after "
                "another; set hydra.sweeper.n_jobs=N to run N at once",
                launcher.rsplit(".", 1)[-1],
            )

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        """After each job of a multirun, in the job's own process (rank 0): refresh the summary, so it
        exists, with the failed jobs marked, also when a failure ends the sweep before on_multirun_end."""
        if config.hydra.get("mode") != RunMode.MULTIRUN or env_rank() != 0:
            return
        with contextlib.suppress(OSError):  # the final summary is still written when the sweep ends
            write_summary(Path(config.hydra.sweep.dir), config.get("optimized_metric"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        metric = config.get("optimized_metric")
        written = write_summary(Path(config.hydra.sweep.dir), metric)
        if written is None:
            return
        out, frame = written
        best = frame.iloc[0]
        log.info(
            "sweep summary: %s (%d jobs; best job %s %s)",
            out,
            len(frame),
            best["job"],
            f"{metric}={best[metric]:.4f}" if metric in frame else "",
        )


def write_summary(sweep_dir: Path, metric: str | None) -> tuple[Path, pd.DataFrame] | None:
    """``<sweep>/sweep_summary.csv`` from what every job left in its dir (atomically: jobs of a parallel
    launcher may write it at the same time); None when no job has a dir yet."""
    rows = []
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").exists()):
        row: dict[str, Any] = {"job": job_dir.name, "status": _status(job_dir)}
        overrides = job_dir / ".hydra" / "overrides.yaml"
        if overrides.exists():
            row["overrides"] = " ".join(line.lstrip("- ").strip() for line in overrides.read_text().splitlines())
        metrics = job_dir / "metrics.json"
        if metrics.exists():
            with contextlib.suppress(ValueError):  # not JSON: the status column still says what happened
                row.update(json.loads(metrics.read_text()))
        rows.append(row)
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    if metric and metric in frame:
        frame = frame.sort_values(metric, ascending=False)
    out = atomic_write_text(sweep_dir / "sweep_summary.csv", frame.to_csv(index=False))
    return out, frame


def _status(job_dir: Path) -> str:
    """done (metrics.json), failed (FAILED.txt, by any rank), or no result (killed, or still running)."""
    if any(job_dir.glob(f"{Path(FAILURE_MARKER).stem}*.txt")):
        return "failed"
    return "done" if (job_dir / "metrics.json").exists() else "no result"
