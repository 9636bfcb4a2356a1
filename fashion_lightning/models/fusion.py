"""The fused item embedding: fixed ``alpha`` or a learned per-item gate between image and text.

The study fused ``alpha * image + (1 - alpha) * text`` with one ``alpha`` for every product and
named a per-item weighting as future work: for a plain black T-shirt the name says more than the
photo, for a patterned kurta the photo says more. :class:`FusionGate` predicts that weight from
the two normalised embeddings; the fused vector stays a convex combination of the two parts (the
gate is a sigmoid), so the fixed fusion is the special case of a constant gate, and the gate
starts exactly there (zero last layer, bias ``logit(alpha)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("fixed", "gated")


class FusionGate(nn.Module):
    """``w = sigmoid(MLP([img, txt, img * txt]))`` per item; ``fuse = normalise(w * img + (1 - w) * txt)``."""

    def __init__(self, embed_dim: int, alpha: float = 0.7, hidden: int = 64) -> None:
        super().__init__()
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"a gated fusion starts at alpha in (0, 1), got {alpha}")
        self.mlp = nn.Sequential(nn.Linear(3 * embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, math.log(alpha / (1.0 - alpha)))

    def weight(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B]`` image share in (0, 1) of each item."""
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        return torch.sigmoid(self.mlp(torch.cat([image, text, image * text], dim=-1))).squeeze(-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        w = self.weight(image, text).unsqueeze(-1)
        image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
        return F.normalize(w * image + (1.0 - w) * text, dim=-1)
