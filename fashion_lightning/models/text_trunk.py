"""Split the CLIP text tower after transformer layer ``L``: frozen lower layers whose token states are cached.

The CPU CLIP recipe locks the MiniLM text tower and re-opens its top layer, so every training step runs the
whole tower on every title although only the last layer(s) learn. ``model.cache_text: {layer: L}`` freezes the
embeddings and transformer layers ``< L``; the datamodule runs them once per unique title
(``data/text_cache.py``) and training runs only layers ``>= L``, the pooler and the projection on the stored
token states. The split is a view on the tower's own submodules (no copies, no new state-dict keys):
checkpoints keep the whole network and ``upper(*lower(tokens))`` is exactly ``tower(tokens)`` (tested).

Supported: open_clip's Hugging Face text towers of the BERT family (``transformer.embeddings`` +
``transformer.encoder.layer``, e.g. the offline all-MiniLM-L6-v2 of ``lite0-minilm``).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from fashion_lightning.models.clip import ClipFusionNet


class TextSplit:
    """An open_clip HF text tower cut after transformer layer ``layer`` (``0``: after the embeddings)."""

    def __init__(self, text: nn.Module, layer: int) -> None:
        transformer = getattr(text, "transformer", None)
        embeddings = getattr(transformer, "embeddings", None)
        layers = getattr(getattr(transformer, "encoder", None), "layer", None)
        if transformer is None or not hasattr(text, "config") or embeddings is None or layers is None:
            raise ValueError(
                "cache_text supports Hugging Face BERT-family text towers (lite0-minilm's MiniLM), "
                f"not {type(text).__name__}"
            )
        if not 0 <= layer <= len(layers):
            raise ValueError(f"cache_text.layer must be in 0..{len(layers)} for this text tower, got {layer}")
        self.text, self.layer, self.transformer = text, int(layer), transformer
        self._layers = list(layers)
        self._embeddings = embeddings

    @property
    def lower_modules(self) -> list[nn.Module]:
        return [self._embeddings, *self._layers[: self.layer]]

    def freeze_lower(self) -> None:
        """No gradients, no dropout below the cut: the cached token states are a fixed function of the title."""
        for module in self.lower_modules:
            module.requires_grad_(False)
            module.eval()

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """1 for real tokens, 0 for padding (what open_clip's HFTextEncoder derives from the ids)."""
        return (tokens != self.text.config.pad_token_id).long()  # type: ignore[union-attr]

    def _mask(self, mask: torch.Tensor, states: torch.Tensor) -> torch.Tensor | None:
        """The attention mask the model's layers take, made the way the model's own forward makes it."""
        create = getattr(self.transformer, "_create_attention_masks", None)
        if create is not None:  # transformers >= 5
            return create(attention_mask=mask, encoder_attention_mask=None, embedding_output=states,
                          encoder_hidden_states=None, cache=None, position_ids=None)[0]  # fmt: skip
        return self.transformer.get_extended_attention_mask(mask, tuple(mask.shape))

    def _run(self, layers: list[nn.Module], states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attention = self._mask(mask, states)
        for layer in layers:
            out = layer(states, attention)
            states = out[0] if isinstance(out, tuple) else out
        return states

    def lower(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, ctx]`` -> (token states after layer ``L`` ``[B, ctx, width]``, mask ``[B, ctx]``)."""
        mask = self.attention_mask(tokens)
        return self._run(self._layers[: self.layer], self._embeddings(input_ids=tokens), mask), mask

    def upper(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token states after layer ``L`` -> what the tower returns for the tokens (pooled, projected)."""
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        mask = mask.long()
        hidden = self._run(self._layers[self.layer :], states, mask)
        pooler = getattr(self.transformer, "pooler", None)
        uses_pooler_output = bool(getattr(self.text.pooler, "use_pooler_output", False))
        pooled = pooler(hidden) if pooler is not None and uses_pooler_output else None  # ClsPooler may use it
        out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled)
        return self.text.proj(self.text.pooler(out, mask))  # type: ignore[operator]

    def fingerprint(self, extra: str = "") -> str:
        """Content hash of what the token states depend on besides the token ids: layer, lower weights, buffers."""
        digest = hashlib.sha1(f"{type(self.transformer).__name__}:{self.layer}:{extra}".encode())
        for module in self.lower_modules:
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]


class TextEncoder:
    """The model's side of the text cache: titles -> token ids, token ids -> (states, mask) at the cut.

    Runs on the device the net is on when the datamodule asks. The cache key hashes the token ids (so the
    tokenizer is covered) and this fingerprint (the frozen weights).
    """

    def __init__(self, net: ClipFusionNet, split: TextSplit) -> None:
        self.net, self.split = net, split
        self.fingerprint = split.fingerprint()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.net.tokenize(texts)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.net.parameters()).device
        self.split.freeze_lower()
        return self.split.lower(tokens.to(device))
