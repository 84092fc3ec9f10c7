"""The page at /ui in a real browser (headless Chromium through Selenium), against a running service: it
uploads a slice, draws the overlay, shows the classes' fractions, downloads the mask and the overlay, asks
for the API key when the server has one, shows the API's errors, and sends an image past the limit of one
request as a job whose mask is a download."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import SAMPLES
from seg.inference.predictor import Predictor
from seg.inference.runtime import BUNDLED_MODEL

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs headless Chromium: apt install chromium chromium-driver"
)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from helpers import KEY, mask_of, running_server

SLICE = SAMPLES / "isbi_test_00.png"


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def state(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def downloaded(folder: Path, name: str, timeout: float = 30) -> bytes:
    path = folder / name
    deadline = time.monotonic() + timeout
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.is_file(), f"no {name} in {sorted(os.listdir(folder))}"
    return path.read_bytes()


def pixel(driver, x: int, y: int) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.getElementById('canvas').getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data)",
        x, y,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    with running_server(BUNDLED_MODEL, tmp_path_factory.mktemp("ui"), SEG_DEVICE="cpu") as server:
        yield server


def test_upload_overlay_legend_and_downloads(bundled, browser, tmp_path):
    info = httpx.post(bundled.url + "/info", json={}).json()
    browser.get(bundled.url + "/ui")
    wait(browser, lambda d: d.find_element(By.ID, "tile").get_attribute("value") == str(info["tile_size"]))
    assert browser.find_element(By.ID, "overlap").get_attribute("value") == str(info["overlap"])
    assert not browser.find_element(By.ID, "key-row").is_displayed()  # no API key on this server

    browser.find_element(By.ID, "file").send_keys(str(SLICE))
    wait(browser, lambda d: state(d) in ("done", "error"))
    assert state(browser) == "done", browser.find_element(By.ID, "error").text

    options = {"tile": str(info["tile_size"]), "overlap": str(info["overlap"]), "tta": "none"}
    files = {"image": (SLICE.name, SLICE.read_bytes())}
    expected = httpx.post(bundled.url + "/segment_json", files=files, data={**options, "mask": "none"}, timeout=120).json()
    rows = browser.find_elements(By.CSS_SELECTOR, "#legend tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == info["classes"]
    for row, truth in zip(rows, expected["classes"]):
        shown = float(row.find_element(By.CLASS_NAME, "fraction").text.rstrip(" %"))
        assert abs(shown - 100 * truth["fraction"]) <= 0.1
    assert 0 < expected["classes"][0]["fraction"] < 1  # both classes occur: the check above means something

    browser.find_element(By.ID, "download-mask").click()
    mask_png = httpx.post(bundled.url + "/segment", files=files, data=options, timeout=120).content
    assert downloaded(browser.downloads, "isbi_test_00_mask.png") == mask_png

    # The overlay: a pixel of class 1 is the image's grey at opacity 0 and the class colour at opacity 1.
    mask = mask_of(mask_png)
    y, x = (int(v) for v in np.argwhere(mask == 1)[len(np.argwhere(mask == 1)) // 2])
    grey = int(np.asarray(Image.open(SLICE))[y, x])
    colour = info["palette"][1]
    slider = browser.find_element(By.ID, "opacity")
    for opacity, want in ((0, [grey] * 3), (1, colour)):
        browser.execute_script(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))", slider, opacity
        )
        assert pixel(browser, x, y)[:3] == want
    browser.execute_script("arguments[0].value = 0.5; arguments[0].dispatchEvent(new Event('input'))", slider)
    browser.find_element(By.ID, "download-overlay").click()
    overlay = Image.open(io.BytesIO(downloaded(browser.downloads, "isbi_test_00_overlay.png")))
    assert overlay.size == (512, 512)
    half = np.asarray(overlay.convert("RGB"))[y, x].astype(int)
    assert np.abs(half - (np.array([grey] * 3) + np.array(colour)) / 2).max() <= 2

    shot = tmp_path / "ui.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] > 0


@pytest.fixture(scope="module")
def guarded_small(conv_onnx_factory, tmp_path_factory):
    env = {"SEG_API_KEY": KEY, "SEG_MAX_BYTES": "200000", "SEG_JOB_MAX_BYTES": "1000000", "SEG_DEVICE": "cpu"}
    with running_server(conv_onnx_factory(classes=3), tmp_path_factory.mktemp("ui-key"), **env) as server:
        yield server


def test_api_key_field_errors_and_jobs_shown(guarded_small, conv_onnx_factory, browser, tmp_path):
    browser.get(guarded_small.url + "/ui/")  # the page itself is open
    wait(browser, lambda d: d.find_element(By.ID, "key-row").is_displayed())
    assert browser.find_element(By.ID, "error").text.startswith("401: ")
    browser.find_element(By.ID, "key").send_keys(KEY + "\n")
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait(browser, lambda d: d.find_element(By.ID, "tile").get_attribute("value") != "")

    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(SLICE.read_bytes()[:300])
    browser.find_element(By.ID, "file").send_keys(str(corrupt))
    wait(browser, lambda d: state(d) == "error")
    answer = httpx.post(guarded_small.url + "/segment_json", files={"image": ("broken.png", corrupt.read_bytes())},
                        headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert answer.status_code == 400
    assert browser.find_element(By.ID, "error").text == f"400: {answer.json()['error']}"

    # Past SEG_MAX_BYTES: a job, whose mask is a download; past SEG_JOB_MAX_BYTES too: the job's 413.
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise[:400, :400]).save(big)
    assert 200_000 < big.stat().st_size < 1_000_000
    browser.execute_script("document.getElementById('job-format').value = 'tif'")
    browser.find_element(By.ID, "file").send_keys(str(big))
    wait(browser, lambda d: state(d) in ("done", "error"))
    assert state(browser) == "done", browser.find_element(By.ID, "error").text
    assert "segmented as a job" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "download-job").click()
    mask = tifffile.imread(io.BytesIO(downloaded(browser.downloads, "big_mask.tif")))
    local = Predictor.from_onnx(conv_onnx_factory(classes=3), device="cpu").predict(noise[:400, :400]).mask
    assert np.array_equal(mask, local) and len(np.unique(local)) > 1
    huge = tmp_path / "huge.png"
    Image.fromarray(noise).save(huge)
    browser.find_element(By.ID, "file").send_keys(str(huge))
    wait(browser, lambda d: d.find_element(By.ID, "error").text.startswith("413: "))
    assert "SEG_JOB_MAX_BYTES" in browser.find_element(By.ID, "error").text
