"""The class-weighted multi-task loss shared by the multi-task and CLIP models."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning.data.schema import IGNORE_INDEX


def fill_class_weights(
    num_classes: Mapping[str, int], class_weights: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Class weights for every task (ones where none are given): the loss buffers always exist,
    so checkpoints load strictly whether or not the data gave weights."""
    weights = dict(class_weights or {})
    for task, n in num_classes.items():
        weights.setdefault(task, torch.ones(n))
    return weights


class MultiTaskLoss(nn.Module):
    """Sum over tasks of ``task_weight * cross_entropy(class_weights, label_smoothing)``.

    Labels arrive as one ``[B, T]`` tensor in ``tasks`` order; entries equal to
    ``IGNORE_INDEX`` do not count. Class weights are buffers, so they move with the module
    and are saved in checkpoints. The loss never reads a value back to the host (no
    per-step sync on a GPU): a task whose labels are all unknown contributes an exact 0.

    Mixup/CutMix: ``mix=(perm, lam)`` gives each task the soft target
    ``lam * y + (1 - lam) * y[perm]``; cross-entropy is linear in the target, so that is
    ``lam * CE(y) + (1 - lam) * CE(y[perm])`` with unknown labels ignored per side.
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

    def task_loss(self, task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``F.cross_entropy(..., reduction="mean")`` without its host sync: the weighted sum
        over known labels divided by their total weight (0 when no label is known)."""
        logits = logits.float()
        weight = self.class_weight(task)
        per_item = F.cross_entropy(
            logits,
            target,
            weight=weight,
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.label_smoothing,
            reduction="none",
        )
        known = (target != IGNORE_INDEX).to(logits.dtype)
        denom = known if weight is None else weight[target.clamp(min=0)] * known
        return per_item.sum() / denom.sum().clamp(min=torch.finfo(logits.dtype).tiny)

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        mix: tuple[torch.Tensor, float | torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss": total, task: per-task loss}`` (per-task values are unweighted)."""
        losses: dict[str, torch.Tensor] = {}
        total = None
        for column, task in enumerate(self.tasks):
            if task not in logits:
                continue
            target = labels[:, column]
            task_loss = self.task_loss(task, logits[task], target)
            if mix is not None:
                perm, lam = mix
                task_loss = lam * task_loss + (1.0 - lam) * self.task_loss(task, logits[task], target[perm])
            losses[task] = task_loss
            weighted = self.task_weights[task] * task_loss
            total = weighted if total is None else total + weighted
        if total is None:
            raise ValueError(f"no logits for any of the tasks {self.tasks}; got {list(logits)}")
        losses["loss"] = total
        return losses
