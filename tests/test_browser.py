"""A real browser (Debian's headless Chromium driven by Playwright) uploads a real X-ray to the real app."""
import shutil
from pathlib import Path

import pytest

from .test_app import predictor, server  # noqa: F401  (module-scoped fixtures: the bundled model, the live server)

CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (scripts/install-chromium.sh)")
def test_browser_upload_shows_probabilities_and_overlay(server, good_images, tmp_path, real_data):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    upload = Path(shutil.copy(good_images[0], tmp_path / "wrist.jpg"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                           "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server, wait_until="domcontentloaded")
            expect(page.get_by_text("not a medical device", exact=False).first).to_be_visible(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(upload))
            page.get_by_role("button", name="Analyse").click()
            label = page.locator(".output-class, [data-testid='label-output-value']").first
            expect(label).to_be_visible(timeout=60_000)
            body = page.locator("body")
            expect(body).to_contain_text("not fractured", timeout=60_000)
            expect(body).to_contain_text("P(fractured)")
            overlay = page.locator("img[src*='.png']")
            expect(overlay.first).to_be_visible(timeout=30_000)
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert upload.exists()  # the browser's file on disk is untouched
