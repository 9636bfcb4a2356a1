"""fashion-download: get the Kaggle "Fashion Product Images (Small)" dataset with kagglehub.

    fashion-download                                          # into kagglehub's cache
    fashion-download target_dir=data/fashion-product-images-small
Then: ``fashion-train data=kaggle data.root=<printed path>``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console

from fashion_lightning.data.fetch import DownloadError, download_dataset, next_commands
from fashion_lightning.data.source import CatalogNotFoundError
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE
from fashion_lightning.utils.config_check import one_line_errors
from fashion_lightning.utils.reporting import update_json
from fashion_lightning.utils.task_wrapper import task_wrapper


@task_wrapper
def download(cfg: DictConfig, console: Console | None = None) -> Path:
    console = console or Console()
    root = download_dataset(cfg.handle, cfg.get("target_dir"), force=bool(cfg.force), mode=cfg.mode)
    update_json(Path(cfg.paths.output_dir) / "download.json", {"handle": cfg.handle, "root": str(root)})
    console.print(f"[bold green]catalog ready[/bold green]: {root}\nnext:")
    for command in next_commands(root):
        console.print(f"  {command}", markup=False, highlight=False)
    return root


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="download")
def main(cfg: DictConfig) -> None:
    with one_line_errors(DownloadError, CatalogNotFoundError, FileExistsError, app="fashion-download"):
        download(cfg)


if __name__ == "__main__":
    main()
