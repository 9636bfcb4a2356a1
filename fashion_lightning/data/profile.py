"""The data profile of a catalog: what cleaning did, missing values, distributions, cross-tabs, splits.

Plain functions; the ``fashion-eda`` app (:mod:`fashion_lightning.apps.eda`) runs them on a config.

:func:`run_eda` takes a prepared :class:`~fashion_lightning.data.datamodule.FashionDataModule`
and writes into ``output_dir``:

* ``eda_report.md``: the whole report (Markdown tables + links to the plots);
* ``plots/*.png``: one bar chart per attribute, gender x articleType and season x gender
  heatmaps, class shares per split (articleType top-N, masterCategory);
* ``tables/*.csv``: every table of the report, complete (the Markdown shows the top rows).

The missing-value table is computed on the raw ``styles.csv`` (after comma repair, before
cleaning) and counts both blank fields and the literal ``NA`` that pandas, and so the study,
read as missing. Figures come from :mod:`fashion_lightning.utils.figures` (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fashion_lightning.data.catalog import DataReport, parse_styles
from fashion_lightning.data.schema import COLUMNS, MISSING_VALUES
from fashion_lightning.data.splits import SPLITS
from fashion_lightning.utils.figures import new_figure, save_figure

log = logging.getLogger(__name__)

REPORT_NAME = "eda_report.md"
#: the non-blank texts cleaning treats as missing (schema.MISSING_VALUES, i.e. pandas.read_csv's defaults)
NA_LITERALS = MISSING_VALUES - {""}
_MD_ROWS = 15  # rows of long tables shown in the Markdown (the CSV has them all)


@dataclass
class EdaResult:
    """Where everything went, plus the main tables (for callers and tests)."""

    output_dir: Path
    report_path: Path
    data_report: DataReport
    missing: pd.DataFrame
    split_sizes: pd.DataFrame
    plots: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, Path] = field(default_factory=dict)


# -- tables ---------------------------------------------------------------------------------
def missing_values(raw: pd.DataFrame) -> pd.DataFrame:
    """Per column of the raw parsed CSV: blank fields, ``NA``-like literals, total and percent."""
    rows = []
    for col in raw.columns:
        values = raw[col].fillna("").astype(str).str.strip()
        blank = int((values == "").sum())
        literal = int(values.isin(NA_LITERALS).sum())
        rows.append({"column": col, "blank": blank, "NA_literal": literal, "missing": blank + literal,
                     "percent": round(100.0 * (blank + literal) / max(1, len(raw)), 3)})  # fmt: skip
    return pd.DataFrame(rows).set_index("column")


def distribution(frame: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Counts and percent per value (years in calendar order, everything else by count)."""
    counts = frame[attribute].value_counts()
    counts = counts.sort_index() if attribute == "year" else counts.sort_values(ascending=False, kind="stable")
    out = pd.DataFrame({"count": counts.astype(int), "percent": (100.0 * counts / max(1, len(frame))).round(2)})
    out.index = out.index.astype(str)
    out.index.name = attribute
    return out


def crosstab(frame: pd.DataFrame, rows: str, cols: str, top_cols: int | None = None) -> pd.DataFrame:
    """Counts of ``rows`` x ``cols``; with ``top_cols`` only the most frequent column values (by total)."""
    table = pd.crosstab(frame[rows], frame[cols])
    order = table.sum(axis=0).sort_values(ascending=False, kind="stable").index
    table = table[order[:top_cols] if top_cols else order]
    return table.loc[table.sum(axis=1).sort_values(ascending=False, kind="stable").index]


