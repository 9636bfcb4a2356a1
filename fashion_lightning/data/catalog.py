"""Parse, repair and clean ``styles.csv`` the way the study did, counting every change.

Real quirks handled here: rows whose ``productDisplayName`` contains unquoted commas
(11-12 fields instead of 10) are repaired by joining the extra fields back into the name;
missing values follow the study (no name or no year -> drop; usage / baseColour / season
-> "Unknown"). Every repair, fill and drop is counted by reason in a :class:`DataReport`
that the apps write to the run dir as ``data_report.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from fashion_lightning.data.schema import COLUMNS, FILL_UNKNOWN, MISSING_VALUES, REQUIRED, UNKNOWN
from fashion_lightning.data.source import CatalogFormatError, CatalogSource
from fashion_lightning.utils.bounded import DEFAULT_CSV_LIMITS, CsvLimits, LimitError, check_csv_bytes

log = logging.getLogger(__name__)

_MAX_EXAMPLES = 20  # ids kept per reason in the report (counts are always complete)


@dataclass
class DataReport:
    """What cleaning did, by reason; JSON-serialisable."""

    source: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    repaired: dict[str, int] = field(default_factory=dict)
    repaired_ids: list[int | str] = field(default_factory=list)
    filled: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    # ids as they appear in styles.csv: ints, or the raw text when the id is not an integer
    dropped_ids: dict[str, list[int | str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, ids: Iterable[int | str]) -> None:
        ids = [_id_value(i) for i in ids]
        if not ids:
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + len(ids)
        kept = self.dropped_ids.setdefault(reason, [])
        kept.extend(ids[: max(0, _MAX_EXAMPLES - len(kept))])
        log.warning("dropped %d row(s): %s (e.g. ids %s)", len(ids), reason, ids[:5])

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        from fashion_lightning.utils.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in self.dropped.items()) or "none"
        fills = ", ".join(f"{k}={v}" for k, v in self.filled.items()) or "none"
        repairs = ", ".join(f"{k}={v}" for k, v in self.repaired.items()) or "none"
        return (
            f"{self.rows_read} rows read, {self.rows_kept} kept; repaired {sum(self.repaired.values())} "
            f"({repairs}); dropped: {drops}; filled Unknown: {fills}"
        )


ENCODING_REPAIRED = "name_encoding_repaired"


def decode_styles(raw: bytes) -> tuple[str, set[int]]:
    """styles.csv bytes as text; lines that are not UTF-8 are decoded as cp1252 (latin-1 as the last
    resort, which cannot fail) instead of being silently mangled. Returns the text and the 1-based
    numbers of the lines that needed it, so the rows can be counted."""
    try:
        return raw.decode("utf-8-sig"), set()
    except UnicodeDecodeError:
        pass
    lines, repaired = [], set()
    for number, line in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            repaired.add(number)
            try:
                lines.append(line.decode("cp1252"))
            except UnicodeDecodeError:
                lines.append(line.decode("latin-1"))
    return "".join(lines), repaired


def parse_styles(
    raw: bytes, report: DataReport, limits: CsvLimits = DEFAULT_CSV_LIMITS, where: str = "styles.csv"
) -> pd.DataFrame:
    """Parse styles.csv bytes into string columns, repairing unquoted commas in the name.

    Size, line length and header width are checked first (``limits``); a file that is not a Kaggle
    styles file is one :class:`CatalogFormatError` line naming ``where``.
    """
    try:
        check_csv_bytes(raw, limits, where)
    except LimitError as err:
        raise CatalogFormatError(str(err)) from None
    text, bad_encoding = decode_styles(raw)
    try:
        return _parse_rows(text, bad_encoding, report, where)
    except csv.Error as err:
        raise CatalogFormatError(f"{where}: unreadable CSV ({str(err)[:200]})") from None


def _parse_rows(text: str, bad_encoding: set[int], report: DataReport, where: str) -> pd.DataFrame:
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        shown = ", ".join(header[:20]) + (f", ... ({len(header)} columns)" if len(header) > 20 else "")
        raise CatalogFormatError(f"{where} lacks column(s) {missing}; header is [{shown[:300]}]")
    repeated = sorted({c for c in COLUMNS if header.count(c) > 1})
    if repeated:
        raise CatalogFormatError(f"{where} repeats column(s) {repeated}")
    width = len(header)
    name_col = header.index("productDisplayName")
    rows: list[list[str]] = []
    short: list[int | str] = []
    repaired: Counter[str] = Counter()
    for fields in reader:
        if not fields or all(not f.strip() for f in fields):
            continue
        report.rows_read += 1
        if reader.line_num in bad_encoding:
            repaired[ENCODING_REPAIRED] += 1
            report.repaired_ids.append(_id_value(fields[0]))
        if len(fields) > width and name_col == width - 1:
            repaired[f"name_with_{len(fields) - width}_extra_commas"] += 1
            report.repaired_ids.append(_id_value(fields[0]))
            fields = fields[: width - 1] + [",".join(fields[width - 1 :])]
        elif len(fields) != width:
            short.append(_id_value(fields[0]))
            continue
        rows.append(fields)
    report.repaired = dict(repaired)
    if repaired:
        log.info("repaired %d row(s) with unquoted commas in productDisplayName", sum(repaired.values()))
    report.drop("malformed_row (wrong number of fields)", short)
    frame = pd.DataFrame(rows, columns=header, dtype="object")
    return frame[list(COLUMNS)].apply(lambda s: s.str.strip())


def _id_value(value: object) -> int | str:
    """An id for the report: the integer when it is one, else the raw text (never a row number)."""
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return "" if value is None else str(value).strip()


def clean_styles(
    frame: pd.DataFrame, report: DataReport, exclude_master_categories: Iterable[str] = ()
) -> pd.DataFrame:
    """Apply the study's cleaning rules, recording each by reason."""
    frame = frame.replace({v: None for v in sorted(MISSING_VALUES)})
    ids = pd.to_numeric(frame["id"], errors="coerce")
    report.drop("bad_id (not an integer)", frame.loc[ids.isna(), "id"])
    frame = frame[ids.notna()].assign(id=ids[ids.notna()].astype("int64"))
    dup = frame["id"].duplicated(keep="first")
    report.drop("duplicate_id", frame.loc[dup, "id"])
    frame = frame[~dup]

    no_name = frame["productDisplayName"].isna()
    report.drop("missing_productDisplayName", frame.loc[no_name, "id"])
    frame = frame[~no_name]
    years = pd.to_numeric(frame["year"], errors="coerce")
    report.drop("missing_or_bad_year", frame.loc[years.isna(), "id"])
    frame = frame[years.notna()].assign(year=years[years.notna()].astype("int64"))

    for col in FILL_UNKNOWN:
        n = int(frame[col].isna().sum())
        if n:
            report.filled[col] = n
            frame[col] = frame[col].fillna(UNKNOWN)
    required = [c for c in REQUIRED if frame[c].isna().any()]
    for col in required:
        report.drop(f"missing_{col}", frame.loc[frame[col].isna(), "id"])
        frame = frame[frame[col].notna()]

    excluded = frame["masterCategory"].isin(list(exclude_master_categories))
    report.drop("excluded_masterCategory", frame.loc[excluded, "id"])
    return frame[~excluded].reset_index(drop=True)


@dataclass
class Catalog:
    """A cleaned catalog: one row per product whose image file exists."""

    source: CatalogSource
    frame: pd.DataFrame
    report: DataReport


def load_catalog(root: str | Path | CatalogSource, exclude_master_categories: Iterable[str] = ()) -> Catalog:
    """Read, repair and clean a Kaggle-layout catalog; drop rows with no image file.

    Undecodable images are dropped later, when the image cache decodes them
    (:func:`fashion_lightning.data.image_cache.attach_images`).
    """
    source = root if isinstance(root, CatalogSource) else CatalogSource(root)
    report = DataReport(source=str(source.root))
    raw = source.read_styles()
    frame = clean_styles(parse_styles(raw, report, where=source.styles_where), report, exclude_master_categories)
    has_image = frame["id"].isin(source.image_ids)
    report.drop("missing_image", frame.loc[~has_image, "id"])
    frame = frame[has_image].reset_index(drop=True)
    report.rows_kept = len(frame)
    log.info("catalog %s: %s", source.root.name, report.summary())
    return Catalog(source, frame, report)
