"""Mixup / CutMix for multi-head models: mixed images plus ``(perm, lam)`` for the loss.

timm's ``Mixup`` mixes one one-hot target; with six heads each task needs its own soft
target. Here only the images are mixed and the pairing ``(perm, lam)`` is handed to
:class:`~fashion_lightning.models.losses.MultiTaskLoss`, which mixes every task's
cross-entropy with the same ``lam`` (soft targets per task, unknown labels ignored).
"""

from __future__ import annotations

import numpy as np
import torch


class MultiTaskMixup:
    """Per batch, with probability ``prob``: CutMix (``switch_prob``) or Mixup; else nothing.

    Runs on the model's device on preprocessed float images ``[B,3,H,W]``. ``lam`` is drawn
    on the host from Beta(alpha, alpha) (no device sync); CutMix corrects it to the pasted area.
    """

    def __init__(
        self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
        seed: int | None = None,
    ) -> None:  # fmt: skip
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError("mixup_alpha/cutmix_alpha must be >= 0 and prob/switch_prob in [0, 1]")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: disable mixup instead")
        self.mixup_alpha, self.cutmix_alpha, self.prob, self.switch_prob = mixup_alpha, cutmix_alpha, prob, switch_prob
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, float] | None]:
        if len(x) < 2 or self.rng.random() >= self.prob:
            return x, None
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(self.rng.beta(alpha, alpha))
        perm = torch.from_numpy(self.rng.permutation(len(x))).to(x.device)
        if cutmix:
            h, w = x.shape[-2:]
            cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
            x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1.0 - float((y1 - y0) * (x1 - x0)) / float(h * w)  # the share actually kept
        else:
            x = x.mul(lam).add_(x[perm], alpha=1.0 - lam)
        return x, (perm, lam)
