"""report.html in a real browser: Debian's headless Chromium (scripts/install_browser.sh),
driven by Selenium, opens the self-contained page from disk with no network, and every chart
shows as a non-blank image under its title; a screenshot of the page is saved and checked."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from fedpt import report
from tests.test_report import FEDERATION_PNGS, fake_simulation

TITLES = ["Global validation loss", "Each organisation", "Round time", "Bytes per round",
          "Energy per round"]  # fmt: skip


def browser():
    """Headless Chromium, or a skip where it is not installed (CI installs it: there it fails)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium and ChromeDriver (scripts/install_browser.sh)")
        pytest.skip("no chromium/chromedriver: run scripts/install_browser.sh")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,4200",
        "--disable-dev-shm-usage",
        "--proxy-server=127.0.0.1:9",
    ):  # no network either way
        options.add_argument(flag)  # fmt: skip
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def non_blank(png: bytes) -> tuple[float, int]:
    """The share of pixels that are not the background, and how many colours there are."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    total = image.width * image.height
    colours = image.getcolors(maxcolors=total)  # [(count, colour), ...]
    background = max(count for count, _ in colours)
    return (total - background) / total, len(colours)


def test_the_report_opens_in_headless_chromium_and_shows_every_chart(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from selenium.webdriver.common.by import By

    run = tmp_path / "sim"
    fake_simulation(run, web_joules=36_000.0)
    html_path = report.write_report(run)
    assert len(FEDERATION_PNGS) + 1 == len(TITLES)
    driver = browser()
    try:
        driver.get(html_path.as_uri())
        assert driver.title == "federation simulation"
        figures = driver.find_elements(By.TAG_NAME, "figure")
        assert [f.find_element(By.TAG_NAME, "h2").text for f in figures] == TITLES
        for figure in figures:
            image = figure.find_element(By.TAG_NAME, "img")
            width = driver.execute_script(
                "return arguments[0].complete ? arguments[0].naturalWidth : 0", image
            )
            assert width > 300, figure.text  # decoded from its data URI, nothing fetched
            driver.execute_script("arguments[0].scrollIntoView()", image)
            drawn, colours = non_blank(image.screenshot_as_png)
            assert drawn > 0.02 and colours > 10, (figure.text, drawn, colours)
        screenshot = tmp_path / "report.png"
        driver.execute_script("window.scrollTo(0, 0)")
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    drawn, colours = non_blank(screenshot.read_bytes())
    assert drawn > 0.05 and colours > 50
