"""EvaluationCallback: the one evaluation protocol shared by every model family.

It collects the dicts that ``validation_step`` / ``test_step`` return (labels, ids, optional
per-task logits and an L2-normalised item embedding), and at epoch end computes per-task
accuracy / macro-F1 / majority baseline, item-to-item retrieval metrics and the module's
``extra_metrics``; it logs scalars to every logger, figures to loggers that take images, and
writes ``<output_dir>/metrics.json`` plus PNGs under ``<output_dir>/plots/``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
)

from fashion_lightning.data.schema import IGNORE_INDEX, UNKNOWN
from fashion_lightning.evaluation.backgrounds import background_robustness
from fashion_lightning.evaluation.plots import confusion_matrix_figure, pca_scatter_figure, save_figure
from fashion_lightning.evaluation.retrieval import retrieval_metrics_by_relevance
from fashion_lightning.utils.reporting import update_json
from fashion_lightning.utils.subsample import seeded_subsample

log = logging.getLogger(__name__)

STAGES = ("val", "test")


class EpochOutputs:
    """Step outputs of one epoch, detached on CPU; concatenated once at epoch end.

    Tensors with a batch dimension are kept (0-dim ones such as a loss are dropped), lists
    (e.g. texts) are extended, and the ``logits`` dict is kept per task.
    """

    def __init__(self) -> None:
        self._parts: dict[str, list] = defaultdict(list)
        self._logits: dict[str, list[torch.Tensor]] = defaultdict(list)

    def __len__(self) -> int:
        return sum(part.shape[0] for part in self._parts.get("labels", []))

    def add(self, outputs: Mapping[str, Any]) -> None:
        for key, value in outputs.items():
            if key == "logits" and isinstance(value, Mapping):
                for task, logits in value.items():
                    self._logits[task].append(logits.detach().cpu())
            elif isinstance(value, torch.Tensor) and value.ndim > 0:
                self._parts[key].append(value.detach().cpu())
            elif isinstance(value, (list, tuple)):
                self._parts[key].append(list(value))

    def concat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, parts in self._parts.items():
            out[key] = torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [x for part in parts for x in part]
        if self._logits:
            out["logits"] = {task: torch.cat(parts) for task, parts in self._logits.items()}
        return out


def merge_outputs(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate already-concatenated outputs (one per process) into one."""
    merged = EpochOutputs()
    for part in parts:
        merged.add(part)
    return merged.concat()


def drop_duplicate_ids(outputs: dict[str, Any]) -> dict[str, Any]:
    """Keep the first row per ``id``: a DistributedSampler pads shards by repeating items."""
    ids = outputs["id"].tolist()
    first: dict[int, int] = {}
    for row, item in enumerate(ids):
        first.setdefault(item, row)
    if len(first) == len(ids):
        return outputs
    keep = torch.tensor(sorted(first.values()))
    return _select_rows(outputs, keep)