def split_distribution(frames: dict[str, pd.DataFrame], attribute: str, top_n: int | None = None) -> pd.DataFrame:
    """Per split: count and share of each class (``top_n`` classes by total, the rest summed as "(rest)")."""
    counts = pd.DataFrame({s: frames[s][attribute].value_counts() for s in SPLITS if s in frames}).fillna(0).astype(int)
    counts = counts.loc[counts.sum(axis=1).sort_values(ascending=False, kind="stable").index]
    if top_n and len(counts) > top_n:
        rest = counts.iloc[top_n:].sum().rename("(rest)")
        counts = pd.concat([counts.iloc[:top_n], rest.to_frame().T])
    totals = counts.sum(axis=0).replace(0, 1)
    share = (100.0 * counts / totals).round(2).add_suffix(" %")
    out = pd.concat([counts, share], axis=1)
    out.index.name = attribute
    return out


def markdown_table(frame: pd.DataFrame, max_rows: int | None = _MD_ROWS, index: bool = True) -> str:
    """A GitHub-flavoured Markdown table (no ``tabulate`` dependency); long tables are cut with a note."""
    shown = frame if max_rows is None or len(frame) <= max_rows else frame.iloc[:max_rows]
    cols = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for key, *values in shown.astype(object).itertuples():  # object dtype keeps ints as ints per cell
        cells = ([str(key)] if index else []) + [_fmt(v) for v in values]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if len(shown) < len(frame):
        lines.append(f"\n_{len(frame) - len(shown)} more rows in the CSV._")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return f"{value:,.2f}"
    return str(value)


# -- figures --------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Figure:
    return new_figure(width, height, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, dpi=100, clear=True)  # cleared: no pyplot registry holds a reference


def bar_figure(dist: pd.DataFrame, title: str, top_n: int) -> Figure:
    shown = dist if len(dist) <= top_n else dist.iloc[:top_n]
    labels, counts = shown.index.tolist()[::-1], shown["count"].to_numpy()[::-1]
    fig = _figure(7.0, max(2.0, 0.28 * len(shown) + 1.2))
    ax = fig.add_subplot()
    bars = ax.barh(range(len(shown)), counts, color="#4C72B0")
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.bar_label(bars, [f"{c:,}" for c in counts], fontsize=7, padding=2)
    ax.set_xlabel("items")
    more = f" (top {top_n} of {len(dist)})" if len(dist) > top_n else f" ({len(dist)} values)"
    ax.set_title(title + more, fontsize=10)
    ax.margins(x=0.15)
    return fig


def heatmap_figure(table: pd.DataFrame, title: str) -> Figure:
    values = table.to_numpy()
    fig = _figure(max(4.0, 0.55 * table.shape[1] + 2.5), max(2.5, 0.45 * table.shape[0] + 2.0))
    ax = fig.add_subplot()
    image = ax.imshow(np.log1p(values), cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="log(1 + items)")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), [str(r) for r in table.index], fontsize=8)
    ax.set_xlabel(table.columns.name or "")
    ax.set_ylabel(table.index.name or "")
    high = np.log1p(values.max()) * 0.6 if values.size else 0
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v}", ha="center", va="center", fontsize=6, color="white" if np.log1p(v) > high else "black")
    ax.set_title(title, fontsize=10)
    return fig


def split_figure(table: pd.DataFrame, title: str) -> Figure:
    """Grouped bars: share of each class within train / val / test (equal bars = good stratification)."""
    shares = table[[c for c in table.columns if str(c).endswith(" %")]]
    n, k = len(shares), shares.shape[1]
    fig = _figure(7.0, max(2.5, 0.35 * n + 1.5))
    ax = fig.add_subplot()
    height = 0.8 / max(1, k)
    positions = np.arange(n)[::-1]
    for j, col in enumerate(shares.columns):
        ax.barh(
            positions + (k / 2 - j - 0.5) * height, shares[col].to_numpy(), height, label=str(col).removesuffix(" %")
        )
    ax.set_yticks(positions, [str(i) for i in shares.index], fontsize=8)
    ax.set_xlabel("% of the split")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


