"""Decoding any product or query image into the catalog's native geometry.

Every image the framework touches (catalog files, user photos) goes through
:func:`to_native`, so the model always sees the same kind of input: RGB uint8,
``NATIVE_HW`` = 80x60 (h x w), aspect ratio kept by letterboxing on white
(the catalog background) rather than stretching.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

NATIVE_HW: tuple[int, int] = (80, 60)
PAD_VALUE = 255  # catalog photos sit on white; letterbox bars blend in
_CENTRE = (0.5 - 1e-7, 0.5 - 1e-7)  # floor((W - w) / 2) for any margin below 5e6 pixels


CORRUPT = "corrupt_image (cannot be decoded)"
TOO_LARGE = "image_too_large (decompression bomb)"


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image, or one over PIL's pixel limit (``reason`` says which).

    The one error type every caller catches: the image cache drops and counts the item by
    ``reason``; query photos (recommend / serve) turn it into a user error.
    """

    def __init__(self, message: str, reason: str = CORRUPT) -> None:
        super().__init__(message)
        self.reason = reason


def open_image(data: bytes | str | Path) -> Image.Image:
    """Open image bytes or a path as an RGB PIL image (any mode: RGBA, CMYK, P, L, I;16 ...)."""
    try:
        if isinstance(data, (str, Path)):
            data = Path(data).read_bytes()
        img: Image.Image = Image.open(io.BytesIO(data))
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # a few KB can claim gigapixels
        raise ImageDecodeError(f"image too large to decode safely ({err})", TOO_LARGE) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(f"not a decodable image ({type(err).__name__}: {err})") from err
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit and float greyscale
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (PAD_VALUE,) * 3 + (255,))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float image to 0..255 (PIL's own convert("L") clips it to white)."""
    arr = np.asarray(img, dtype=np.float32)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
    return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")


def letterbox(img: Image.Image, size_hw: tuple[int, int] = NATIVE_HW) -> np.ndarray:
    """Resize keeping aspect ratio, then pad to ``size_hw``; returns HxWx3 uint8."""
    h, w = size_hw
    if img.size == (w, h):
        return np.asarray(img, dtype=np.uint8)
    scale = min(w / img.width, h / img.height)
    new_w, new_h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    if img.width > 4 * new_w:  # huge photos: cheap integer pre-shrink before the filtered resize
        img.draft("RGB", (new_w * 2, new_h * 2))
        img = img.reduce(max(1, img.width // (new_w * 2)))
    resized = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    # PIL's own letterbox; a centering just under 0.5 puts the smaller half of an odd margin on the
    # left/top, as this function always has, so image caches built before stay valid
    return np.asarray(ImageOps.pad(resized, (w, h), color=(PAD_VALUE,) * 3, centering=_CENTRE), dtype=np.uint8)


def to_native(data: bytes | str | Path | Image.Image, size_hw: tuple[int, int] = NATIVE_HW) -> np.ndarray:
    """Decode anything image-like to the native HxWx3 uint8 array (raises ImageDecodeError)."""
    img = data if isinstance(data, Image.Image) else open_image(data)
    if not isinstance(data, (bytes, str, Path)):
        img = img.convert("RGB")
    return letterbox(img, size_hw)
