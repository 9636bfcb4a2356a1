"""What clients send and get back as errors: the request body model with the configured limits, and pydantic's
or any exception's message turned into one plain line (no Python reprs)."""

# no `from __future__ import annotations`: pydantic's create_model reads these annotations at runtime
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, create_model

from fashion_lightning.serve.limits import INT64_MAX, INT64_MIN, ServeSettings

ItemId = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
FilterValue = StrictStr | list[StrictStr]
_REPR = re.compile(r"<class '([\w.]+)'>|<[\w.]+ object at 0x[0-9a-f]+>")  # Python reprs never reach clients


class RecommendRequest(BaseModel):
    """Exactly one of item_id, text, history (liked ids, oldest first; disliked and half_life go with it).

    The field limits here are the defaults; :func:`request_types` makes the model for other settings."""

    model_config = ConfigDict(extra="forbid")

    item_id: ItemId | None = None
    text: StrictStr | None = None
    history: list[ItemId] | None = None
    disliked: list[ItemId] | None = None
    half_life: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    k: StrictInt | None = None
    filters: dict[str, FilterValue] = Field(default_factory=dict)


def request_types(settings: ServeSettings) -> tuple[type[RecommendRequest], TypeAdapter[Any]]:
    """The request body model and the filters' type with ``settings``' limits (shown in the OpenAPI schema)."""
    value = Annotated[StrictStr, Field(max_length=settings.max_filter_chars)]
    filters = Annotated[
        dict[str, value | Annotated[list[value], Field(max_length=settings.max_filter_values)]],
        Field(max_length=settings.max_filter_fields),
    ]
    ids = Annotated[list[ItemId], Field(max_length=settings.max_history)]
    model = create_model(
        "RecommendRequest",
        __base__=RecommendRequest,
        text=(Annotated[StrictStr, Field(max_length=settings.max_text_chars)] | None, None),
        history=(ids | None, None),
        disliked=(ids | None, None),
        half_life=(
            float | None,
            Field(default=None, ge=settings.min_half_life, le=settings.max_half_life, allow_inf_nan=False),
        ),
        filters=(filters, Field(default_factory=dict)),
    )
    return model, TypeAdapter(filters)


def first_error(errors: Any) -> str:
    """pydantic's first error as one line: ``where: what`` (no input values, no Python reprs)."""
    # a union (a filter is a name or a list of names) reports each branch: the one the input's type chose
    # fails on its value, the others on the type
    ranked = sorted(errors or [{}], key=lambda e: str(e.get("type", "")).endswith("_type"))
    first = ranked[0]
    skip = ("body", "query", "path", "form", "str", "list[str]", "constrained-str", "list[constrained-str]")
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in skip)
    return f"{where or 'request'}: {plain(str(first.get('msg', 'invalid')))}"


def plain(message: str) -> str:
    """A message without Python object reprs (``<class 'str'>`` becomes ``str``) on one line."""
    message = _REPR.sub(lambda m: m.group(1) or "object", message)
    return " ".join(message.split())
