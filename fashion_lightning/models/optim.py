"""Optimiser + schedule shared by both model families: AdamW, linear warmup, cosine decay."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def warmup_cosine_lambda(total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0):
    """LR multiplier: linear 0->1 over ``warmup_steps``, then cosine 1->``min_lr_ratio``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def adamw_warmup_cosine(
    param_groups: Iterable[dict] | Iterable[torch.nn.Parameter],
    total_steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_ratio: float = 0.05,
    min_lr_ratio: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
) -> dict:
    """Return a Lightning ``configure_optimizers`` dict (scheduler stepped every batch)."""
    optimizer = torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    schedule = warmup_cosine_lambda(total_steps, round(warmup_ratio * total_steps), min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}
