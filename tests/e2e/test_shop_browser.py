"""The shop page in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

Train a small model on the synthetic catalog, index it, serve it with ``fashion-serve``'s own ``build``
on 127.0.0.1, then do what a shopper does: upload a photo, see k results, open one ("more like
this"), like two products (personalised shelf), apply a filter. A screenshot is saved at the end.

Where no browser is found (no ``chromium`` at ``CHROMIUM``, or no ``playwright`` package) the test skips
with that reason, so README's test command passes on a fresh machine; ``FASHION_LIGHTNING_REQUIRE_BROWSER=1``
(``.ci/run`` sets it after installing chromium) makes a missing browser a failure instead.

``FASHION_SERVE_INDEX=<index dir>`` serves an existing index instead (README's screenshot was taken on
the Kaggle dev catalog that way) and ``FASHION_SERVE_SCREENSHOT=<png>`` says where the picture goes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from hydra_helpers import make_cfg, train_and_index

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
REQUIRE_BROWSER = os.environ.get("FASHION_LIGHTNING_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
K = 6
ITEMS = 240


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    if os.environ.get("FASHION_SERVE_INDEX"):
        return Path(os.environ["FASHION_SERVE_INDEX"])
    return train_and_index(tmp_path_factory.mktemp("shop"), ITEMS, epochs=2)


@pytest.fixture(scope="module")
def base_url(index_dir, tmp_path_factory):
    """fashion-serve's app (built as the CLI builds it) under uvicorn in a thread, on a free port."""
    import uvicorn

    from fashion_lightning.apps.serve import build

    run = tmp_path_factory.mktemp("serve_run")
    app = build(make_cfg("serve", run, run / "cache", [f"index_dir={index_dir}", "default_k=12"]))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fashion-serve did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _missing_browser() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found: install Debian's chromium (`apt-get install -y chromium`); .ci/run does"
    if importlib.util.find_spec("playwright") is None:
        return 'playwright not installed: `pip install -e ".[dev]"`'
    return None


@pytest.fixture(scope="module")
def browser():
    """Skips (before any training) where no browser is found, unless CI requires one."""
    missing = _missing_browser()
    if missing and REQUIRE_BROWSER:
        pytest.fail(f"{missing} (FASHION_LIGHTNING_REQUIRE_BROWSER=1: the browser test is required)")
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def _ids(page, grid: str) -> list[int]:
    return [int(x) for x in page.eval_on_selector_all(f"#{grid} .card", "cards => cards.map(c => c.dataset.id)")]


def test_shopper_flow(browser, base_url, index_dir, tmp_path):
    from playwright.sync_api import expect

    from fashion_lightning.data.source import CatalogSource
    from fashion_lightning.retrieval import load_index

    index = load_index(index_dir, verify=False)
    source = CatalogSource(index.model_info["catalog"])
    photo = tmp_path / "my_photo.jpg"
    photo.write_bytes(source.image_bytes(int(index.ids[len(index.ids) // 3])))

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(base_url + "/")
    expect(page.locator("#results .card").first).to_be_visible()
    page.select_option("#k-select", str(K))
    expect(page.locator("#results .card")).to_have_count(K)

    # 1. photo search: k results, each with a match score and a product photo
    page.set_input_files("#photo-input", str(photo))
    expect(page.locator("#results-title")).to_have_text("Similar to your photo")
    expect(page.locator("#results .card")).to_have_count(K)
    expect(page.locator("#results .card .match")).to_have_count(K)
    assert "looks like:" in page.inner_text("#results-note")
    page.wait_for_function("() => [...document.images].every(img => img.complete && img.naturalWidth > 0)")

    # 2. click a product: "more like this" without the product itself
    first = page.locator("#results .card").first
    clicked = int(first.get_attribute("data-id"))
    name = first.locator(".name").inner_text()
    first.locator(".thumb").click()
    expect(page.locator("#results-title")).to_have_text(f"More like this: {name}")
    expect(page.locator("#results .card")).to_have_count(K)
    assert clicked not in _ids(page, "results")
    assert page.locator("#results .card .why span").count() > 0  # the "why": shared attributes

    # 3. like two products: a personalised shelf appears, without the liked ones
    liked = _ids(page, "results")[:2]
    for item in liked:
        page.locator(f'#results .card[data-id="{item}"] .like').click()
    expect(page.locator("#for-you")).to_be_visible()
    expect(page.locator("#for-you-note")).to_contain_text("from 2 like(s)")
    expect(page.locator("#for-you-grid .card")).to_have_count(6)
    assert not set(liked) & set(_ids(page, "for-you-grid"))
    expect(page.locator("#like-count")).to_have_text("2")

    # 4. a filter chip narrows the results (and the personalised shelf) to that value
    gender = page.locator("#results .card").first.get_attribute("data-gender")
    page.locator(f'.chip-group[data-field="gender"] .chip[data-value="{gender}"]').click()
    expect(page.locator('.chip-group[data-field="gender"] .chip.on')).to_have_text(gender)
    page.wait_for_function(
        """g => { const cards = [...document.querySelectorAll('#results .card, #for-you-grid .card')];
                  return cards.length > 0 && cards.every(c => c.dataset.gender === g); }""",
        arg=gender,
    )
    page.wait_for_function("() => [...document.images].every(img => img.complete && img.naturalWidth > 0)")
    assert not problems, problems

    shot = Path(os.environ.get("FASHION_SERVE_SCREENSHOT", tmp_path / "shop.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(tmp_path / "shot.png"), full_page=True)
    shutil.copyfile(tmp_path / "shot.png", shot)
    assert shot.stat().st_size > 20_000
    page.close()
