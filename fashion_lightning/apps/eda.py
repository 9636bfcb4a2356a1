"""fashion-eda: the data report of a catalog (cleaning counts, missing values, distributions,
cross-tabs, split balance) as PNG plots, CSV tables and ``eda_report.md`` in the run dir.

    fashion-eda                                             # the embedded synthetic catalog
    fashion-eda data=kaggle data.root=/path/to/fashion-product-images-small.zip top_n=40
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from fashion_lightning.data.profile import EdaResult, run_eda
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log
from fashion_lightning.utils.config_check import one_line_errors
from fashion_lightning.utils.task_wrapper import task_wrapper


@task_wrapper
def eda(cfg: DictConfig) -> EdaResult:
    datamodule = instantiate(cfg.data)  # writes data_report.json, splits.csv, vocab.json into the run dir
    title = "Synthetic catalog" if not cfg.data.get("root") else "Kaggle catalog"
    result = run_eda(datamodule, cfg.paths.output_dir, list(cfg.attributes), int(cfg.top_n), title=title)
    print_summary(result)
    return result


def print_summary(result: EdaResult, console: Console | None = None) -> None:
    report = result.data_report
    table = Table(title="fashion-eda", show_header=False)
    table.add_row("source", report.source)
    table.add_row("rows read / kept", f"{report.rows_read:,} / {report.rows_kept:,}")
    table.add_row("repaired", ", ".join(f"{k}={v}" for k, v in report.repaired.items()) or "none")
    table.add_row("dropped", ", ".join(f"{k}={v}" for k, v in report.dropped.items()) or "none")
    table.add_row("filled Unknown", ", ".join(f"{k}={v}" for k, v in report.filled.items()) or "none")
    table.add_row("splits", ", ".join(f"{s}={n:,}" for s, n in result.split_sizes["items"].items()))
    table.add_row("plots", f"{len(result.plots)} PNGs in {Path(result.output_dir) / 'plots'}")
    (console or Console()).print(table)
    (console or Console()).print(f"report: [bold]{result.report_path}[/bold]")


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="eda")
def main(cfg: DictConfig) -> None:
    with one_line_errors(FileNotFoundError, app="fashion-eda"):
        result = eda(cfg)
    log.info("EDA report written to %s", result.report_path)


if __name__ == "__main__":
    main()
