"""MultiTaskNet: a timm backbone, a pooled embedding, one linear head per attribute."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fashion_lightning.models.backbones import create_backbone, normalisation
from fashion_lightning.models.preprocess import DeviceInput


class MultiTaskNet(nn.Module):
    """uint8 native images in; per-task logits and an L2-normalised embedding out.

    ``image_size`` is the (height, width) images are resized to on the device: the CLIP net's
    name too, and open_clip's (timm's ``input_size`` is (C, H, W), another shape).
    ``embed_dim=None`` uses the backbone's pooled features as the embedding; an int adds a
    linear projection (a smaller, retrieval-friendly vector the heads also read).
    """

    def __init__(
        self,
        num_classes: Mapping[str, int],
        backbone: str = "resnet50",
        pretrained: bool | str = False,
        checkpoint_path: str | None = None,
        image_size: Sequence[int] = (224, 224),
        embed_dim: int | None = None,
        dropout: float = 0.2,
        channels_last: bool = False,
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        if not num_classes:
            raise ValueError("num_classes must name at least one task")
        self.backbone = create_backbone(backbone, pretrained, checkpoint_path, **backbone_kwargs)
        mean, std = normalisation(self.backbone, pretrained)
        self.preprocess = DeviceInput(image_size, mean, std, channels_last=channels_last)
        features: int = self.backbone.num_features  # type: ignore[assignment]  # timm models set num_features
        self.neck = nn.Linear(features, embed_dim) if embed_dim else nn.Identity()
        self.embed_dim = embed_dim or features
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({task: nn.Linear(self.embed_dim, n) for task, n in num_classes.items()})
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of uint8 images (what the frozen-backbone cache stores)."""
        return self.backbone(self.preprocess(images))

    def head_forward(self, features: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits and normalised embedding from pooled features."""
        z = self.neck(features)
        logits = {task: head(self.dropout(z)) for task, head in self.heads.items()}
        return logits, F.normalize(z.float(), dim=1)

    def forward(self, images: torch.Tensor, flip_tta: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits and embedding; ``flip_tta`` averages them over the image and its mirror."""
        if not flip_tta:
            return self.head_forward(self.features(images))
        x = self.preprocess(images)
        features = self.backbone(torch.cat([x, x.flip(-1)]))
        logits, _ = self.head_forward(features)
        z = self.neck(features).float()
        half = len(x)
        return (
            {task: (out[:half] + out[half:]) / 2 for task, out in logits.items()},
            F.normalize(z[:half] + z[half:], dim=1),
        )

    @torch.no_grad()
    def embed(self, images: torch.Tensor, flip_tta: bool = False) -> torch.Tensor:
        return self.forward(images, flip_tta)[1]