# -- report ---------------------------------------------------------------------------------
def run_eda(datamodule, output_dir: str | Path, attributes: Sequence[str] = ("masterCategory", "articleType"),
            top_n: int = 25, title: str | None = None) -> EdaResult:  # fmt: skip
    """Prepare ``datamodule`` (which writes data_report.json, splits.csv, vocab.json when its
    ``output_dir`` is set), then write the EDA tables, plots and ``eda_report.md`` into ``output_dir``."""
    out = Path(output_dir)
    plots_dir, tables_dir = out / "plots", out / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    datamodule.prepare_data()
    datamodule.setup("fit")
    catalog, frames = datamodule.catalog, datamodule.frames
    report = catalog.report
    raw = _quiet_parse(catalog.source.read_styles())  # repaired, not cleaned
    frame = catalog.frame
    plots: dict[str, Path] = {}
    tables: dict[str, Path] = {}

    def table(name: str, data: pd.DataFrame) -> pd.DataFrame:
        data.to_csv(tables_dir / f"{name}.csv")
        tables[name] = tables_dir / f"{name}.csv"
        return data

    missing = table("missing_values", missing_values(raw))
    dists: dict[str, pd.DataFrame] = {}
    for attr in attributes:
        if attr not in frame.columns:
            log.warning("attribute %r is not a catalog column (columns: %s); skipped", attr, list(COLUMNS))
            continue
        dists[attr] = table(f"dist_{attr}", distribution(frame, attr))
        plots[f"dist_{attr}"] = _save(bar_figure(dists[attr], attr, top_n), plots_dir / f"dist_{attr}.png")
    gender_article = table("gender_x_articleType", crosstab(frame, "gender", "articleType", top_cols=top_n))
    plots["gender_x_articleType"] = _save(
        heatmap_figure(gender_article, f"gender x articleType ({gender_article.shape[1]} most frequent articleTypes)"),
        plots_dir / "gender_x_articleType.png",
    )
    season_gender = table("season_x_gender", crosstab(frame, "season", "gender"))
    plots["season_x_gender"] = _save(
        heatmap_figure(season_gender, "season x gender"), plots_dir / "season_x_gender.png"
    )
    sizes = pd.DataFrame({"items": [len(frames[s]) for s in SPLITS]}, index=pd.Index(SPLITS, name="split"))
    sizes["percent"] = (100.0 * sizes["items"] / max(1, sizes["items"].sum())).round(2)
    table("split_sizes", sizes)
    split_tables = {}
    for attr, n in (("articleType", top_n), ("masterCategory", None)):
        split_tables[attr] = table(f"split_{attr}", split_distribution(frames, attr, n))
        shown = f" (top {n} of {frame[attr].nunique()})" if n and frame[attr].nunique() > n else ""
        plots[f"split_{attr}"] = _save(
            split_figure(split_tables[attr], f"{attr} share per split{shown}"),
            plots_dir / f"split_{attr}.png",
        )

    md = _markdown(
        datamodule, title, raw, missing, dists, gender_article, season_gender, sizes, split_tables, plots, out
    )
    report_path = out / REPORT_NAME
    report_path.write_text(md, encoding="utf-8")
    log.info("EDA report: %s", report_path)
    return EdaResult(out, report_path, report, missing, sizes, plots, tables)


def _quiet_parse(raw_bytes: bytes) -> pd.DataFrame:
    """parse_styles without repeating the repair/drop log lines the catalog load already printed."""
    catalog_log = logging.getLogger(parse_styles.__module__)
    level = catalog_log.level
    catalog_log.setLevel(logging.ERROR)
    try:
        return parse_styles(raw_bytes, DataReport())
    finally:
        catalog_log.setLevel(level)


