"""``bbox-sft app`` served for real: driven in headless Chromium and called through gradio_client.

Both talk to the app as a separate process on a free port, as a user's browser or a Space client
would; what the page shows is compared with ``bbox-sft predict`` on the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from bbox_sft.data.synthetic import write_example_images

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver (`make test` does this where apt-get exists)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good image, a text file, a text file named .jpg, and a sideways PNG (EXIF-free, odd size)."""
    root = tmp_path_factory.mktemp("app_inputs")
    [good, other] = write_example_images(root, n=2, seed=11)
    (root / "notes.txt").write_text("not an image\n")
    (root / "fake.jpg").write_text("a text file with an image's name\n")
    Image.open(other).rotate(90, expand=True).save(root / "tall.png")
    return {"good": good, "text": root / "notes.txt", "fake": root / "fake.jpg", "tall": root / "tall.png"}


@pytest.fixture(scope="module")
def app_url(adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bbox-sft app`` on the tiny adapter, started as a user starts it; stopped after the module."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    examples = tmp_path_factory.mktemp("examples")
    with open(log, "w") as sink:
        server = subprocess.Popen(
            [str(Path(sys.executable).with_name("bbox-sft")), "app", "--adapter", str(adapter_dir),
             "--port", str(port), "--examples_dir", str(examples)],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start:\n{log.read_text()}")
                time.sleep(0.5)
        assert len(list(examples.glob("*.jpg"))) == 4, "example images are written at start"
        import bbox_sft.app

        assert not Path(bbox_sft.app.__file__).with_suffix(".pyi").exists(), "gradio wrote a stub into the package"
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def _predict_cli(adapter_dir: Path, path: Path) -> dict:
    """What ``bbox-sft predict --image`` prints for ``path`` (a separate process, as a user runs it)."""
    done = subprocess.run([str(Path(sys.executable).with_name("bbox-sft")), "predict", "--adapter", str(adapter_dir),
                           "--image", str(path)], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "image": path.name}


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through selenium; fails (never skips) when the browser is missing."""
    if BROWSER is None or DRIVER is None:
        missing = [name for name, path in (("chromium", BROWSER), ("chromedriver", DRIVER)) if path is None]
        pytest.fail(f"{' and '.join(missing)} not found: the browser test needs Debian's chromium. Install: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_in_chromium_shows_what_predict_prints_and_survives_bad_files(
        browser, app_url, adapter_dir, images, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(app_url)

    def text(selector: str) -> str:
        found = browser.find_elements(By.CSS_SELECTOR, selector)
        return found[0].text if found else ""

    def upload(path: Path) -> None:
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-in input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#image-in input[type=file]").send_keys(str(path))

    def shown_json() -> dict:
        return json.loads(text("#answer-json .cm-content"))

    # an empty request: a message, no crash
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#run-one"))
    browser.find_element(By.CSS_SELECTOR, "#run-one").click()
    wait.until(lambda d: "No image" in text("#summary-one"))

    # a good image: the page shows exactly what `bbox-sft predict` prints for that file
    expected = _predict_cli(adapter_dir, images["good"])
    upload(images["good"])
    wait.until(lambda d: images["good"].name in text("#answer-json .cm-content"))
    assert shown_json() == expected
    x0, y0, x1, y1 = expected["box_px"]
    assert f"box ({x0}, {y0}) to ({x1}, {y1}) px" in text("#summary-one")
    assert f"confidence {expected['confidence']:.2f}" in text("#summary-one")
    assert browser.find_element(By.CSS_SELECTOR, "#image-out img").get_attribute("src")
    browser.save_screenshot(str(tmp_path / "good.png"))

    # a text file: the page refuses it with a readable message
    browser.find_element(By.CSS_SELECTOR, "#image-in button[aria-label='Remove Image']").click()
    upload(images["text"])
    wait.until(lambda d: "Invalid file type: notes.txt" in d.find_element(By.TAG_NAME, "body").text)

    # a text file named .jpg gets past the page: the server names the file and the problem
    browser.refresh()
    upload(images["fake"])
    wait.until(lambda d: "fake.jpg is not an image the app can read" in text("#summary-one"))
    assert "UnidentifiedImageError" in text("#summary-one") and text("#answer-json .cm-content") == ""
    browser.save_screenshot(str(tmp_path / "bad.png"))

    # and the next request is served as usual
    browser.find_element(By.CSS_SELECTOR, "#image-in button[aria-label='Remove Image']").click()
    expected = _predict_cli(adapter_dir, images["tall"])
    upload(images["tall"])
    wait.until(lambda d: images["tall"].name in text("#answer-json .cm-content"))
    assert shown_json() == expected
    browser.save_screenshot(str(tmp_path / "after.png"))
    assert (tmp_path / "after.png").stat().st_size > 0


def test_gradio_client_gets_the_adapter_and_base_boxes_like_the_python_api(app_url, adapter_dir, images,
                                                                          tmp_path) -> None:
    from gradio_client import Client, handle_file

    from bbox_sft.predict import BoxPredictor, load_for_inference

    # an image on which the adapter and its base disagree, so that the switch is seen to switch
    candidates = write_example_images(tmp_path, n=8, seed=11)
    base_model, processor = load_for_inference(adapter_dir, load_adapter=False)  # no adapter at all
    base = {r.path: r.to_json() for r in BoxPredictor(base_model, processor).predict_files(candidates)}
    with_adapter = BoxPredictor.from_pretrained(adapter_dir).predict_files(candidates)
    differ = [Path(r.path) for r in with_adapter if r.to_json()["raw"] != base[r.path]["raw"]]
    assert differ, "the test adapter should change at least one of 8 answers"
    adapted = {differ[0]: _predict_cli(adapter_dir, differ[0])}

    client = Client(app_url, verbose=False)
    _, answer, summary = client.predict(handle_file(str(differ[0])), True, api_name="/predict_one")
    answer = json.loads(answer)
    assert {k: v for k, v in answer.items() if k != "base"} == adapted[differ[0]]
    assert answer["base"] == {k: base[str(differ[0])][k] for k in ("box", "box_px", "raw")}
    assert "base model (adapter off, blue)" in summary

    # several files, one of them not an image: a JSON lines file with a line each, in order
    gallery, jsonl, summary = client.predict([handle_file(str(images[k])) for k in ("good", "fake", "tall")], False,
                                             api_name="/predict_many")
    lines = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
    assert [line["image"] for line in lines] == [images[k].name for k in ("good", "fake", "tall")]
    assert lines[0] == _predict_cli(adapter_dir, images["good"])
    assert lines[2] == _predict_cli(adapter_dir, images["tall"])
    assert "UnidentifiedImageError" in lines[1]["error"] and "box" not in lines[1]
    assert len(gallery) == 2 and "2 of 3 image(s)" in summary and "fake.jpg" in summary


def test_app_without_an_adapter_says_how_to_get_one(tmp_path, monkeypatch, caplog) -> None:
    from bbox_sft.cli import main as cli

    monkeypatch.chdir(tmp_path)  # no outputs/demo/lora here
    assert cli(["app"]) == 2
    assert "no adapter at outputs/demo/lora" in caplog.text and "make demo" in caplog.text
