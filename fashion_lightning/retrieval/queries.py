"""What a query brings to the recommender: its errors, its ``k`` and its photo.

The query side of :mod:`~fashion_lightning.retrieval.recommender`: the error types every caller maps
(CLI exit code 2, HTTP 4xx/503), the ``k`` check, and query photos through the catalog's one decoder. The
model that embeds a query is :mod:`~fashion_lightning.retrieval.encoder`'s.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fashion_lightning.data.images import TOO_LARGE, ImageDecodeError, letterbox, open_image
from fashion_lightning.retrieval.manifest import RetrievalError

ImageLike = str | Path | bytes | np.ndarray | Image.Image


class QueryError(RetrievalError, ValueError):
    """The query cannot be answered as asked (unknown id, bad filter, unreadable photo, ...)."""


class UnknownItemError(QueryError):
    """A query names an item id the index does not hold."""


class PhotoTooLargeError(QueryError):
    """A query photo has more pixels than PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""


def check_k(k: Any, most: int | None = None) -> int:
    """``k`` as a positive int: refuses strings, floats and bools rather than truncating them."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise QueryError(f"k must be a whole number >= 1, got {k!r}")
    if k < 1 or (most is not None and k > most):
        raise QueryError(f"k must be between 1 and {most}, got {k}" if most else f"k must be >= 1, got {k}")
    return int(k)


def decode_query_image(
    image: ImageLike, position: int, decode: Callable[[bytes], np.ndarray] | None = None
) -> tuple[np.ndarray, str | None, str]:
    """Native uint8 array, sha1 of the file bytes (for duplicate exclusion) and a label for the report.

    Every form goes through the catalog's decoder (:func:`open_image`): in-memory arrays and PIL images
    are handed to it as lossless bytes, so a photo is treated the same whichever way it arrives.
    ``decode`` replaces it for bytes -> native (the service's, with its pixel limit and decode budget).
    """
    digest: str | None = None
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise QueryError(f"query image {path}: no such file")
        data, label = path.read_bytes(), str(path)
        digest = hashlib.sha1(data).hexdigest()
    elif isinstance(image, bytes):
        data, label = image, f"<bytes #{position}>"
        digest = hashlib.sha1(data).hexdigest()
    elif isinstance(image, (np.ndarray, Image.Image)):
        data, label = _lossless_bytes(image), f"<{type(image).__name__} #{position}>"
    else:
        raise QueryError(f"query image #{position}: unsupported type {type(image).__name__}")
    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x its pixel limit: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            native = decode(data) if decode is not None else letterbox(open_image(data))
    except ImageDecodeError as err:
        too_large = err.reason == TOO_LARGE
        raise (PhotoTooLargeError if too_large else QueryError)(f"query image {label}: {err}") from err
    return native, digest, label


def _lossless_bytes(image: np.ndarray | Image.Image) -> bytes:
    """In-memory image -> PNG (or TIFF for modes PNG cannot hold) bytes for :func:`open_image`."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)) or image.size == 0:
            raise QueryError(f"query image array must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise QueryError(f"query image array must be uint8, got {image.dtype}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    buffer = io.BytesIO()
    png = image.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
    image.save(buffer, format="PNG" if png else "TIFF", **({"compress_level": 0} if png else {}))
    return buffer.getvalue()
