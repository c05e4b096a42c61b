"""The served page in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium):
upload a photo, read the label and probability it shows, and check them against `predict`.

TRANSFERLAB_SCREENSHOT=FILE keeps the page's screenshot there (docs/serve.png is one, see docs/deploy.md), and
TRANSFERLAB_SERVE=RUN_DIR serves that run instead of the tiny test one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from transferlab import predictions, serve

from .conftest import SHARED

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1100,760"]


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip("no Chromium here: install Debian's chromium and chromium-driver (.ci/run does, as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(DRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_shows_the_label_and_probability_that_predict_gives(browser, deployed, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    source = Path(os.environ.get("TRANSFERLAB_SERVE", deployed.path))
    photos = sorted((SHARED / "validation" / "cats").glob("*.jpg")) or sorted(Path(deployed.config.data).rglob("*.jpg"))
    photo = tmp_path / "my cat.jpg"
    shutil.copyfile(photos[0], photo)
    (expected,) = predictions.load(source).predict([photo])
    with serve.background(source) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#card dl"))
        browser.find_element(By.ID, "picker").send_keys(str(photo))
        label = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".result .label"))[0]
        probability = browser.find_element(By.CSS_SELECTOR, ".result .probability")
        assert (label.text, probability.text) == (expected["label"], f"{expected['probability']:.4f}")
        assert browser.find_element(By.CSS_SELECTOR, ".result .name").text == "my cat.jpg"
        wait.until(lambda b: b.execute_script(
            "const i = document.querySelector('img[alt=\"Grad-CAM\"]'); return i && i.complete && i.naturalWidth > 0"))
        assert "mobilenetv2_100" in browser.find_element(By.ID, "card").text or "TRANSFERLAB_SERVE" in os.environ
        screenshot = Path(os.environ.get("TRANSFERLAB_SCREENSHOT", tmp_path / "page.png"))
        assert browser.save_screenshot(str(screenshot))
