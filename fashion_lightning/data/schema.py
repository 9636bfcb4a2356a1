"""The catalog's schema: one place for every fact about styles.csv that several modules need.

Cleaning, EDA, the synthetic generator, the label vocabularies, the evaluation callback, the
recommender's filters and explanations, and the KAGL protocol all read these names from here, so
they cannot drift apart. Configs read them with the ``schema`` OmegaConf resolver
(``tasks: ${schema:TASKS}``); ``conf/recommend.yaml`` spells its filter keys out (so that
``filters.gender=Men`` works on the command line) and tests/unit/test_schema.py checks them.
"""

from __future__ import annotations

from omegaconf import OmegaConf

#: styles.csv columns, in the Kaggle file's order
COLUMNS: tuple[str, ...] = (
    "id", "gender", "masterCategory", "subCategory", "articleType",
    "baseColour", "season", "year", "usage", "productDisplayName",
)  # fmt: skip
#: the styles.csv header line as the Kaggle export writes it
STYLES_HEADER = ",".join(COLUMNS)

#: the six attribute tasks every model predicts by default (vocab order)
TASKS: tuple[str, ...] = ("articleType", "baseColour", "gender", "masterCategory", "season", "subCategory")
#: tasks a run may add (``data.tasks``): "usage" is 1/3 "Unknown" in the real data, so it is opt-in
OPTIONAL_TASKS: tuple[str, ...] = ("usage",)
ALL_TASKS: tuple[str, ...] = (*TASKS, *OPTIONAL_TASKS)

#: columns a missing value is filled with :data:`UNKNOWN` in (the study's rule); other gaps drop the row
FILL_UNKNOWN: tuple[str, ...] = ("usage", "baseColour", "season")
#: columns a row cannot do without (after the fills): missing -> dropped
REQUIRED: tuple[str, ...] = ("gender", "masterCategory", "subCategory", "articleType")
UNKNOWN = "Unknown"

#: Field texts that mean "missing". The study read styles.csv with ``pandas.read_csv``, so this is
#: exactly pandas' default ``na_values`` (blank included): cleaning drops/fills them and EDA counts
#: them, with the same set (tests/unit/test_schema.py checks it against pandas itself).
MISSING_VALUES: frozenset[str] = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})  # fmt: skip

#: label index for "unknown to the vocabulary": excluded from the loss and from every metric
IGNORE_INDEX = -1

#: attributes a recommendation may be filtered on (exact match; ``fashion-recommend filters.<field>=...``)
FILTER_FIELDS: tuple[str, ...] = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season")
#: attributes an explanation compares between query and result
EXPLAIN_FIELDS: tuple[str, ...] = (*FILTER_FIELDS, "usage")
#: Marqo's KAGL category-to-product fields
KAGL_CATEGORY_FIELDS: tuple[str, ...] = ("masterCategory", "subCategory", "articleType", "baseColour")

_NAMES = {
    "COLUMNS": COLUMNS,
    "TASKS": TASKS,
    "OPTIONAL_TASKS": OPTIONAL_TASKS,
    "FILTER_FIELDS": FILTER_FIELDS,
    "EXPLAIN_FIELDS": EXPLAIN_FIELDS,
    "KAGL_CATEGORY_FIELDS": KAGL_CATEGORY_FIELDS,
    "IGNORE_INDEX": IGNORE_INDEX,
    "UNKNOWN": UNKNOWN,
}


def schema_value(name: str) -> object:
    """``${schema:FILTER_FIELDS}`` in a config: the value (lists as lists) of a name above."""
    if name not in _NAMES:
        raise KeyError(f"${{schema:{name}}}: unknown schema name; choose from {', '.join(_NAMES)}")
    value = _NAMES[name]
    return list(value) if isinstance(value, tuple) else value


def register_resolvers() -> None:
    """Register the ``schema`` OmegaConf resolver (idempotent; the package's ``__init__`` calls it)."""
    if not OmegaConf.has_resolver("schema"):
        OmegaConf.register_new_resolver("schema", schema_value)
