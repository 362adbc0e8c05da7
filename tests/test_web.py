"""The web demo end to end in a real headless browser: Debian's chromium driven by selenium, against a server that
`vilseg web` starts on 127.0.0.1."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _browser():
    pytest.importorskip("gradio")
    pytest.importorskip("selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        message = "Debian's chromium and chromium-driver are not installed (.ci/setup.sh installs them)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_upload_an_image_type_classes_and_see_the_overlay(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = _browser()
    model = os.environ.get("VILSEG_WEB_MODEL")  # a trained model for the README's screenshot; else a tiny one
    if model is None:
        import torch

        from vilseg import create_model

        torch.manual_seed(0)
        model = tmp_path / "model"
        create_model("vilseg-tiny").save_pretrained(model)
    image = tmp_path / "scene.png"
    from vilseg.data.synthetic import SyntheticWorld

    Image.fromarray(SyntheticWorld("eval", image_size=256, seed=1).scene(3).image).save(image)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "vilseg.cli", "web", "--model", str(model), "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1100"):
        options.add_argument(flag)
    browser = None
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                assert time.time() < deadline, "the server did not come up"
                time.sleep(1)
        browser = webdriver.Chrome(service=Service(chromedriver), options=options)
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
        upload.send_keys(str(image))
        classes = browser.find_element(By.CSS_SELECTOR, "#classes textarea")
        classes.clear()
        classes.send_keys("red circle, green square, blue triangle, yellow cross")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image img")))
        browser.find_element(By.CSS_SELECTOR, "#segment").click()
        overlay = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#overlay img")))
        assert overlay.get_attribute("src")
        # the segments table fills in: a label and a score in its rows
        def cells(b):  # textContent: Gradio's virtual table keeps rows out of selenium's "visible text"
            return [td.get_attribute("textContent").strip() for td in b.find_elements(By.CSS_SELECTOR, "#segments td")]

        wait.until(lambda b: any(cells(b)))
        cells = cells(browser)
        assert any(c in cells for c in ("background", "red circle", "green square", "blue triangle", "yellow cross"))
        shot = Path(os.environ.get("VILSEG_WEB_SCREENSHOT", tmp_path / "web.png"))
        browser.save_screenshot(str(shot))
        assert np.asarray(Image.open(shot)).std() > 10  # a rendered page, not a blank one
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)


def test_concurrent_requests_each_get_the_answer_they_would_get_alone(tmp_path):
    """8 clients at once, each with its own classes and threshold, against one shared Segmenter: every response
    equals the same request made alone (the per-request settings travel with the call)."""
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from vilseg import create_model
    from vilseg.data.synthetic import SyntheticWorld
    from vilseg.inference import ReadOut, Segmenter
    from vilseg.web import launch

    torch.manual_seed(0)
    model = create_model("vilseg-tiny").eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    # a 256 px input (32 x 32 patches): each request takes long enough for the 8 to overlap inside the segmenter
    ReadOut("clusters", "pool", 0.3, input_size=256).save(folder)
    image = tmp_path / "scene.png"
    Image.fromarray(SyntheticWorld("eval", image_size=128, seed=1).scene(3).image).save(image)
    port = _free_port()
    app = launch(Segmenter.from_pretrained(folder), folder, port=port, block=False)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        vocabularies = ["red circle, blue square", "green triangle|green wedge, yellow cross",
                        "red circle, green square, blue triangle", "yellow cross", "blue circle, red square",
                        "green square|emerald square", "red triangle, blue cross, yellow circle", "blue square"]
        requests = [(vocabularies[i], round(-0.1 + 0.1 * i, 2)) for i in range(8)]

        def ask(request):
            classes, threshold = request
            _, table = client.predict(gradio_client.handle_file(str(image)), classes, "(the classes above)",
                                      threshold, api_name="/segment")
            return [(row[1], row[2]) for row in table["data"]]  # label and score of every segment

        alone = [ask(r) for r in requests]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, requests * 3))  # 24 requests, 8 at a time
        assert together == alone * 3
        assert len({tuple(a) for a in alone}) > 4  # the requests really differ
    finally:
        app.close()
