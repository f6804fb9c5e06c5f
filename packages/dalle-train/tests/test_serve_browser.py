"""The page of ``dalle-train serve`` in a real browser: Debian's Chromium, driven by Playwright,
against the server on 127.0.0.1 with a tiny DALLE trained in the test.

Chromium comes from Debian (``apt-get install chromium``; ``scripts/test`` installs it where it
is missing and it can). Without it the test is skipped, except under CI (``CI`` set), where it
fails. ``DALLE_SERVE_SCREENSHOT=FILE`` also saves a screenshot of the page with its images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason='the serve extra is not installed: pip install "dalle-train[serve]"')
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from serve_helpers import Gate, load_dalle, png_pixels, train_tiny_dalle  # noqa: E402

from dalle_train.serve.pngs import png_settings  # noqa: E402
from dalle_train.serve.server import Server  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: headless, as root, and quiet on a machine without a network (no updates, sync or QUIC)
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run the browser test")
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def dalle(tmp_path_factory: pytest.TempPathFactory, vae_dir: Path):
    return load_dalle(train_tiny_dalle(tmp_path_factory.mktemp("serve-browser") / "run", vae_dir))


def test_the_page_generates_shows_progress_and_offers_each_png(browser, dalle) -> None:
    gate = Gate(opened=False)
    server = Server(dalle, port=0, max_images=8)
    server.worker.on_batch = gate
    with server:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url)
        page.wait_for_function("document.getElementById('model').textContent.includes('32 px')")
        page.fill("#prompt", "a red circle")
        page.fill("#num_images", "3")
        page.fill("#top_k", "0")
        page.fill("#seed", "7")
        page.click("#generate")
        gate.reached.acquire(timeout=30)  # the worker holds the batch: the page shows it is busy
        page.wait_for_selector("#status-text:has-text('sampling: 0 %')")
        assert page.is_visible("#progress") and page.is_disabled("#generate") and page.is_visible("#cancel")
        gate.event.set()
        page.wait_for_function(
            "[...document.querySelectorAll('#images img')].filter(i => i.complete && i.naturalWidth > 0)"
            ".length === 3"
        )
        page.wait_for_selector("#status-text:has-text('3 image(s), seed 7')")
        assert page.is_enabled("#generate") and not page.is_visible("#progress")
        if os.environ.get("DALLE_SERVE_SCREENSHOT"):
            page.screenshot(path=os.environ["DALLE_SERVE_SCREENSHOT"], full_page=True)
        links = page.eval_on_selector_all("#images a[download]", "links => links.map(a => a.href)")
        assert len(links) == 3
        png = page.request.get(links[2])
        assert png.ok and png.headers["content-type"] == "image/png"
        assert png_settings(png.body())["seed"] == 7 and png_pixels(png.body()).shape == (3, 32, 32)

        # a bad request: the message on the page, the field marked, and the server still serves
        page.fill("#prompt", "")
        page.click("#generate")
        page.wait_for_selector("#error:has-text('the prompt is empty')")
        assert "invalid" in page.get_attribute("#prompt", "class")
        page.fill("#prompt", "a blue square")
        page.fill("#num_images", "2")
        page.click("#generate")
        page.wait_for_selector("#status-text:has-text('2 image(s), seed 7')")
        assert not page.is_visible("#error")
        assert page.eval_on_selector_all("#images img", "images => images.length") == 2
        page.close()
