"""Albumentations pipelines that run at native resolution (80x60) in CPU workers.

Augmenting small uint8 images is cheap; the expensive upscale to the model's input size
happens later on the model's device (:class:`fashion_lightning.models.preprocess.DeviceInput`).
Configs build these with ``_target_: albumentations.Compose`` (see ``conf/data/default.yaml``);
:func:`default_train_transform` is the same pipeline for Python users, and
:func:`albumentations_train_transform` the equivalent chain of stock albumentations transforms.
"""

from __future__ import annotations

import math
from typing import Any

import albumentations as A
import cv2
import numpy as np

from fashion_lightning.data.images import PAD_VALUE


class FusedNativeAugment(A.ImageOnlyTransform):
    """The default augmentation (flip, rotate + zoom + shift on white, brightness/contrast) as ONE
    ``cv2.warpAffine`` plus one ``cv2.LUT`` with a hand-built matrix: the same distribution of
    outputs at about a third of the CPU (albumentations' Affine spends most of its time in Python
    around the warp). Uses the transform's own generator, so ``set_random_seed`` works per worker.
    ``scripts/bench_data.py`` measures it against the plain albumentations pipeline."""

    def __init__(self, hflip: float = 0.5, rotate: float = 10.0, scale: tuple[float, float] = (0.9, 1.1),
                 translate: float = 0.05, affine_p: float = 0.7, brightness_contrast: float = 0.2,
                 brightness_contrast_p: float = 0.5, fill: int = PAD_VALUE, p: float = 1.0) -> None:  # fmt: skip
        super().__init__(p=p)
        self.hflip, self.rotate, self.scale, self.translate, self.affine_p = hflip, rotate, scale, translate, affine_p
        self.bc, self.bc_p, self.fill = brightness_contrast, brightness_contrast_p, fill

    def get_params(self) -> dict:
        g = self.random_generator
        u = g.random(4)
        params: dict[str, Any] = {"flip": bool(u[0] < self.hflip), "matrix": None, "lut": None}
        if u[1] < self.affine_p:
            angle, zoom = math.radians(g.uniform(-self.rotate, self.rotate)), g.uniform(*self.scale)
            tx, ty = g.uniform(-self.translate, self.translate, size=2)
            params["matrix"] = (angle, zoom, float(tx), float(ty))
        if u[2] < self.bc_p:
            alpha, beta = 1.0 + g.uniform(-self.bc, self.bc), g.uniform(-self.bc, self.bc) * 255.0
            params["lut"] = np.clip(np.arange(256) * alpha + beta, 0, 255).astype(np.uint8)
        return params

    def apply(self, img: np.ndarray, flip: bool = False, matrix=None, lut=None, **params) -> np.ndarray:
        h, w = img.shape[:2]
        if matrix is not None:
            angle, zoom, tx, ty = matrix
            c, s = zoom * math.cos(angle), zoom * math.sin(angle)
            cx, cy = (w - 1) / 2, (h - 1) / 2
            m = np.array([[c, -s, cx - c * cx + s * cy + tx * w], [s, c, cy - s * cx - c * cy + ty * h]])
            if flip:  # fold the mirror into the same warp
                m[0, :2] *= -1
                m[0, 2] = (w - 1) - m[0, 2]
            img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                 borderValue=(self.fill,) * 3)  # fmt: skip
        elif flip:
            img = cv2.flip(img, 1)
        return cv2.LUT(img, lut) if lut is not None else img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return (
            "hflip",
            "rotate",
            "scale",
            "translate",
            "affine_p",
            "brightness_contrast",
            "brightness_contrast_p",
            "fill",
        )


def default_train_transform() -> A.Compose:
    """The default training augmentation (one fused warp + LUT per image)."""
    return A.Compose([FusedNativeAugment()])


def albumentations_train_transform(
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
