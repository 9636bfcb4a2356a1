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


# --- contrastive losses of the CLIP recipe ---------------------------------------------------------
def positive_mask(row_keys: torch.Tensor, col_keys: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, C]`` bool: rows and columns whose keys are equal are positives of each other.

    Keys are per-item group ids (same title or identical photo share one, see
    :func:`fashion_lightning.data.duplicates.positive_groups`); a pair's own diagonal is
    always equal. A negative key never matches anything but the same position, so an item
    without a group id is only its own positive.
    """
    col_keys = row_keys if col_keys is None else col_keys
    same = row_keys.view(-1, 1) == col_keys.view(1, -1)
    return same & (row_keys.view(-1, 1) >= 0)


def multi_positive_infonce(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE whose target spreads over every positive (no false negatives).

    ``positives[i, j]`` says text ``j`` describes image ``i`` (at least the diagonal). The
    target row is uniform over the positives, as in multi-positive contrastive learning
    (e.g. SupCon / UniCL): two products with the same name are not pushed apart. With an
    identity mask it equals open_clip's ``ClipLoss`` exactly (tests check it).
    """
    positives = positives.to(image.device)
    logits = scale * image.float() @ text.float().T
    target = positives.float()
    image_loss = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_target = target.T
    text_loss = -(text_target / text_target.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (image_loss + text_loss) / 2


def sigmoid_pair_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positives: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023), mirroring open_clip's ``SigLipLoss``:
    ``-sum log sigmoid(y_ij * (scale * <img_i, txt_j> + bias)) / B`` with ``y = +1`` on
    positives and ``-1`` elsewhere. Every pair is an independent binary decision, so a
    false negative can simply be labelled positive."""
    logits = scale * image.float() @ text.float().T + bias
    labels = 2.0 * positives.to(logits.device).float() - 1.0
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


class SigmoidContrastive(nn.Module):
    """The sigmoid loss with its learnable bias; the temperature is the net's.

    SigLIP starts the bias at -10 for batches of 32k. The bias balances one positive against
    ``B - 1`` negatives per row: at zero similarity their gradients match when
    ``exp(-bias) = B - 1``, so batches of 32-256 start near ``-log(B)`` = -3.5..-5.5 (at -10 a
    batch of 128 first collapses every pair together before it separates them).
    """

    def __init__(self, init_bias: float = -5.0) -> None:
        super().__init__()
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, positives: torch.Tensor
    ) -> torch.Tensor:
        return sigmoid_pair_loss(image, text, scale, self.logit_bias, positives)


def supervised_contrastive(embedding: torch.Tensor, groups: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) over one batch: each item's others of the same group are its positives.

    Used on the fused item embedding so that a learned fusion gate is trained for what the
    fused embedding serves (item-to-item recommendations of the same kind of product). Items
    with an unknown group (< 0) or without any positive in the batch are not anchors; 0 when
    no item has one.
    """
    emb = F.normalize(embedding.float(), dim=1)
    n = emb.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=emb.device)
    positives = positive_mask(groups.to(emb.device)) & ~eye
    logits = (scale * emb @ emb.T).masked_fill(eye, float("-inf"))
    log_prob = F.log_softmax(logits, dim=1).masked_fill(eye, 0.0)
    counts = positives.sum(1)
    anchors = counts > 0
    per_anchor = -(log_prob * positives).sum(1) / counts.clamp(min=1)
    return (per_anchor * anchors).sum() / anchors.sum().clamp(min=1)