def _select_rows(outputs: Mapping[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in outputs.items():
        if key == "logits":
            out[key] = {task: logits[rows] for task, logits in value.items()}
        elif isinstance(value, torch.Tensor):
            out[key] = value[rows]
        else:
            out[key] = [value[i] for i in rows.tolist()]
    return out


def majority_baseline(target: torch.Tensor) -> float:
    """Accuracy of always predicting the most frequent class *of the evaluated labels themselves*.

    This is an optimistic reference (it peeks at the evaluated split); a model below it has
    learnt less than the label prior.
    """
    valid = target[target != IGNORE_INDEX]
    return float(torch.bincount(valid).max()) / valid.numel()


def classification_metrics(
    logits: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    vocabs: Any,
    tasks: Sequence[str],
) -> dict[str, float]:
    """``acc/{task}`` (micro), ``f1/{task}`` (macro over classes present) and ``baseline/{task}``."""
    metrics: dict[str, float] = {}
    for task in tasks:
        target = labels[:, vocabs.tasks.index(task)]
        if not bool((target != IGNORE_INDEX).any()):
            log.info("evaluation: skipping task %s: every label is unknown (-1)", task)
            continue
        preds = logits[task].float()
        num_classes = int(vocabs.num_classes[task])
        metrics[f"acc/{task}"] = float(
            multiclass_accuracy(preds, target, num_classes, average="micro", ignore_index=IGNORE_INDEX)
        )
        metrics[f"f1/{task}"] = float(
            multiclass_f1_score(preds, target, num_classes, average="macro", ignore_index=IGNORE_INDEX)
        )
        metrics[f"baseline/{task}"] = majority_baseline(target)
    return metrics


class EvaluationCallback(L.Callback):
    """Computes, logs and stores the evaluation metrics and plots of the contract's evaluation protocol.

    ``results`` holds the latest metrics of every stage (flat keys such as ``test/acc/articleType``)
    on every rank; only global rank 0 writes files. Nothing is logged or written during the
    sanity check. In multi-process runs the outputs of all ranks are gathered (duplicates
    from sampler padding dropped by id), so every rank computes the same whole-split metrics.

    Args:
        output_dir: where ``metrics.json`` and ``plots/`` go; default ``trainer.default_root_dir``.
        tasks: tasks to score; default every vocabulary task the module returns logits for.
        confusion_tasks / pca_attributes: tasks that get a confusion matrix / a PCA colouring.
        retrieval_ks: cut-offs of the retrieval metrics.
        strict_columns / retrieval_columns: label columns that must all match for ``retrieval_strict``
            / ``retrieval`` relevance.
        plot_every_n_val_epochs: during fit, plot at the end of every N-th and of the last epoch
            (0: never at validation); standalone ``validate`` and ``test`` always plot.
        max_retrieval_items: above this, retrieval runs on a seeded subsample (logged).
        enabled_stages: subset of ``("val", "test")``.
        seed: seed of the retrieval and PCA subsamples.
        background_queries: photo queries of the background-robustness evaluation (plain vs busy
            background, :mod:`~fashion_lightning.evaluation.backgrounds`) per stage; 0 = off.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        tasks: Sequence[str] | None = None,
        confusion_tasks: Sequence[str] = ("articleType", "masterCategory"),
        pca_attributes: Sequence[str] = ("masterCategory", "articleType"),
        retrieval_ks: Sequence[int] = (1, 5, 10),
        strict_columns: Sequence[str] = ("articleType", "baseColour", "gender"),
        plot_every_n_val_epochs: int = 1,
        max_retrieval_items: int = 20000,
        enabled_stages: Sequence[str] = ("val", "test"),
        retrieval_columns: Sequence[str] = ("articleType",),
        seed: int = 0,
        background_queries: int = 0,
    ) -> None:
        super().__init__()
        unknown = set(enabled_stages) - set(STAGES)
        if unknown:
            raise ValueError(f"enabled_stages must be among {STAGES}, got {sorted(unknown)}")
        if plot_every_n_val_epochs < 0 or max_retrieval_items < 2 or background_queries < 0:
            raise ValueError("plot_every_n_val_epochs and background_queries must be >= 0 and max_retrieval_items >= 2")
        self.output_dir = output_dir
        self.tasks = None if tasks is None else list(tasks)
        self.confusion_tasks = list(confusion_tasks)
        self.pca_attributes = list(pca_attributes)
        self.retrieval_ks = tuple(int(k) for k in retrieval_ks)
        self.retrieval_columns = list(retrieval_columns)
        self.strict_columns = list(strict_columns)
        self.plot_every_n_val_epochs = int(plot_every_n_val_epochs)
        self.max_retrieval_items = int(max_retrieval_items)
        self.enabled_stages = tuple(enabled_stages)
        self.seed = int(seed)
        self.background_queries = int(background_queries)
        self.results: dict[str, float] = {}
        self._buffers: dict[str, EpochOutputs] = {}
        self._warned_no_outputs = False

    # ----------------------------------------------------------------- collection
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("val", pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start("test", pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect("val", outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect("test", outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._buffers.pop("val", None)
            return
        self._finish("val", trainer, pl_module, plot=self._plot_this_val_epoch(trainer))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("test", trainer, pl_module, plot=True)

    def _start(self, stage: str, pl_module: L.LightningModule) -> None:
        if stage not in self.enabled_stages:
            return
        if getattr(pl_module, "vocabs", None) is None:
            raise AttributeError(f"EvaluationCallback needs `{type(pl_module).__name__}.vocabs` (LabelVocabs)")
        self._buffers[stage] = EpochOutputs()

    def _collect(self, stage: str, outputs: Any) -> None:
        buffer = self._buffers.get(stage)
        if buffer is None:
            return
        if not isinstance(outputs, Mapping) or "labels" not in outputs:
            if not self._warned_no_outputs:
                log.warning("evaluation: %s step returned no dict with 'labels'; nothing to evaluate", stage)
                self._warned_no_outputs = True
            return
        buffer.add(outputs)

    def _plot_this_val_epoch(self, trainer: L.Trainer) -> bool:
        """Standalone ``validate`` always plots; during fit every N-th epoch and the last one."""
        if trainer.state.fn != "fit":
            return True
        n = self.plot_every_n_val_epochs
        epoch = trainer.current_epoch + 1
        return n > 0 and (epoch % n == 0 or epoch == trainer.max_epochs)

    # ----------------------------------------------------------------- epoch end
    def _finish(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule, plot: bool) -> None:
        buffer = self._buffers.pop(stage, None)
        if buffer is None or len(buffer) == 0:
            return
        outputs = _gather(buffer.concat(), trainer)
        computed = self.compute_metrics(stage, outputs, pl_module) | self._background(
            stage, trainer, pl_module, outputs
        )
        metrics = {f"{stage}/{key}": value for key, value in computed.items()}
        sync = trainer.world_size > 1  # values are identical on every rank; syncing only silences the DDP warning
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=sync)
        self.results = {k: v for k, v in self.results.items() if not k.startswith(f"{stage}/")} | metrics
        if not trainer.is_global_zero:
            return
        out_dir = Path(self.output_dir or trainer.default_root_dir)
        write_metrics_json(out_dir / "metrics.json", stage, metrics, trainer.current_epoch, trainer.global_step)
        if plot:
            self._plot(stage, outputs, pl_module, trainer, out_dir / "plots")

    def compute_metrics(self, stage: str, outputs: Mapping[str, Any], pl_module: L.LightningModule) -> dict[str, float]:
        """All metrics of one stage, keys without the stage prefix."""
        vocabs = pl_module.vocabs
        labels = outputs["labels"].long()
        metrics = classification_metrics(outputs.get("logits", {}), labels, vocabs, self._eval_tasks(outputs, vocabs))
        if "embedding" in outputs:
            metrics |= self._retrieval(outputs["embedding"], labels, vocabs, pl_module.device)
        hook = getattr(pl_module, "extra_metrics", None)
        if callable(hook):
            metrics |= {key: float(value) for key, value in hook(stage, outputs).items()}
        return metrics

    def _eval_tasks(self, outputs: Mapping[str, Any], vocabs: Any) -> list[str]:
        logits = outputs.get("logits", {})
        wanted = self.tasks if self.tasks is not None else vocabs.tasks
        missing = [t for t in wanted if t not in vocabs.tasks]
        if missing:
            log.warning("evaluation: tasks %s are not in the vocabulary %s; ignored", missing, vocabs.tasks)
        return [t for t in wanted if t in logits and t in vocabs.tasks]

    def _retrieval(
        self, embedding: torch.Tensor, labels: torch.Tensor, vocabs: Any, device: torch.device
    ) -> dict[str, float]:
        """``retrieval/*`` (same articleType) and ``retrieval_strict/*``, on a seeded subsample if large."""
        rows = seeded_subsample(embedding.shape[0], self.max_retrieval_items, self.seed)
        if rows is not None:
            log.info("evaluation: retrieval on a seeded subsample of %d of %d items", rows.numel(), embedding.shape[0])
            embedding, labels = embedding[rows], labels[rows]
        relevance: dict[str, list[int]] = {}
        for prefix, columns in (("retrieval", self.retrieval_columns), ("retrieval_strict", self.strict_columns)):
            if set(columns) <= set(vocabs.tasks):
                relevance[prefix] = [vocabs.tasks.index(c) for c in columns]
            else:
                log.info("evaluation: skipping %s: columns %s are not all in %s", prefix, columns, vocabs.tasks)
        if not relevance:
            return {}
        embedding = F.normalize(embedding.to(device).float(), dim=1)  # cosine ranking, as the index does
        results = retrieval_metrics_by_relevance(embedding, labels.to(device), relevance, self.retrieval_ks)
        metrics: dict[str, float] = {}
        for prefix, values in results.items():
            if any(torch.isnan(v) for v in values.values()):
                log.info("evaluation: skipping %s: no item has a relevant match", prefix)
                continue
            metrics |= {f"{prefix}/{key}": float(value) for key, value in values.items()}
        return metrics

    def _background(
        self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Mapping[str, Any]
    ) -> dict[str, float]:
        """``background/{plain,busy,drop}/...``: photo queries of this split on plain vs busy backgrounds."""
        datamodule: Any = getattr(trainer, "datamodule", None)
        datasets = getattr(datamodule, "datasets", None)
        if not self.background_queries or not datasets or "embedding" not in outputs:
            return {}
        split = "val" if stage == "val" else datamodule.hparams.split
        dataset, vocabs = datasets.get(split), getattr(pl_module, "vocabs", None)
        embed_images = getattr(pl_module, "embed_images", None)
        if dataset is None or vocabs is None or "articleType" not in vocabs.tasks or not callable(embed_images):
            log.info("evaluation: skipping background robustness (no %s dataset, articleType or image encoder)", split)
            return {}
        row_of = {int(item): row for row, item in enumerate(dataset.ids.tolist())}
        ids = [int(i) for i in outputs["id"].tolist()]
        if any(i not in row_of for i in ids):
            log.info("evaluation: skipping background robustness: outputs hold ids outside the %s split", split)
            return {}
        types = outputs["labels"].long()[:, vocabs.tasks.index("articleType")]
        values = background_robustness(
            embed_images, outputs["embedding"], ids, types,
            lambda item: dataset.image(row_of[item]), self.background_queries, self.seed,
        )  # fmt: skip
        return {f"background/{key}": value for key, value in values.items()}

    # ----------------------------------------------------------------- plots
    def _plot(
        self, stage: str, outputs: Mapping[str, Any], pl_module: L.LightningModule, trainer: L.Trainer, plot_dir: Path
    ) -> None:
        for name, figure in self._figures(stage, outputs, pl_module).items():
            path = save_figure(figure, plot_dir / f"{stage}_{name}.png")
            _log_figure(trainer, f"{stage}/{name}", figure, path)

    def _figures(self, stage: str, outputs: Mapping[str, Any], pl_module: L.LightningModule) -> dict[str, Figure]:
        vocabs: Any = pl_module.vocabs
        labels = outputs["labels"].long()
        logits = outputs.get("logits", {})
        figures: dict[str, Figure] = {}
        for task in self.confusion_tasks:
            if task not in logits or task not in vocabs.tasks:
                continue
            target = labels[:, vocabs.tasks.index(task)]
            if not bool((target != IGNORE_INDEX).any()):
                continue
            confmat = multiclass_confusion_matrix(
                logits[task].float(), target, num_classes=int(vocabs.num_classes[task]), ignore_index=IGNORE_INDEX
            )
            figures[f"confusion_{task}"] = confusion_matrix_figure(
                confmat, vocabs[task].classes, f"{stage} confusion: {task}"
            )
        if "embedding" in outputs:
            name = getattr(pl_module, "embedding_name", "embedding")
            for attribute in self.pca_attributes:
                column = labels[:, vocabs.tasks.index(attribute)] if attribute in vocabs.tasks else None
                if column is None or not bool((column != IGNORE_INDEX).any()):
                    continue
                classes = vocabs[attribute].classes
                names = [classes[i] if i >= 0 else UNKNOWN for i in column.tolist()]
                title = f"{stage} PCA of {name} embeddings by {attribute}"
                figures[f"pca_{attribute}"] = pca_scatter_figure(outputs["embedding"], names, title, seed=self.seed)
        return figures


def _log_figure(trainer: L.Trainer, tag: str, figure: Figure, path: Path) -> None:
    """Send a figure to every logger that takes images (TensorBoard, W&B); others have the PNG on disk."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[str(path)])


def _gather(outputs: dict[str, Any], trainer: L.Trainer) -> dict[str, Any]:
    """All ranks' outputs on every rank, so metrics cover the whole split (no-op in one process)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return outputs
    parts: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, outputs)
    return drop_duplicate_ids(merge_outputs(parts))


def write_metrics_json(path: Path, stage: str, metrics: Mapping[str, float], epoch: int, global_step: int) -> None:
    """Replace the ``{stage}/*`` keys of ``path`` (keeping other stages), atomically and sorted."""
    values = {**metrics, f"{stage}/epoch": int(epoch), f"{stage}/global_step": int(global_step)}
    update_json(path, values, replace_prefix=f"{stage}/")
