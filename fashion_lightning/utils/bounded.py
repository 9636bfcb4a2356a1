"""Bounded readers for files from elsewhere: one iterative walk and one JSON reader with limits.

A file someone else wrote (a checkpoint's hyperparameters, a manifest, a model config) is data: it is
parsed, never executed, and parsing it must not cost more than its size suggests. Recursive walks are
exponential on shared references (a list holding itself twice, 60 levels deep, is 2^60 paths) and
end in ``RecursionError`` when nested thousands deep; ``json.loads`` accepts ``NaN`` and recurses in C.
Everything here is iterative, counts every visit (shared references pay per path) and stops at a limit
with one line (:class:`LimitError`, a ``ValueError``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class LimitError(ValueError):
    """A file or value is larger, deeper or stranger than anything this project writes."""


@dataclass(frozen=True)
class Limits:
    """How big a structure read from a file may be (defaults: far above anything the project writes)."""

    max_depth: int = 32
    max_nodes: int = 100_000
    max_string: int = 65_536
    max_bytes: int = 16 * 2**20


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class CsvLimits:
    """How big a CSV file from elsewhere (``items.csv``, ``styles.csv``) may be, checked before parsing.

    A C tokenizer (pandas) sizes its buffers by the longest line and the header width, so a file of a
    million columns or one 1 GB line ends in ``MemoryError``; these limits refuse such a file first.
    Defaults are far above any catalog: a styles.csv row is ~100 bytes and 10 columns.
    """

    max_bytes: int = 4 * 2**30
    max_line: int = 2**20
    max_columns: int = 1024


DEFAULT_CSV_LIMITS = CsvLimits()
_SCAN_CHUNK = 1 << 24


def walk(value: Any, limits: Limits = DEFAULT_LIMITS, where: str = "value") -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every ``(path, node)`` of a nested dict/list structure, depth-first, iteratively.

    Raises :class:`LimitError` past ``max_depth`` levels or ``max_nodes`` visits (each visit counts, so a
    structure that shares references is charged for every path through it) or a string longer than
    ``max_string``.
    """
    stack: list[tuple[tuple[Any, ...], Any]] = [((), value)]
    visits = 0
    while stack:
        path, node = stack.pop()
        visits += 1
        if visits > limits.max_nodes:
            raise LimitError(f"{where} has more than {limits.max_nodes} nodes")
        if len(path) > limits.max_depth:
            raise LimitError(f"{where} is nested more than {limits.max_depth} levels deep")
        if isinstance(node, str) and len(node) > limits.max_string:
            raise LimitError(f"{where} holds a string of {len(node)} characters (limit {limits.max_string})")
        yield path, node
        if isinstance(node, Mapping):
            stack.extend((path + (key,), item) for key, item in reversed(list(node.items())))
        elif isinstance(node, (list, tuple)):
            stack.extend((path + (i,), item) for i, item in reversed(list(enumerate(node))))


def check(value: Any, limits: Limits = DEFAULT_LIMITS, where: str = "value") -> None:
    """Walk ``value`` once for its limits (see :func:`walk`); also refuses non-finite floats."""
    for path, node in walk(value, limits, where):
        if isinstance(node, float) and not math.isfinite(node):
            raise LimitError(f"{where} holds a non-finite number at {_dotted(path)}")


def _reject_constant(name: str) -> Any:
    raise LimitError(f"{name} is not valid JSON")


def loads_json(text: str | bytes, limits: Limits = DEFAULT_LIMITS, where: str = "JSON") -> Any:
    """``json.loads`` with a size bound, no NaN/Infinity, and a depth bound checked before parsing."""
    if len(text) > limits.max_bytes:
        raise LimitError(f"{where} is {len(text)} bytes (limit {limits.max_bytes})")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LimitError(f"{where} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    _check_nesting(text, limits.max_depth, where)
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except LimitError as err:
        raise LimitError(f"{where}: {err}") from None
    except (ValueError, RecursionError) as err:
        raise LimitError(f"{where} is not valid JSON: {str(err)[:200]}") from None
    check(value, limits, where)
    return value


def load_json(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Read and parse a JSON file with :func:`loads_json`'s limits (the size is checked before reading)."""
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise LimitError(f"{path} is {size} bytes (limit {limits.max_bytes})")
    return loads_json(path.read_bytes(), limits, str(path))


def load_json_or(
    path: str | Path, limits: Limits, missing: Callable[[], Exception], refused: Callable[[str], Exception]
) -> Any:
    """:func:`load_json`, with the caller's own errors for a missing file and one past ``limits`` (why given)."""
    try:
        return load_json(path, limits)
    except FileNotFoundError:
        raise missing() from None
    except LimitError as err:
        raise refused(str(err)) from None


def check_csv_bytes(data: bytes, limits: CsvLimits = DEFAULT_CSV_LIMITS, where: str = "CSV") -> None:
    """Refuse CSV bytes past ``limits``: total size, longest physical line, header width."""
    if len(data) > limits.max_bytes:
        raise LimitError(f"{where} is {len(data)} bytes (limit {limits.max_bytes})")
    _check_header(data[: limits.max_line + 2], limits, where)
    _LineScan(limits, where).feed(data)


def check_csv_file(path: str | Path, limits: CsvLimits = DEFAULT_CSV_LIMITS) -> None:
    """:func:`check_csv_bytes` for a file, streamed in chunks (the size is checked before reading)."""
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise LimitError(f"{path} is {size} bytes (limit {limits.max_bytes})")
    scan = _LineScan(limits, str(path))
    with open(path, "rb") as fh:
        head = fh.read(limits.max_line + 2)
        _check_header(head, limits, str(path))
        scan.feed(head)
        while chunk := fh.read(_SCAN_CHUNK):
            scan.feed(chunk)


class _LineScan:
    """Longest physical line (LF or CR ends one) over chunks, in numpy: ~1 GB/s, no per-line objects."""

    def __init__(self, limits: CsvLimits, where: str) -> None:
        self.limits, self.where, self.run = limits, where, 0

    def feed(self, chunk: bytes) -> None:
        import numpy as np  # numpy only when a CSV is read (bounded.py is imported by light paths)

        raw = np.frombuffer(chunk, dtype=np.uint8)
        breaks = np.flatnonzero((raw == 10) | (raw == 13))
        if len(breaks) == 0:
            self._line(self.run + len(raw))
            self.run += len(raw)
            return
        self._line(self.run + int(breaks[0]))
        if len(breaks) > 1:
            self._line(int(np.diff(breaks).max()) - 1)
        self.run = len(raw) - int(breaks[-1]) - 1
        self._line(self.run)

    def _line(self, length: int) -> None:
        if length > self.limits.max_line:
            raise LimitError(f"{self.where} has a line longer than {self.limits.max_line} bytes (limit max_line)")


def _check_header(head: bytes, limits: CsvLimits, where: str) -> None:
    """The first line's column count (of its first ``max_line`` bytes when it is longer: a lower bound)."""
    first = head.splitlines()[0] if head else b""
    try:
        columns = next(csv.reader([first.decode("utf-8-sig", errors="replace")]), [])
    except csv.Error as err:
        raise LimitError(f"{where}: unreadable header ({str(err)[:100]})") from None
    if len(columns) > limits.max_columns:
        raise LimitError(f"{where} has {len(columns)} columns (limit max_columns = {limits.max_columns})")


def _check_nesting(text: str, max_depth: int, where: str) -> None:
    """Bracket depth outside strings, in one pass, so the C parser never recurses past the limit."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise LimitError(f"{where} is nested more than {max_depth} levels deep")
        elif char in "]}":
            depth -= 1


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "<root>"
