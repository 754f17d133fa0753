"""End to end in a real browser: Debian's headless Chromium, driven by Playwright, against
``mammut serve``'s app on a loopback port. A person types a query and sees the right picture
first, searches by an uploaded picture, and reads generated captions; bad input shows a message
and the page goes on working.

Playwright (not Selenium): it waits for what the test expects to appear (no sleeps or polling
loops in the test), uploads files with ``set_input_files``, and takes screenshots; its Python
package carries its own driver, and ``executable_path`` points it at /usr/bin/chromium, so it
never downloads a browser.

Skipped only where /usr/bin/chromium is absent outside CI; in CI (``CI=true``) a missing
Chromium fails. Screenshots go to ``$MAMMUT_ARTIFACTS/browser`` (default: pytest's tmp dir).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mammut.apps.build import BuildOptions, build
from mammut.apps.searcher import SearchIndex
from mammut.apps.server import create_app
from test_apps_support import ColourEncoder, colour_folder, draw, serving

CHROMIUM = Path("/usr/bin/chromium")
# the flags that work on a closed network as root (no sandbox, no background connections)
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _need_chromium() -> None:
    if CHROMIUM.is_file():
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run installs Debian's chromium and chromium-driver")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("browser")
    pics = colour_folder(root / "pics")
    build(BuildOptions(out=root / "idx", source=str(pics), progress=False), ColourEncoder())
    with serving(create_app(SearchIndex(root / "idx"), ColourEncoder(), max_upload_bytes=50_000)) as url:
        yield url


@pytest.fixture()
def artifacts(tmp_path) -> Path:
    out = Path(os.environ.get("MAMMUT_ARTIFACTS") or tmp_path) / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_search_upload_and_caption_in_a_real_browser(server, artifacts, tmp_path):
    _need_chromium()
    from playwright.sync_api import expect, sync_playwright

    upload = draw(tmp_path / "my-photo.png", "blue", (64, 48))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.set_default_timeout(20_000)
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(server)
            expect(page.locator("#about")).to_contain_text("8 images")
            expect(page.locator("#locate-controls")).to_be_hidden()  # the model finds no text in images

            page.fill("#query", "something purple")
            page.press("#query", "Enter")
            cards = page.locator(".card")
            expect(cards).to_have_count(8)
            expect(cards.first).to_contain_text("#1 purple-0.png")
            # the image may still be loading: wait for it to decode (a rejection, a broken image, fails the test)
            assert page.locator(".card img").first.evaluate("img => img.decode().then(() => img.naturalWidth)") == 20 + 4
            page.screenshot(path=str(artifacts / "1-text-search.png"), full_page=True)

            cards.first.locator("button.caption-this").click()  # caption a result
            expect(cards.first.locator(".generated")).to_have_text("model: a purple picture")

            page.set_input_files("#file", str(upload))  # search by an uploaded picture, then caption it
            page.click("#search-image")
            expect(cards.first).to_contain_text("#1 blue-0.png")
            page.click("#caption-upload")
            expect(page.locator("#upload-caption")).to_have_text("model: a blue picture")
            page.screenshot(path=str(artifacts / "2-upload-and-caption.png"), full_page=True)

            page.set_input_files("#file", str(not_an_image))  # bad input: a message, and the page goes on
            page.click("#caption-upload")
            expect(page.locator("#status")).to_contain_text("file: expected an image file")
            expect(page.locator("#status")).to_have_class("error")
            page.fill("#query", "green")
            page.click("#search")
            expect(cards.first).to_contain_text("#1 green-0.png")
            page.screenshot(path=str(artifacts / "3-after-bad-upload.png"), full_page=True)
            # nothing of the boxes for a model that cannot locate: no frame, no request for them
            assert page.locator(".frame, .box, .where").count() == 0
            assert not [u for u in requested if "/locate" in u], requested
        finally:
            browser.close()
    assert sorted(p.name for p in artifacts.glob("*.png")) == ["1-text-search.png", "2-upload-and-caption.png",
                                                                "3-after-bad-upload.png"]


def test_a_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        _need_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="is not installed"):
        _need_chromium()
