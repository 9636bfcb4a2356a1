"""On-device input pipeline: uint8 native images -> normalised model input.

Resizing and normalising happen as tensor ops on the model's device, so CPU workers
only move small uint8 images and a GPU does the upscaling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DeviceInput(nn.Module):
    """``uint8 [B,3,h,w]`` -> ``float [B,3,H,W]`` resized to ``image_size`` and normalised."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(
        self,
        image_size: Sequence[int] = (224, 224),
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size must be (height, width) > 0, got {tuple(image_size)}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must have 3 values with std > 0, got mean={mean} std={std}")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels_last = channels_last
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
        x = images.float()
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=False)
        elif x.data_ptr() == images.data_ptr():  # already float: do not normalise the caller's tensor
            x = x.clone()
        x = x.sub_(self.mean).div_(self.std)  # in place: one full-size float batch per step, not three
        return self.layout(x)

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory format the trunk runs in (also for activations read from a trunk cache)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}"
