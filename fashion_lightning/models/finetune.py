"""Fine-tuning switches shared by both model families: weight EMA and Mixup/CutMix configs.

Each is one config key on the module (``ema``, ``mixup``); ``null`` turns it off.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fashion_lightning.models.mixup import MultiTaskMixup


def ema_avg_fn(decay: float = 0.999, warmup: int = 10):
    """EMA update with timm's warm-up: the effective decay is ``min(decay, (1 + n) / (warmup + n))``.

    Without it a short run's EMA stays close to the initial weights. Tensor ops only (no sync).
    """

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = num_averaged.to(averaged.device, torch.float32)
        d = ((1.0 + n) / (warmup + n)).clamp(max=decay).to(averaged.dtype)
        return averaged + (current - averaged) * (1.0 - d)

    return avg


def ema_callbacks(cfg: Mapping[str, Any] | float | None) -> list:
    """``ema: 0.999`` or ``{decay: 0.999, warmup: 10}`` -> Lightning's WeightAveraging (EMA of every
    parameter and buffer, swapped in for validation/test and copied into the model when training ends)."""
    if cfg is None or cfg is False:
        return []
    from lightning.pytorch.callbacks import WeightAveraging

    options = {"decay": float(cfg)} if isinstance(cfg, (int, float)) else dict(cfg)
    decay, warmup = float(options.pop("decay", 0.999)), int(options.pop("warmup", 10))
    if options:
        raise ValueError(f"unknown ema options {sorted(options)}; use decay and warmup")
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema decay must be in (0, 1), got {decay}")
    return [WeightAveraging(avg_fn=ema_avg_fn(decay, warmup), use_buffers=True)]


def make_mixup(cfg: Mapping[str, Any] | None) -> MultiTaskMixup | None:
    """``mixup: {mixup_alpha, cutmix_alpha, prob, switch_prob}`` -> a mixer seeded from torch's RNG."""
    if not cfg:
        return None
    return MultiTaskMixup(**dict(cfg), seed=int(torch.randint(0, 2**31 - 1, (1,))))
