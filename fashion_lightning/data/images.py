"""Decoding any product or query image into the catalog's native geometry.

Every image the framework touches (catalog files, user photos) goes through
:func:`to_native`, so the model always sees the same kind of input: RGB uint8,
``NATIVE_HW`` = 80x60 (h x w), aspect ratio kept by letterboxing on white
(the catalog background) rather than stretching.
"""

from __future__ import annotations

import ctypes
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

NATIVE_HW: tuple[int, int] = (80, 60)
PAD_VALUE = 255  # catalog photos sit on white; letterbox bars blend in
_CENTRE = (0.5 - 1e-7, 0.5 - 1e-7)  # floor((W - w) / 2) for any margin below 5e6 pixels


CORRUPT = "corrupt_image (cannot be decoded)"
TOO_LARGE = "image_too_large (decompression bomb)"
# bytes a decode may hold per decoded pixel: PIL keeps RGB as 4 bytes, plus a conversion copy (mode,
# alpha flattening) and the pre-shrink; what a decode reserves from a :class:`DecodeBudget`
DECODE_BYTES_PER_PIXEL = 16
# what a query photo may be: raster formats PIL decodes itself (not EPS / PDF, which hand the bytes to
# Ghostscript, nor the exotic plugins nobody uploads)
PHOTO_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (phone photos)
TRIM_BYTES = 64 * 1024 * 1024  # a decode reserving this much returns freed memory to the OS afterwards


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
    return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    """A loaded image of any mode, upright, as RGB (alpha flattened on the catalog's white)."""
    ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to turn
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit and float greyscale
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (PAD_VALUE,) * 3 + (255,))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


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


class DecodeBusyError(RuntimeError):
    """The decode budget stayed full for the whole wait (the server is busy decoding other photos)."""


class DecodeBudget:
    """Bytes of decoded pixels allowed in flight at once, across every thread that decodes.

    A photo's decode reserves its worst-case bytes before PIL allocates anything and returns them when
    its small native array is made, so a burst of near-limit photos queues instead of taking the process
    to gigabytes (without it, four concurrent 89-megapixel photos measured 5.7 GB).
    """

    def __init__(self, max_bytes: int, wait_s: float = 30.0) -> None:
        self.max_bytes = int(max_bytes)
        self.wait_s = float(wait_s)
        self.used = 0
        self.peak = 0  # the most ever reserved at once (tests and /info read it)
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget (waits up to ``wait_s`` for room, then DecodeBusyError)."""
        if nbytes > self.max_bytes:
            raise ImageDecodeError(
                f"image needs {nbytes} bytes to decode, over the limit of {self.max_bytes}", TOO_LARGE
            )
        deadline = time.monotonic() + self.wait_s
        with self._changed:
            while self.used + nbytes > self.max_bytes:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    if self.used + nbytes <= self.max_bytes:
                        break
                    raise DecodeBusyError(f"busy decoding other photos for {self.wait_s:g} s; retry in a few seconds")
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


def decode_native(
    data: bytes,
    size_hw: tuple[int, int] = NATIVE_HW,
    max_pixels: int | None = None,
    budget: DecodeBudget | None = None,
) -> np.ndarray:
    """Query photo bytes -> native HxWx3 uint8, decoding no more pixels than the model needs.

    The header is read first: a JPEG is asked (``draft``) for the smallest DCT scale (1/2, 1/4, 1/8) that
    still gives twice the target size, so a 24-megapixel phone photo decodes as 0.4 megapixels; then the
    decoded size must be within ``max_pixels`` and its bytes fit in ``budget`` before PIL decodes anything.
    The result equals :func:`to_native` for images no larger than twice the target.
    """
    h, w = size_hw
    try:
        img: Image.Image = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (2 * w, 2 * h))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"image too large to decode safely ({err})", TOO_LARGE) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(f"not a decodable image ({type(err).__name__}: {err})") from err
    pixels = img.width * img.height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageDecodeError(
            f"image decodes to {img.width}x{img.height} = {pixels} pixels, over the limit of {max_pixels}", TOO_LARGE
        )
    if budget is None:
        return letterbox(_load_rgb(img), size_hw)
    nbytes = pixels * DECODE_BYTES_PER_PIXEL
    with budget.reserve(nbytes):
        native = letterbox(_load_rgb(img), size_hw)
        del img
    if nbytes >= TRIM_BYTES:
        _return_memory()
    return native


def _return_memory() -> None:
    """Hand freed decode buffers back to the OS. glibc keeps large freed blocks in per-thread arenas:
    measured after four concurrent 24-megapixel PNGs, 230 MB stayed resident, 44 MB after a trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _load_rgb(img: Image.Image) -> Image.Image:
    try:
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageDecodeError(f"not a decodable image ({type(err).__name__}: {err})") from err
    return _to_rgb(img)
