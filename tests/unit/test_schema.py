"""data/schema.py is the one place for catalog facts: cleaning, EDA, configs and the generator agree with it."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from fashion_lightning.data import schema
from fashion_lightning.data.catalog import DataReport, clean_styles, parse_styles
from fashion_lightning.data.profile import missing_values

CONF = Path(__file__).resolve().parents[2] / "conf"


def _styles(usages: list[str]) -> str:
    rows = [f"{1000 + i},Men,Apparel,Topwear,Tshirts,Blue,Summer,2012,{u},Name {i}" for i, u in enumerate(usages)]
    return schema.STYLES_HEADER + "\n" + "\n".join(rows) + "\n"


def test_missing_values_are_what_pandas_read_csv_reads_as_missing():
    literals = sorted(schema.MISSING_VALUES - {""})
    read = pd.read_csv(io.StringIO(_styles(literals)), dtype=str, keep_default_na=True)
    assert read["usage"].isna().all(), read.loc[read["usage"].notna(), "usage"].tolist()
    # ... and nothing else: a near-miss stays a value
    near = pd.read_csv(io.StringIO(_styles(["NAN", "none", "Null ", "N.A."])), dtype=str)
    assert near["usage"].notna().all()
    try:  # pandas' own list, where this pandas exposes it
        from pandas._libs.parsers import STR_NA_VALUES
    except ImportError:  # pragma: no cover
        return
    assert schema.MISSING_VALUES == frozenset(STR_NA_VALUES)


def test_eda_counts_as_missing_exactly_what_cleaning_fills():
    usages = ["Casual", "", "Sports", *sorted(schema.MISSING_VALUES - {""}), "NAN", "Unknown"]
    report = DataReport()
    raw = parse_styles(_styles(usages).encode(), report)
    clean = clean_styles(raw, report)
    eda = missing_values(raw)
    assert eda.loc["usage", "missing"] == report.filled["usage"] == len(schema.MISSING_VALUES)
    assert (clean["usage"] == schema.UNKNOWN).sum() == len(schema.MISSING_VALUES) + 1  # + the literal "Unknown"
    assert "NAN" in set(clean["usage"])  # not a missing literal: kept as a value by both


def test_synthetic_catalog_writes_the_schema_header(synthetic_root: Path):
    first = (synthetic_root / "styles.csv").read_text(encoding="utf-8").splitlines()[0]
    assert first == schema.STYLES_HEADER
    assert tuple(schema.STYLES_HEADER.split(",")) == schema.COLUMNS


def test_one_ignore_index_and_one_field_list_each():
    from fashion_lightning.callbacks import evaluation as callback
    from fashion_lightning.evaluation import kagl
    from fashion_lightning.models import losses
    from fashion_lightning.retrieval import explain, recommender

    assert losses.IGNORE_INDEX is schema.IGNORE_INDEX and callback.IGNORE_INDEX is schema.IGNORE_INDEX
    assert recommender.FILTER_FIELDS is schema.FILTER_FIELDS
    assert explain.EXPLAIN_FIELDS is schema.EXPLAIN_FIELDS
    assert kagl.KAGL_CATEGORY_FIELDS is schema.KAGL_CATEGORY_FIELDS
    assert set(schema.FILTER_FIELDS) <= set(schema.COLUMNS) and set(schema.ALL_TASKS) <= set(schema.COLUMNS)


def test_recommend_config_offers_exactly_the_schema_filters():
    filters = OmegaConf.load(CONF / "recommend.yaml").filters
    assert tuple(filters) == schema.FILTER_FIELDS
    assert all(value is None for value in filters.values())


def test_schema_resolver_feeds_configs():
    schema.register_resolvers()
    data = OmegaConf.load(CONF / "data" / "default.yaml")
    assert list(data.tasks) == list(schema.TASKS)
    bad = OmegaConf.create({"x": "${schema:TASK}"})
    with pytest.raises(Exception, match="unknown schema name"):
        OmegaConf.to_container(bad, resolve=True)
