"""Catalog products on real-world backgrounds: cut the product out of its plain studio background
and paste it on other products, blurred scenes, tinted gradients or noise.

Catalog photos sit on near-white; shoppers' photos do not, and a model that never saw a background
ranks a photo by its background (issue 15: exact-item top-1 96% -> 27%). :class:`BackgroundComposite`
is an albumentations transform for either model family's ``data.train_transform`` (put it after the
geometric augmentation: the white fill of a rotation is background too); the datamodule hands it the
training photos to use as "other products" backgrounds (:meth:`BackgroundComposite.bind_bank`).
:func:`composite` with :func:`make_background` are the same operation for the deterministic
robustness evaluation (:mod:`fashion_lightning.evaluation.backgrounds`).

The cut-out is :func:`product_mask`: near-white pixels connected to the image border are background
(flood fill from the border), everything else is product, so white parts *inside* a product (a white
shirt's print, a watch face) stay. Product pixels are copied unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np

KINDS = ("products", "blur", "tint", "noise")
BUSY_KINDS = ("products", "blur", "tint")  # the evaluation's "busy" backgrounds (issue 15, item 4)


def product_mask(img: np.ndarray, threshold: int = 235) -> np.ndarray:
    """``HxW`` bool, True on the product: not near-white, or near-white but enclosed by the product.

    ``threshold``: a pixel whose channels are all >= it counts as studio white (JPEG noise on the
    catalog's white is within a few levels of 255).
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    white: np.ndarray = np.asarray((img >= threshold).all(axis=2), dtype=np.uint8)
    _, labels = cv2.connectedComponents(white, connectivity=4)  # label 0: the non-white pixels
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, border[border > 0])


