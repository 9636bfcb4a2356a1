"""fashion-export: a trained model -> ONNX graphs + manifest in the run folder, checked against PyTorch.

Reads the model artefact (``<run>/model``; a .ckpt of one's own training also works, loaded without
unpickling code), writes ``<run dir>/onnx/`` (see ``deploy/bundle.py``) and checks it on catalog photos
of the validation split before the folder appears. ``quantize=dynamic|static`` adds an int8 image graph
and reports its accuracy cost on that split. Bad input, a missing onnxruntime or a failed check end with
one line and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from fashion_lightning.models.artifact import model_identity
from fashion_lightning.models.base import CheckpointError, load_module
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log
from fashion_lightning.utils.config_check import ConfigError, one_line_errors
from fashion_lightning.utils.task_wrapper import task_wrapper

FORMATS = ("onnx",)
QUANTIZE = (None, "dynamic", "static")


@task_wrapper
def export(cfg: DictConfig) -> Path:
    """Returns the export folder."""
    from torch.utils.data import DataLoader, Subset

    from fashion_lightning.deploy.bundle import require
    from fashion_lightning.deploy.onnx_export import export_onnx, sample_from_loader

    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format!r}: only {', '.join(FORMATS)} is supported")
    if cfg.quantize not in QUANTIZE:
        raise ConfigError(f"quantize={cfg.quantize!r}: must be null, dynamic or static")
    for key in ("check_items", "calibration_items", "report_items"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]!r}: must be a whole number >= 1")
    keep = cfg.get("keep_fp32")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 0):
        raise ConfigError(f"keep_fp32={keep!r}: must be a whole number >= 0")
    require("onnx")
    require("onnxruntime")
    L.seed_everything(cfg.seed, workers=True)
    source = Path(cfg.ckpt_path).expanduser().resolve()
    module = load_module(source)
    out_dir = Path(cfg.out_dir or Path(cfg.paths.output_dir) / "onnx")
    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists; choose another out_dir (an export folder is never overwritten)")
    datamodule = instantiate(cfg.data, vocabs=module.vocabs.to_dict(), tasks=module.vocabs.tasks)
    datamodule.setup("predict")
    loader = datamodule.predict_dataloader()
    sample = sample_from_loader(loader, int(cfg.check_items))
    calibration, report = None, None
    if cfg.quantize:
        report = sample_from_loader(loader, int(cfg.report_items), with_labels=True)
        if cfg.quantize == "static":
            train = datamodule.datasets["train"]
            rng = np.random.default_rng(cfg.seed)
            rows = np.sort(rng.choice(len(train), min(len(train), int(cfg.calibration_items)), replace=False))
            calibration = sample_from_loader(DataLoader(Subset(train, rows.tolist()), batch_size=64),
                                             len(rows)).images  # fmt: skip
    manifest = export_onnx(
        module,
        out_dir,
        model_identity(source, module),
        sample,
        cfg.quantize,
        calibration,
        report,
        cfg.threads,
        cfg.get("keep_fp32"),
    )
    _print_summary(out_dir, manifest, str(datamodule.hparams.split))
    return out_dir


def _print_summary(out_dir: Path, manifest: dict[str, Any], split: str) -> None:
    console = Console()
    check = manifest["check"]
    sizes = ", ".join(f"{name} {record['bytes'] / 2**20:.1f} MiB" for name, record in manifest["files"].items()
                      if name.endswith(".onnx"))  # fmt: skip
    console.print(
        f"[bold]onnx[/bold] {out_dir}: {sizes}; self-check on {check['images']} {split} photos: min cosine "
        f"{check['min_cosine']:.6f}, same attributes"
        + (
            f", {check['texts']} texts min cosine {check['min_text_cosine']:.6f}" if "texts" in check else ""
        )  # fmt: skip
    )
    int8 = manifest.get("int8")
    if not int8:
        return
    report = int8["report"]
    table = Table(title=f"int8 ({int8['method']}) vs fp32 on {report['items']} {split} photos")
    for column in ("task", "fp32 acc", "int8 acc", "delta (points)"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, acc in report["accuracy"].items():
        table.add_row(task, f"{acc['fp32']:.4f}", f"{acc['int8']:.4f}", f"{acc['delta_points']:+.2f}")
    console.print(table)
    console.print(
        f"retrieval overlap@10 int8 vs fp32: {report['overlap_at_10']:.3f}; embedding cosine min "
        f"{report['cosine']['min']:.4f}, mean {report['cosine']['mean']:.4f}"
    )


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    from fashion_lightning.deploy.bundle import OnnxBundleError
    from fashion_lightning.deploy.onnx_export import ExportCheckError

    with one_line_errors(CheckpointError, FileNotFoundError, OnnxBundleError, ExportCheckError, app="fashion-export"):
        out_dir = export(cfg)
        log.info("export written to %s", out_dir)


if __name__ == "__main__":
    main()
