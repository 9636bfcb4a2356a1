"""Catalog text is data (issue 19, item 5): markup, escape sequences and bidi controls are shown, never obeyed."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from fashion_lightning.retrieval import build_index
from fashion_lightning.retrieval.explain import Explanation
from fashion_lightning.retrieval.gallery import render_gallery, results_table
from fashion_lightning.retrieval.results import Recommendation, RecommendationResult
from fashion_lightning.utils.terminal import MAX_FIELD_CHARS, clean_text, escape_markup, figure_text, rich_text
from hydra_helpers import make_cfg

HOSTILE = [
    "Closing tag [/] shirt",
    "[link=https://evil.example]Click me[/link]",
    "[bold red]loud[/bold red] [/nope]",
    "\x1b]0;pwned title\x07Window",  # OSC: sets the terminal title
    "\x1b]8;;https://evil.example\x1b\\hidden link\x1b]8;;\x1b\\",  # OSC 8 hyperlink
    "\x1b[2J\x1b[1;1HCleared screen",  # CSI: clear + move cursor
    "Red\u202eteews\u202c Shirt",  # RLO: reads backwards
    "Bell\x07 and \x9b31m C1 CSI \x08backspace",
    "Line\nbreak\ttab\r\u2028sep",
    "Price $x^2$ and $\\frac{",  # matplotlib mathtext
    "lone \ud800 surrogate",
    "x" * 5000,
]
BAD_CHARS = ["\x1b", "\x07", "\x9b", "\x08", "\u202e", "\u202c", "\n", "\r", "\t", "\u2028", "\ud800"]


@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_clean_text_keeps_only_printable_one_line_text(text):
    cleaned = clean_text(text)
    assert not any(c in cleaned for c in BAD_CHARS)
    assert len(cleaned) <= MAX_FIELD_CHARS
    assert "pwned title" not in cleaned and "evil.example" not in cleaned.replace("[link=https://evil.example]", "")
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    console.print(escape_markup(text))  # escaped markup prints literally, no MarkupError
    console.print(rich_text(text))


def test_clean_text_keeps_ordinary_names():
    for name in ("Men Navy Blue Check Shirt", "Café Crème Kurta", "Nike Men's 'Air' Shoes, Size 9", "蓝色衬衫"):
        assert clean_text(name) == name
    assert clean_text(None) == "" and clean_text(42) == "42"
    assert clean_text("abcdef", 4) == "abc\u2026"
    assert figure_text("$5 off$") == r"\$5 off\$"


def _result(names: list[str], query_text: str = "[/]") -> RecommendationResult:
    results = [
        Recommendation(
            rank=i + 1,
            id=100 + i,
            score=0.9 - i / 10,
            metadata={"productDisplayName": name, "articleType": "[red]Shirts", "baseColour": "\x1b[31mRed"},
            explanation=Explanation(basis="text", shared={"articleType": "[/link]"}),
        )
        for i, name in enumerate(names)
    ]
    return RecommendationResult({"kind": "text", "text": query_text, "k": len(names), "filters": {}}, results)


def test_results_table_shows_markup_and_escapes_as_text():
    """Fails on old main: ``[/]`` in a product name was rich markup (MarkupError) and ESC reached the terminal."""
    console = Console(record=True, width=400, file=io.StringIO(), force_terminal=True)
    console.print(results_table(_result(HOSTILE[:9])))
    text = console.export_text()
    assert "Closing tag [/] shirt" in text and "[link=https://evil.example]Click me" in text
    assert "[red]Shirts" in text and "[/link]" in text
    raw = console.file.getvalue()
    assert "\x1b]" not in raw  # no OSC (title, hyperlink) from the catalog; rich's own colours are CSI only
    assert "\x1b[2J" not in raw and "\u202e" not in raw and "\x07" not in raw


def test_gallery_draws_hostile_names(tmp_path):
    """Fails on old main: an unbalanced ``$`` in a name was parsed as mathtext and sank the gallery."""
    names = ["Tee $\\frac{$ 2", "\x1b[31mred", "[/]"]
    out = render_gallery(
        _result(names, query_text="$\\frac{$"), tmp_path / "g.png", lambda i: np.zeros((8, 6, 3), np.uint8)
    )
    assert out.stat().st_size > 0


def test_recommend_app_prints_a_hostile_catalog(tmp_path, capsys):
    """The whole app path: an index whose items carry markup answers an item query and prints its table."""
    from fashion_lightning.apps.recommend import recommend

    n = 12
    vectors = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    meta = pd.DataFrame(
        {
            "id": np.arange(n, dtype=np.int64) + 1,
            "productDisplayName": [HOSTILE[i % 9] for i in range(n)],
            "articleType": ["[/]"] * n,
            "gender": ["Men"] * n,
        }
    )
    model = {"checkpoint": None, "embedding_name": "random", "module_class": "None", "tasks": ["articleType"]}
    build_index(vectors, meta, tmp_path / "idx", model)
    cfg = make_cfg(
        "recommend",
        tmp_path / "run",
        tmp_path / "cache",
        [f"index_dir={tmp_path / 'idx'}", "query.item_id=1", "k=5", "gallery=false"],
    )
    result = recommend(cfg)
    assert len(result.results) == 5
    out = capsys.readouterr().out
    assert "[/]" in out and "\x1b]0;" not in out and "\u202e" not in out
