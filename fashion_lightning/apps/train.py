"""fashion-train: fit a model, test the best checkpoint, write metrics.json and the model artefact
(``<run>/model/``: what fashion-index, fashion-eval and others load) into the run dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fashion_lightning.models.artifact import ARTIFACT_DIR, save_artifact
from fashion_lightning.models.base import CheckpointError, FashionModule, load_module, read_checkpoint
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log
from fashion_lightning.utils.cluster import job_record
from fashion_lightning.utils.config_check import one_line_errors
from fashion_lightning.utils.instantiate import instantiate_callbacks, instantiate_loggers
from fashion_lightning.utils.reporting import print_summary, update_json
from fashion_lightning.utils.run_dir import run_dir_of
from fashion_lightning.utils.task_wrapper import task_wrapper


@task_wrapper
def train(cfg: DictConfig) -> dict[str, Any]:
    """Returns the final metrics (also in ``<run dir>/metrics.json``): floats, and ``best_checkpoint``."""
    resume_vocabs = None
    if cfg.get("ckpt_path"):  # resuming: keep the checkpoint's label space, continue in its run dir
        resume_vocabs = read_checkpoint(cfg.ckpt_path)["hyper_parameters"]["vocabs"]
        origin = run_dir_of(cfg.ckpt_path)
        if cfg.get("resume_in_place", True) and origin is not None:
            log.info(
                "resuming in the checkpoint's run dir %s (this launch's own folder: %s)", origin, cfg.paths.output_dir
            )
            with open_dict(cfg):
                cfg.paths.output_dir = str(origin)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, vocabs=resume_vocabs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, vocabs=datamodule.vocabs, class_weights=datamodule.class_weights)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg.get("callbacks")),
        logger=instantiate_loggers(cfg.get("logger")),
    )
    for logger in trainer.loggers:
        logger.log_hyperparams(cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)))

    trains = cfg.train and getattr(model, "requires_training", True)
    if trains:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.test:
        best = _best_checkpoint(trainer)
        if not best:
            log.info("no best checkpoint (not trained, or no checkpoint callback): testing the current weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        if not trains:  # e.g. a frozen CLIP model: keep a checkpoint for fashion-eval / fashion-index
            frozen = f"{cfg.paths.output_dir}/checkpoints/frozen.ckpt"
            trainer.save_checkpoint(frozen)
            metrics["best_checkpoint"] = frozen
    if trainer.is_global_zero:
        if best_checkpoint := _best_checkpoint(trainer):
            metrics["best_checkpoint"] = best_checkpoint
        metrics["model"] = str(_write_model(model, metrics.get("best_checkpoint"), cfg.paths.output_dir))
        metrics.update(job_record())  # which cluster job / process made this run (a sweep summary column)
        metrics = update_json(f"{cfg.paths.output_dir}/metrics.json", metrics)
        print_summary(metrics, "test" if cfg.test else "val", datamodule.vocabs.tasks)
        log.info("run dir: %s", cfg.paths.output_dir)
    return metrics


def _write_model(model: FashionModule, checkpoint: str | None, run_dir: str) -> Path:
    """``<run>/model/``: the tested weights (best checkpoint, else the current ones) as the artefact others
    load (safetensors + typed JSON, see models/artifact.py); fashion-index / fashion-eval take this folder."""
    module = load_module(checkpoint) if checkpoint else model
    target = save_artifact(module, Path(run_dir) / ARTIFACT_DIR, replace=True)
    log.info("model artefact: %s", target)
    return target


def _best_checkpoint(trainer: L.Trainer) -> str:
    """The checkpoint callback's best path ("" without one); Trainer types it as the Checkpoint base class."""
    return getattr(trainer.checkpoint_callback, "best_model_path", "") or ""


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with one_line_errors(CheckpointError, FileNotFoundError, app="fashion-train"):
        metrics = train(cfg)
    metric = cfg.get("optimized_metric")
    if metric and metric not in metrics:
        raise KeyError(
            f"optimized_metric {metric!r} was not logged; available: {sorted(k for k in metrics if '/' in k)[:20]}"
        )
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
