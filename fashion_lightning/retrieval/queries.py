"""What a query brings to the recommender: its errors, its photo, and the model that embeds it.

The query side of :mod:`~fashion_lightning.retrieval.recommender`: the error types every caller maps
(CLI exit code 2, HTTP 4xx/503), the ``k`` check, query photos through the catalog's one decoder, and the
:class:`Encoder` protocol with its loading from the index's (verified) checkpoint. Nothing here imports
torch at module level: id and history queries never need it.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from fashion_lightning.data.images import TOO_LARGE, ImageDecodeError, letterbox, open_image
from fashion_lightning.retrieval.manifest import RetrievalError
from fashion_lightning.retrieval.search import LoadedIndex

if TYPE_CHECKING:
    import torch

ImageLike = str | Path | bytes | np.ndarray | Image.Image


class QueryError(RetrievalError, ValueError):
    """The query cannot be answered as asked (unknown id, bad filter, unreadable photo, ...)."""


class UnknownItemError(QueryError):
    """A query names an item id the index does not hold."""


class ModelLoadError(RetrievalError):
    """The model the index names cannot be loaded (missing or damaged checkpoint)."""


class PhotoTooLargeError(QueryError):
    """A query photo has more pixels than PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""


@runtime_checkable
class Encoder(Protocol):
    """What the recommender needs from a model (both model families implement it)."""

    embedding_name: str

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> L2-normalised [B, D]."""

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[B] strings -> [B, D]; raises NotImplementedError without a text tower."""

    def predict_attributes(self, images: torch.Tensor) -> dict[str, list[str]]:
        """uint8 [B, 3, H, W] -> {task: [B] labels}; {} without heads."""

    # optional: ``embed_and_predict(images) -> (embeddings, {task: labels})`` from one forward pass;
    # photo queries use it when the encoder has it (FashionModule does), else call the two above.
    # optional: ``accepts_numpy = True``: images come as uint8 numpy arrays instead of torch tensors.


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


def embed_and_predict(encoder: Encoder, images: torch.Tensor) -> tuple[Any, dict[str, list[str]]]:
    """Embeddings and predicted attributes of query photos, in one forward pass where the encoder can."""
    both = getattr(encoder, "embed_and_predict", None)
    if callable(both):
        embedded, predictions = both(images)
        return embedded, dict(predictions or {})
    embedded = encoder.embed_images(images)
    try:
        predictions = encoder.predict_attributes(images) or {}
    except NotImplementedError:
        predictions = {}
    return embedded, dict(predictions)


def to_tensor(natives: np.ndarray, encoder: Encoder) -> torch.Tensor | np.ndarray:
    """[B, H, W, 3] -> [B, 3, H, W] on the encoder's device (a numpy array for ``accepts_numpy`` encoders,
    e.g. the server's worker processes, so the serving process never imports torch)."""
    channels_first = np.ascontiguousarray(natives.transpose(0, 3, 1, 2))
    if getattr(encoder, "accepts_numpy", False):
        return channels_first
    import torch

    batch = torch.from_numpy(channels_first)
    device = getattr(encoder, "device", None)
    return batch.to(device) if device is not None else batch


def infer(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an encoder call without autograd bookkeeping."""
    if isinstance(args[-1], np.ndarray) or getattr(getattr(fn, "__self__", None), "accepts_numpy", False):
        return fn(*args)  # runs elsewhere (worker processes): nothing to track here
    import torch

    with torch.inference_mode():
        return fn(*args)


def verified_model_path(index: LoadedIndex) -> Path | None:
    """The index's model (artefact folder, or an old index's checkpoint), resolved in the folder and
    checked (size + sha256) right now.

    None when the manifest names no model; ModelLoadError when it is gone. A swapped or edited file, or a
    model outside the folder the user did not trust, raises the manifest's IndexIntegrityError before
    anything reads it.
    """
    model = index.model_path()
    if model is not None and not model.exists():
        raise ModelLoadError(f"the index was built from {model}, which no longer exists; pass encoder=")
    return model


def model_loader(index: LoadedIndex) -> Callable[[], Encoder] | None:
    """Loads the index's model on first need (None when the manifest names none)."""
    if not (index.model_info.get("model") or index.model_info.get("checkpoint")):
        return None

    def load() -> Encoder:
        model = verified_model_path(index)  # at load time: the files may have changed since start-up
        from fashion_lightning.models.base import load_module

        try:
            return load_module(str(model))  # in eval mode; never runs code from the files
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"cannot load the index's model {model}: {err}") from err

    return load
