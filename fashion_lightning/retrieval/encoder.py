"""The model side of a query: what an encoder is, how an index's own model is loaded, and how query photos and
texts become vectors that index can search.

Both model families implement :class:`Encoder`, and so do the ONNX Runtime encoder (``deploy/``) and the
worker-process encoder (``serve/``). :class:`QueryEncoder` wraps one for one index: loaded on first need (item
and history queries never need a model), photos embedded and their attributes predicted in one forward pass,
every output checked against the index's width and embedding name before it is searched. Nothing here imports
torch at module level: id and history queries never need it, nor do encoders that take numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from fashion_lightning.retrieval.manifest import ModelLoadError
from fashion_lightning.retrieval.queries import QueryError
from fashion_lightning.retrieval.search import LoadedIndex

if TYPE_CHECKING:
    import torch


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


class QueryEncoder:
    """The encoder of one index's queries: photos and texts in, float32 vectors of the index's width out.

    ``encoder``: the model, when the caller has it; otherwise ``loader`` (default: the index's own verified
    model, :func:`model_loader`) loads it on the first photo or text query.
    """

    def __init__(
        self, index: LoadedIndex, encoder: Encoder | None = None, loader: Callable[[], Encoder] | None = None
    ) -> None:
        self.index = index
        self.loader = loader or model_loader(index)
        self._model = encoder

    @property
    def loaded(self) -> Encoder | None:
        """The model if given or loaded already, else None (reading this never loads one)."""
        return self._model

    @property
    def model(self) -> Encoder:
        """The model, loaded now if not yet."""
        if self._model is None:
            if self.loader is None:
                raise QueryError(
                    "photo and text queries need the model that built the index, but its manifest names no "
                    "model; pass encoder= (or encoder_loader=) to Recommender"
                )
            self._model = self.loader()
        return self._model

    def photos(self, natives: np.ndarray) -> tuple[np.ndarray, dict[str, list[str]]]:
        """Native uint8 photos [B, H, W, 3] -> embeddings [B, D] and predicted attributes {task: [B] labels}."""
        batch = _to_tensor(natives, self.model)
        embedded, predictions = _infer(embed_and_predict, self.model, batch)
        return self._checked(embedded, "image"), predictions

    def text(self, text: str) -> np.ndarray:
        """A description -> its embedding [D] (needs a model with a text tower, i.e. CLIP)."""
        try:
            embedded = _infer(self.model.embed_texts, [text])
        except (NotImplementedError, AttributeError) as err:
            name = self.index.model_info.get("embedding_name", "its model")
            raise QueryError(
                f"text queries need a model with a text tower (CLIP); this index was made by {name}"
            ) from err
        return self._checked(embedded, "text")[0]

    def _checked(self, embedded: Any, what: str) -> np.ndarray:
        """Float32 [B, D] from the model's output, refused unless it is the index's width and embedding."""
        vectors = np.asarray(
            embedded.detach().float().cpu().numpy() if hasattr(embedded, "detach") else embedded, dtype=np.float32
        )
        if vectors.ndim != 2 or vectors.shape[1] != self.index.dim:
            raise QueryError(
                f"the encoder's {what} embeddings have shape {vectors.shape[1:]} but the index holds "
                f"{self.index.dim}-d vectors; use the model that built it "
                f"({self.index.model_info.get('model') or self.index.model_info.get('checkpoint')})"
            )
        name, expected = getattr(self.model, "embedding_name", None), self.index.model_info.get("embedding_name")
        if name and expected and name != expected:
            raise QueryError(f"the encoder makes {name!r} embeddings but the index holds {expected!r} ones")
        return vectors


def model_loader(index: LoadedIndex) -> Callable[[], Encoder] | None:
    """Loads the index's model on first need (None when the manifest names none)."""
    if not (index.model_info.get("model") or index.model_info.get("checkpoint")):
        return None

    def load() -> Encoder:
        model = index.model_path()  # at load time: the files may have changed since start-up
        from fashion_lightning.models.base import load_module

        try:
            return load_module(str(model))  # in eval mode; never runs code from the files
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as err:
            raise ModelLoadError(f"cannot load the index's model {model}: {err}") from err

    return load


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


def _to_tensor(natives: np.ndarray, encoder: Encoder) -> torch.Tensor | np.ndarray:
    """[B, H, W, 3] -> [B, 3, H, W] on the encoder's device (a numpy array for ``accepts_numpy`` encoders,
    e.g. the server's worker processes, so the serving process never imports torch)."""
    channels_first = np.ascontiguousarray(natives.transpose(0, 3, 1, 2))
    if getattr(encoder, "accepts_numpy", False):
        return channels_first
    import torch

    batch = torch.from_numpy(channels_first)
    device = getattr(encoder, "device", None)
    return batch.to(device) if device is not None else batch


def _infer(fn: Callable[..., Any], *args: Any) -> Any:
    """Run an encoder call without autograd bookkeeping."""
    if isinstance(args[-1], np.ndarray) or getattr(getattr(fn, "__self__", None), "accepts_numpy", False):
        return fn(*args)  # runs elsewhere (worker processes): nothing to track here
    import torch

    with torch.inference_mode():
        return fn(*args)
