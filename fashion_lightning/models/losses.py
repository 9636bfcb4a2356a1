"""The class-weighted multi-task loss shared by the multi-task and CLIP models."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning.data.schema import IGNORE_INDEX


class MultiTaskLoss(nn.Module):
    """Sum over tasks of ``task_weight * cross_entropy(class_weights, label_smoothing)``.

    Labels arrive as one ``[B, T]`` tensor in ``tasks`` order; entries equal to
    ``IGNORE_INDEX`` do not count. Class weights are buffers, so they move with the module
    and are saved in checkpoints.
    """

    def __init__(
        self,
        tasks: list[str],
        task_weights: Mapping[str, float] | None = None,
        class_weights: Mapping[str, torch.Tensor | list[float]] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        task_weights = dict(task_weights or {})
        unknown = set(task_weights) - set(self.tasks)
        if unknown:
            raise ValueError(f"task_weights name tasks that are not trained: {sorted(unknown)}; tasks are {self.tasks}")
        self.task_weights = {t: float(task_weights.get(t, 1.0)) for t in self.tasks}
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        for task in self.tasks:
            weight = None if class_weights is None or task not in class_weights else class_weights[task]
            self.register_buffer(f"cw_{task}", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def class_weight(self, task: str) -> torch.Tensor | None:
        return getattr(self, f"cw_{task}")

    def forward(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"loss": total, task: per-task loss}`` (per-task values are unweighted)."""
        losses: dict[str, torch.Tensor] = {}
        total = None
        for column, task in enumerate(self.tasks):
            if task not in logits:
                continue
            target = labels[:, column]
            if bool((target == IGNORE_INDEX).all()):
                task_loss = logits[task].sum() * 0.0  # keeps the graph; nothing to learn here
            else:
                weight = self.class_weight(task)
                task_loss = F.cross_entropy(
                    logits[task].float(),
                    target,
                    weight=None if weight is None else weight.to(logits[task].device),
                    ignore_index=IGNORE_INDEX,
                    label_smoothing=self.label_smoothing,
                )
            losses[task] = task_loss
            weighted = self.task_weights[task] * task_loss
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError(f"no logits for any of the tasks {self.tasks}; got {list(logits)}")
        losses["loss"] = total
        return losses
