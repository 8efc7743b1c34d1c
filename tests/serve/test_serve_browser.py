"""The page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, through selenium):
a person uploads a photo, types names, submits and sees the overlay and one mask per name.

Run with ``make test-browser`` (installs the browser and the driver) or ``pytest -m browser``; skipped
where either is missing. Everything stays on this machine: the page is served on 127.0.0.1 and the
browser's own background traffic (updates, sync, metrics) is switched off.
"""

from __future__ import annotations

import base64
import shutil

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread")]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (make test-browser)")
CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("Debian's chromium and chromium-driver are not installed (make test-browser)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as seen  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

QUIET_BROWSER = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-domain-reliability", "--metrics-recording-only",
                 "--disable-client-side-phishing-detection", "--no-default-browser-check", "--window-size=1200,1000")


@pytest.fixture(scope="module")
def browser(monkeypatch_module):
    monkeypatch_module.setenv("SE_AVOID_STATS", "true")  # selenium's own driver lookup stays off and quiet
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in QUIET_BROWSER:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _open(browser, url: str) -> None:
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "run").text not in ("", "…"))


def test_a_person_uploads_a_photo_types_names_and_sees_the_masks(browser, served, learned, coco128, tmp_path):
    photo = sorted((coco128 / "images").glob("*.jpg"))[0]
    _open(browser, served)
    caveat = browser.find_element(By.ID, "caveat")
    assert caveat.is_displayed() and "random-init" in caveat.text
    assert browser.find_element(By.ID, "run").text == learned.name
    assert browser.find_element(By.ID, "names").get_attribute("value")  # examples filled in
    browser.find_element(By.ID, "photo").send_keys(str(photo))
    names = browser.find_element(By.ID, "names")
    names.clear()
    names.send_keys("person, dog, zebra")
    browser.find_element(By.CSS_SELECTOR, "input[name=mode][value=resize]").click()
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 300).until(seen.visibility_of_element_located((By.ID, "result")))
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("const i = document.getElementById('overlay'); return i.complete && i.naturalWidth"))
    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#masks .mask div")]
    assert [c.split(" — ")[0] for c in captions] == ["person", "dog", "zebra"]
    assert all(c.endswith("% of pixels") for c in captions)
    assert not browser.find_element(By.ID, "error").is_displayed()
    overlay = browser.find_element(By.ID, "overlay").get_attribute("src")
    assert base64.b64decode(overlay.split(",", 1)[1]).startswith(b"\x89PNG")
    assert browser.find_element(By.ID, "dl-labels").get_attribute("href").startswith("data:image/png;base64,")
    assert browser.find_element(By.ID, "dl-json").get_attribute("href").startswith("blob:")
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_a_file_that_is_no_photo_gets_a_message_on_the_page(browser, served, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("no pixels here\n")
    _open(browser, served)
    browser.find_element(By.ID, "photo").send_keys(str(notes))
    browser.find_element(By.ID, "go").click()
    error = WebDriverWait(browser, 60).until(seen.visibility_of_element_located((By.ID, "error")))
    assert error.text == "notes.txt is not an image PIL can read (JPEG, PNG, WebP, ...)"
    assert not browser.find_element(By.ID, "go").get_attribute("disabled")


def test_a_photo_over_the_limit_is_refused_before_it_is_sent(browser, served, tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (21 * 1024 * 1024))
    _open(browser, served)
    browser.find_element(By.ID, "photo").send_keys(str(big))
    browser.find_element(By.ID, "go").click()
    error = WebDriverWait(browser, 30).until(seen.visibility_of_element_located((By.ID, "error")))
    assert error.text == "big.jpg is 21.0 MB; this server takes photos up to 20 MB."