def _markdown(dm, title, raw, missing, dists, gender_article, season_gender, sizes, split_tables, plots, out) -> str:
    report: DataReport = dm.catalog.report
    rel = {k: p.relative_to(out).as_posix() for k, p in plots.items()}
    source = Path(report.source).name or report.source
    parts = [
        f"# {title or 'Data report'}: `{source}`",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} from `{report.source}`. "
        "Tables are complete in `tables/*.csv`; "
        "`data_report.json`, `splits.csv` and `vocab.json` sit beside this file.",
        "## Cleaning",
        f"**{report.rows_read:,} rows read, {report.rows_kept:,} kept** "
        f"({report.rows_read - report.rows_kept:,} dropped, {sum(report.repaired.values()):,} repaired).",
        "### Repaired rows (unquoted commas in productDisplayName, fields joined back into the name)",
        markdown_table(_counts(dict(sorted(report.repaired.items())), "repair"), None)
        + "\n\nids: "
        + ", ".join(map(str, report.repaired_ids[:40]))
        + (" ..." if len(report.repaired_ids) > 40 else "")
        if report.repaired
        else "None.",
        "### Dropped rows by reason",
        markdown_table(_counts(report.dropped, "reason", report.dropped_ids), None) if report.dropped else "None.",
        '### Missing values filled with "Unknown"',
        markdown_table(_counts(report.filled, "column"), None) if report.filled else "None.",
        *(["### Notes", *[f"- {_cut(n)}" for n in report.notes]] if report.notes else []),
        f"## Missing values in the raw styles.csv ({len(raw):,} parsed rows, before cleaning)",
        "`blank`: empty field; `NA_literal`: the text `NA` (or `N/A`, `null` ...), which pandas.read_csv, "
        "and so the study, reads as missing.",
        markdown_table(missing, None),
        f"## Attribute distributions (cleaned catalog, {len(dm.catalog.frame):,} items)",
    ]
    for attr, dist in dists.items():
        parts += [f"### {attr} ({len(dist)} values)", f"![{attr}]({rel[f'dist_{attr}']})", markdown_table(dist, 10)]
    parts += [
        "## gender x articleType",
        f"![gender x articleType]({rel['gender_x_articleType']})",
        markdown_table(gender_article.T.rename_axis("articleType"), _MD_ROWS),
        "## season x gender",
        f"![season x gender]({rel['season_x_gender']})",
        markdown_table(season_gender.rename_axis("season"), None),
        "## Splits",
        f"Stratified by articleType, test_size={dm.hparams.test_size}, val_size={dm.hparams.val_size} (of the rest), "
        + (f"reused from `{dm.hparams.splits_path}`." if dm.hparams.splits_path else f"seed {dm.hparams.split_seed}."),
        markdown_table(sizes, None),
    ]
    for attr, tab in split_tables.items():
        parts += [
            f"### {attr} per split",
            f"![{attr} per split]({rel[f'split_{attr}']})",
            markdown_table(tab, _MD_ROWS + 1),
        ]
    vocab = pd.DataFrame(
        {
            "classes": [len(dm.vocabs[t]) for t in dm.vocabs.tasks],
            "folded into Other": ["yes" if "Other" in dm.vocabs[t].classes else "no" for t in dm.vocabs.tasks],
            "class weight min": [float(dm.class_weights[t][dm.class_weights[t] > 0].min()) for t in dm.vocabs.tasks],
            "class weight max": [float(dm.class_weights[t].max()) for t in dm.vocabs.tasks],
        },
        index=pd.Index(dm.vocabs.tasks, name="task"),
    )
    parts += [f"## Label vocabularies (train split, min_count={dm.hparams.min_count})", markdown_table(vocab, None)]
    return "\n\n".join(parts) + "\n"


def _cut(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + " ... (full text in data_report.json)"


def _counts(
    counts: dict[str, int], name: str, examples: Mapping[str, Sequence[int | str]] | None = None
) -> pd.DataFrame:
    frame = pd.DataFrame({"rows": list(counts.values())}, index=pd.Index(list(counts), name=name))
    if examples is not None:
        frame["example ids"] = [", ".join(map(str, examples.get(k, [])[:10])) for k in counts]
    return frame
