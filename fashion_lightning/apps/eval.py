"""fashion-eval: evaluate a checkpoint (either model family) on any Kaggle-layout catalog.

The checkpoint's own vocabulary labels the data; labels it never saw are counted per task
and written to ``metrics.json`` (``unseen_labels``) instead of crashing the run.
"""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from fashion_lightning.models.base import CheckpointError, load_module
from fashion_lightning.utils.app import CONFIG_PATH, VERSION_BASE, log
from fashion_lightning.utils.cluster import job_record
from fashion_lightning.utils.config_check import one_line_errors
from fashion_lightning.utils.instantiate import instantiate_callbacks, instantiate_loggers
from fashion_lightning.utils.reporting import print_summary, update_json
from fashion_lightning.utils.task_wrapper import task_wrapper


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    module = load_module(cfg.ckpt_path)
    datamodule = instantiate(cfg.data, vocabs=module.vocabs.to_dict(), tasks=module.vocabs.tasks)
    datamodule.setup("test")
    unseen = datamodule.unseen_labels()
    for task, labels in unseen.items():
        log.warning(
            "%s: %d item(s) carry labels the checkpoint never saw (%s); scored as %s",
            task,
            sum(labels.values()),
            ", ".join(list(labels)[:5]),
            "'Other'" if module.vocabs[task].other_index >= 0 else "unknown (ignored)",
        )
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_callbacks(cfg.get("callbacks")),
        logger=instantiate_loggers(cfg.get("logger")),
    )
    trainer.test(module, datamodule=datamodule)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(
        {
            "checkpoint": str(cfg.ckpt_path),
            "eval_split": cfg.data.split,
            "eval_items": len(datamodule.predict_frame),
            "unseen_labels": unseen,
            **job_record(),  # which cluster job / process made this run
        }
    )
    if trainer.is_global_zero:
        metrics = update_json(f"{cfg.paths.output_dir}/metrics.json", metrics)
        print_summary(metrics, "test", module.vocabs.tasks)
        log.info("run dir: %s", cfg.paths.output_dir)
    return metrics


@hydra.main(version_base=VERSION_BASE, config_path=CONFIG_PATH, config_name="eval")
def main(cfg: DictConfig) -> None:
    with one_line_errors(CheckpointError, FileNotFoundError, app="fashion-eval"):
        evaluate(cfg)


if __name__ == "__main__":
    main()
