"""Albumentations pipelines that run at native resolution (80x60) in CPU workers.

Augmenting small uint8 images is cheap; the expensive upscale to the model's input size
happens later on the model's device (:class:`fashion_lightning.models.preprocess.DeviceInput`).
Configs build these with ``_target_: albumentations.Compose`` (see ``conf/data/augment``);
:func:`default_train_transform` is the same pipeline for Python users.
"""

from __future__ import annotations

import albumentations as A
import cv2

from fashion_lightning.data.images import PAD_VALUE


def default_train_transform(
    hflip: float = 0.5, rotate: float = 10.0, scale: tuple[float, float] = (0.9, 1.1), brightness_contrast: float = 0.2
) -> A.Compose:
    """Flip, small rotation + zoom (white fill, like the catalog background), brightness/contrast."""
    return A.Compose(
        [
            A.HorizontalFlip(p=hflip),
            A.Affine(
                rotate=(-rotate, rotate), scale=scale, translate_percent=(-0.05, 0.05),
                border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE, p=0.7,
            ),
            A.RandomBrightnessContrast(brightness_limit=brightness_contrast, contrast_limit=brightness_contrast, p=0.5),
        ]
    )  # fmt: skip
