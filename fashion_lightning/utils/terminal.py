"""Catalog text is data: the one place that turns text from a file into something safe to show.

Product names, attribute values and ids come from someone else's ``styles.csv`` / ``items.csv``. Printed
as they are, ``[/]`` or ``[link=...]`` is rich markup (a crash, or a link the catalog chose), an
``ESC [ ...`` sequence moves the cursor, retitles the window or hides text, a bidi override makes a line
read backwards, and a 1 MB name fills the screen. :func:`clean_text` removes escape sequences, control
characters, bidi controls and lone surrogates and bounds the length; :func:`rich_text` wraps the result in
a rich ``Text`` (never parsed as markup), :func:`escape_markup` escapes it for a markup string, and
:func:`figure_text` makes it literal for matplotlib (no mathtext from ``$...$``).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from rich.markup import escape
from rich.text import Text

MAX_FIELD_CHARS = 200  # a table cell or caption never shows more of one value than this
ELLIPSIS = "\u2026"

# ESC sequences: CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST: titles, hyperlinks), DCS / SOS / PM / APC
# strings (ESC P|X|^|_ ... ST), and two-character escapes (ESC + one byte); C1 CSI / OSC (U+009B / U+009D)
# are control characters and go with them below.
_ESCAPES = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]?|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[PX^_][^\x1b]*(?:\x1b\\)?|[\x20-\x7e]?)"
)
# bidi embeddings / overrides / isolates and marks: they reorder what the rest of the line looks like
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")
_SPACES = frozenset("\t\n\r\x0b\x0c\x85\u2028\u2029")


def clean_text(value: Any, max_chars: int = MAX_FIELD_CHARS) -> str:
    """``value`` as one line of plain printable text of at most ``max_chars`` characters.

    Line breaks and tabs become spaces; escape sequences, other control characters (C0, C1, DEL), bidi
    controls and lone surrogates are removed; a longer text ends in an ellipsis.
    """
    text = "" if value is None else str(value)
    text = text[: max(1, max_chars) * 4 + 64]  # bound the work: a 1 GB field costs what a short one does
    text = _ESCAPES.sub("", text)
    out = []
    for char in text:
        if char in _SPACES:
            out.append(" ")
        elif char in _BIDI or unicodedata.category(char) in ("Cc", "Cs"):
            continue
        else:
            out.append(char)
    text = "".join(out)
    if len(text) > max_chars:
        text = text[: max(0, max_chars - 1)] + ELLIPSIS
    return text


def rich_text(value: Any, max_chars: int = MAX_FIELD_CHARS, style: str | None = None) -> Text:
    """A rich ``Text`` of the cleaned value: rich never parses a ``Text`` as markup."""
    return Text(clean_text(value, max_chars), style=style or "")


def escape_markup(value: Any, max_chars: int = MAX_FIELD_CHARS) -> str:
    """The cleaned value with rich markup escaped, for f-strings passed to ``Console.print``."""
    return escape(clean_text(value, max_chars))


def figure_text(value: Any, max_chars: int = MAX_FIELD_CHARS) -> str:
    """The cleaned value for matplotlib: ``$`` escaped, so ``$...$`` in a name is not parsed as mathtext."""
    return clean_text(value, max_chars).replace("$", r"\$")
