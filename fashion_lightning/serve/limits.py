"""Every limit fashion-serve enforces, in one place, with its default (README "Safety" lists them).

A request is checked against these before any work is done, and over a limit it gets a one-line 4xx
(413 for sizes, 422 for values, 429 when the decode budget stays full), never a 5xx. The numbers are
fed from ``conf/serve.yaml`` (``max_k``, ``default_k``, ``max_upload_mb``, ``inference_workers`` at
the top level, the rest under ``limits:``) through :meth:`ServeSettings.from_cfg`; a typo or an
out-of-range value there is refused at start-up (pydantic: unknown keys forbidden, every field ranged).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # item ids are int64 in the index: outside is a 422, not a 500
MiB = 1024 * 1024


class SettingsError(ValueError):
    """A limit in fashion-serve's config is unknown or out of range (one line; the app exits 2)."""


class ServeSettings(BaseModel):
    """Limits a storefront wants enforced before any work is done (defaults documented in README)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_k: int = Field(default=100, ge=1, le=10_000)
    default_k: int = Field(default=12, ge=1, le=10_000)
    max_upload_bytes: int = Field(default=10 * MiB, ge=1024, le=1024 * MiB)
    inference_workers: int = Field(
        default=1, ge=1, le=64
    )  # concurrent forward passes; more only helps with spare cores
    # request bodies (JSON): size before parsing, bracket depth before json.loads sees it
    max_json_bytes: int = Field(default=256 * 1024, ge=1024, le=64 * MiB)
    max_json_depth: int = Field(default=8, ge=3, le=64)
    # history queries: liked ids and disliked ids, each
    max_history: int = Field(default=1000, ge=1, le=1_000_000)
    # filters (JSON body, form field or query string): fields, values per field, characters per value
    max_filter_fields: int = Field(default=16, ge=1, le=256)
    max_filter_values: int = Field(default=64, ge=1, le=10_000)
    max_filter_chars: int = Field(default=200, ge=1, le=10_000)
    # text queries
    max_text_chars: int = Field(default=1000, ge=1, le=100_000)
    # half_life (interactions): finite, within [min, max] (no Infinity, NaN or denormals)
    min_half_life: float = Field(default=0.01, gt=0, le=1e6)
    max_half_life: float = Field(default=1e6, gt=0, le=1e12)
    # photos: decoded pixels per photo (after JPEG draft() reduction), and decoded bytes in flight across
    # every photo request at once (a photo waits up to decode_wait_s for room, then 429)
    max_photo_pixels: int = Field(default=24_000_000, ge=10_000, le=1_000_000_000)
    max_decode_bytes: int = Field(default=512 * MiB, ge=MiB, le=64 * 1024 * MiB)
    decode_wait_s: float = Field(default=30.0, gt=0, le=3600)
    # supervision: a dead inference worker is replaced; seconds SIGTERM waits for in-flight requests
    drain_timeout_s: float = Field(default=30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _ordered(self) -> ServeSettings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) is over max_k ({self.max_k})")
        if self.min_half_life > self.max_half_life:
            raise ValueError(f"min_half_life ({self.min_half_life}) is over max_half_life ({self.max_half_life})")
        return self

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> ServeSettings:
        """Settings from fashion-serve's config (raises SettingsError with one line for a bad value)."""
        limits = dict(cfg.get("limits") or {})
        try:
            return cls(
                max_k=cfg.get("max_k", 100),
                default_k=cfg.get("default_k", 12),
                max_upload_bytes=int(float(cfg.get("max_upload_mb", 10)) * MiB),
                inference_workers=cfg.get("inference_workers", 1),
                **limits,
            )
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "limits"
            raise SettingsError(f"serve config: {where}: {first.get('msg', 'invalid')}") from None

    def public(self) -> dict[str, Any]:
        """What ``/info`` shows clients (all of it: none of these is a secret)."""
        return self.model_dump()
