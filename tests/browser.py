"""Debian's Chromium, headless, driven by Selenium: the browser the page tests use (scripts/services installs it)."""

from __future__ import annotations

import shutil
from typing import Any

import pytest
from procs import IN_CI


def chromium() -> Any:
    """A headless Chromium (WebDriver); skipped (failed under CI=true) without chromium and chromedriver."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        message = (
            "chromium and chromedriver are needed (Debian: chromium chromium-driver; scripts/services installs them)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: CSP violations show there
    return webdriver.Chrome(service=Service(driver), options=options)