def composite(img: np.ndarray, background: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The product pixels of ``img`` (unchanged) over ``background`` (same HxWx3 uint8)."""
    if background.shape != img.shape:
        raise ValueError(f"background {background.shape} does not match the image {img.shape}")
    mask = product_mask(img) if mask is None else mask
    return np.where(mask[..., None], img, background).astype(np.uint8)


def _tile(photos: Sequence[np.ndarray], shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A collage of other product photos at random scale, filling ``shape`` (h, w)."""
    h, w = shape
    canvas = np.empty((h, w, 3), dtype=np.uint8)
    scale = rng.uniform(0.35, 0.7)
    th, tw = max(4, int(h * scale)), max(3, int(w * scale))
    oy, ox = int(rng.integers(0, th)), int(rng.integers(0, tw))
    k = 0
    for y in range(-oy, h, th):
        for x in range(-ox, w, tw):
            tile = cv2.resize(photos[k % len(photos)], (tw, th), interpolation=cv2.INTER_AREA)
            if rng.random() < 0.5:
                tile = tile[:, ::-1]
            y0, x0 = max(y, 0), max(x, 0)
            y1, x1 = min(y + th, h), min(x + tw, w)
            canvas[y0:y1, x0:x1] = tile[y0 - y : y1 - y, x0 - x : x1 - x]
            k += 1
    return canvas


def _tint(canvas: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    colour = rng.integers(0, 256, size=3).astype(np.float32)
    return (canvas.astype(np.float32) * (1 - strength) + colour * strength).clip(0, 255).astype(np.uint8)


def make_background(
    kind: str, shape: tuple[int, int], rng: np.random.Generator, photos: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """One background of ``kind`` (see :data:`KINDS`), ``shape`` = (h, w), from ``rng`` only.

    ``products``: a collage of other catalog photos (tinted half the time); ``blur``: the same,
    heavily blurred (an out-of-focus room); ``tint``: a two-colour gradient; ``noise``: coloured
    low-frequency noise. Without ``photos``, ``products`` / ``blur`` use noise collages.
    """
    h, w = shape
    if kind in ("products", "blur"):
        if not photos:
            photos = [make_background("noise", shape, rng) for _ in range(3)]
        canvas = _tile(photos, shape, rng)
        if kind == "blur":
            sigma = rng.uniform(2.0, 5.0)
            canvas = cv2.GaussianBlur(canvas, (0, 0), sigmaX=sigma)
        if rng.random() < 0.5:
            canvas = _tint(canvas, rng, rng.uniform(0.15, 0.45))
        return canvas
    if kind == "tint":
        a, b = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.cos(angle) * xx / max(w - 1, 1) + np.sin(angle) * yy / max(h - 1, 1)).clip(-1, 1) * 0.5 + 0.5
        return (a * (1 - t[..., None]) + b * t[..., None]).clip(0, 255).astype(np.uint8)
    if kind == "noise":
        coarse = rng.integers(0, 256, size=(int(rng.integers(2, 9)), int(rng.integers(2, 7)), 3), dtype=np.uint8)
        canvas = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        canvas += rng.normal(0, rng.uniform(5, 25), size=canvas.shape)
        return canvas.clip(0, 255).astype(np.uint8)
    raise ValueError(f"unknown background kind {kind!r}; choose from {KINDS}")


class BackgroundComposite(A.ImageOnlyTransform):
    """Albumentations transform: paste the product on a random background (see module doc).

    Args:
        kinds: background kinds to draw from (uniformly), a subset of :data:`KINDS`.
        threshold: studio-white threshold of :func:`product_mask`.
        bank_size: how many other training photos one ``products`` / ``blur`` collage draws from.
        min_background: skip images whose background is below this share of the pixels (nothing
            to replace: the product fills the frame).
        p: probability of applying it to an image.
    """

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        threshold: int = 235,
        bank_size: int = 6,
        min_background: float = 0.05,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        unknown = [k for k in kinds if k not in KINDS]
        if not kinds or unknown:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
        if not 0 <= threshold <= 255 or bank_size < 1 or not 0.0 <= min_background < 1.0:
            raise ValueError("threshold must be in 0..255, bank_size >= 1 and min_background in [0, 1)")
        self.kinds, self.threshold, self.bank_size = tuple(kinds), int(threshold), int(bank_size)
        self.min_background = float(min_background)
        self._bank_path: str | None = None
        self._bank_shape: tuple[int, ...] = ()
        self._bank_rows = np.empty(0, dtype=np.int64)
        self._bank: np.memmap | None = None

    def bind_bank(self, images_path: str, shape: tuple[int, ...], rows: Sequence[int]) -> None:
        """Use these rows of the image cache memmap as "other products" (opened lazily per worker)."""
        self._bank_path, self._bank_shape = images_path, tuple(shape)
        self._bank_rows = np.asarray(rows, dtype=np.int64)
        self._bank = None

    def __getstate__(self) -> dict[str, Any]:  # an open memmap would be pickled by value into workers
        state = self.__dict__.copy()
        state["_bank"] = None
        return state

    def _photos(self, rng: np.random.Generator) -> list[np.ndarray]:
        if self._bank_path is None or not len(self._bank_rows):
            return []
        if self._bank is None:
            self._bank = np.memmap(self._bank_path, dtype=np.uint8, mode="r", shape=self._bank_shape)
        picks = rng.choice(self._bank_rows, size=min(self.bank_size, len(self._bank_rows)), replace=False)
        return [np.asarray(self._bank[int(r)]) for r in picks]

    def get_params(self) -> dict[str, Any]:
        # one child generator per image from the transform's own (seedable) stream
        return {"seed": int(self.random_generator.integers(0, 2**31 - 1))}

    def apply(self, img: np.ndarray, seed: int = 0, **params: Any) -> np.ndarray:
        mask = product_mask(img, self.threshold)
        if (~mask).mean() < self.min_background:
            return img
        rng = np.random.default_rng(seed)
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        photos = self._photos(rng) if kind in ("products", "blur") else []
        background = make_background(kind, img.shape[:2], rng, photos)
        return composite(img, background, mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("kinds", "threshold", "bank_size", "min_background")
