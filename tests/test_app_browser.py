"""End to end in a real browser: `python app.py` served on localhost, driven by Playwright + Chromium.

Uses Debian's chromium (never a downloaded browser) and the real YOLO and EfficientNet-Lite0 weights
from ../shared, so the detector draws real boxes on the example photo. Saves a screenshot to
artifacts/app-e2e.png.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from bad_inputs import bad_input_corpus
from conftest import REPO, shared_path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EXAMPLE = REPO / "examples" / "coffee.jpg"  # a cup on a table, a spoon in the cup's box
ARTIFACTS = REPO / "artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_dinov2, shapes_clip):
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium (apt-get install chromium; scripts/setup.sh --dev does it)")
    yolo = shared_path("weights", "yolov8n_int8.tflite")
    effnet = shared_path("weights", "efficientnet_lite0.in1k")
    work = tmp_path_factory.mktemp("browser")
    from lens.samples import write_sample_gallery

    gallery = write_sample_gallery(work / "samples")
    port = _free_port()
    log = open(work / "app.log", "w")
    server = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--gallery", str(gallery), "--index-dir", str(work / "idx"),
         "--methods", f"hf:{effnet},vit,clip", "--model", f"vit={tiny_dinov2}", "--model", f"clip={shapes_clip}",
         "--detector-weights", str(yolo), "--host", "127.0.0.1", "--port", str(port)],
        cwd=work, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert server.poll() is None, (work / "app.log").read_text()
            assert time.time() < deadline, "the app did not start in 180 s"
            time.sleep(0.5)
    yield url, effnet
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _image_point(page, selector: str, x: float, y: float, size: tuple[int, int]) -> tuple[float, float]:
    """Screen coordinates of pixel (x, y) of an image shown with object-fit: contain (scrolled into view)."""
    page.locator(selector).scroll_into_view_if_needed()
    rect = page.locator(selector).bounding_box()
    scale = min(rect["width"] / size[0], rect["height"] / size[1])
    left = rect["x"] + (rect["width"] - size[0] * scale) / 2
    top = rect["y"] + (rect["height"] - size[1] * scale) / 2
    return left + x * scale, top + y * scale


def _ready(url: str):
    """A client of the app at ``url`` once every method's index is ready."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    deadline = time.time() + 240
    while {m["status"] for m in client.predict(api_name="/methods")} != {"ready"}:
        assert time.time() < deadline, client.predict(api_name="/methods")
        time.sleep(1)
    return client


def test_click_a_box_switch_method_and_see_results(app_url, tmp_path):
    from gradio_client import handle_file
    from playwright.sync_api import expect, sync_playwright

    url, _ = app_url
    client = _ready(url)
    detected = client.predict(handle_file(str(EXAMPLE)), "", 0.25, api_name="/detect")
    labels = [b["label"] for b in detected["boxes"]]
    assert {"cup", "spoon", "dining table"} <= set(labels), detected
    assert labels[detected["main_subject"]] == "cup"
    spoon = detected["boxes"][labels.index("spoon")]["box"]
    table = detected["boxes"][labels.index("dining table")]["box"]
    size = tuple(detected["size"])
    corpus = tmp_path / "bad"
    bad_input_corpus(corpus)

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.locator("#lens-upload input[type=file]").set_input_files(str(EXAMPLE))
        view = "#lens-view img"
        expect(page.locator(view)).to_be_visible(timeout=60_000)
        expect(page.locator("#lens-results img").first).to_be_visible(timeout=60_000)
        checked, info = page.locator("#lens-subject input:checked"), page.locator("#lens-info")
        expect(checked).to_have_value(re.compile(r"^\d+ · cup"), timeout=30_000)  # the main subject
        expect(info).to_contain_text("results for cup", timeout=60_000)

        # the spoon lies inside the cup's box too: a click on it picks the smallest box, the spoon
        page.mouse.click(*_image_point(page, view, (spoon[0] + spoon[2]) / 2, (spoon[1] + spoon[3]) / 2, size))
        expect(checked).to_have_value(re.compile(r"^\d+ · spoon"), timeout=30_000)
        expect(info).to_contain_text("results for spoon", timeout=60_000)  # its search is done
        # a click in the table's corner, outside cup and spoon, picks the table
        page.mouse.click(*_image_point(page, view, table[0] + 8, table[3] - 8, size))
        expect(checked).to_have_value(re.compile(r"^\d+ · dining table"), timeout=30_000)
        # the combined search is the default; with no local index its results are all "visually similar"
        expect(info).to_contain_text("auto: 8 results for dining table", timeout=60_000)
        expect(page.locator("#lens-results img")).to_have_count(8, timeout=30_000)

        # switch the method: the results come back from the other index
        page.locator("#lens-method input").click()
        page.get_by_role("option", name="vit", exact=True).click()
        expect(info).to_contain_text("vit: 8 results for dining table", timeout=60_000)
        expect(page.locator("#lens-results img")).to_have_count(8, timeout=30_000)

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app-e2e.png"), full_page=True)

        # bad uploads: a readable message, the previous photo's results are cleared, the app goes on
        upload = page.locator("#lens-upload input[type=file]")
        for name, message in [("text.jpg", "'text.jpg' is not an image lens can read"),
                              ("bomb.png", "'bomb.png' is refused as a possible decompression bomb")]:
            upload.set_input_files(str(corpus / name))
            toast = page.locator(".toast-body").filter(has_text=message)
            expect(toast.first).to_be_visible(timeout=60_000)
            expect(page.locator("#lens-results img")).to_have_count(0, timeout=30_000)
            assert " ".join(toast.all_inner_texts()).count(message) == 1  # one toast per event, not one per change
            expect(page.locator("#lens-results img")).to_have_count(0, timeout=30_000)
            expect(info).to_contain_text("Upload a photo", timeout=30_000)
        upload.set_input_files(str(EXAMPLE))
        expect(info).to_contain_text("vit: 8 results for cup", timeout=60_000)

        # words: typed into "Add to your search" with no photo (words alone), then with one (photo + words)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        info = page.locator("#lens-info")
        page.locator("#lens-method input").click()
        page.get_by_role("option", name="clip", exact=True).click()
        words = page.locator("#lens-text textarea")
        words.fill("red")
        words.press("Enter")
        expect(info).to_contain_text("clip: 8 results for “red”", timeout=60_000)
        expect(info).to_contain_text("far lower scale", timeout=30_000)  # what a text score means
        expect(page.locator("#lens-results img")).to_have_count(8, timeout=30_000)
        page.locator("#lens-upload input[type=file]").set_input_files(str(EXAMPLE))
        expect(info).to_contain_text("clip: 8 results for cup + “red”", timeout=60_000)
        expect(page.locator("#lens-results img")).to_have_count(8, timeout=30_000)
        browser.close()


def _no_horizontal_overflow(page) -> None:
    width, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner, f"the page is {width} px wide in a {inner} px window"


def _drag(page, start: tuple[float, float], end: tuple[float, float], touch: bool = False) -> None:
    """Press at ``start``, move to ``end`` in steps and release (screen pixels), as a hand would: with
    the mouse, or with a finger (touch events through the DevTools protocol; Playwright has no touch drag)."""
    path = [(start[0] + (end[0] - start[0]) * step / 8, start[1] + (end[1] - start[1]) * step / 8)
            for step in range(1, 9)]
    if touch:
        cdp = page.context.new_cdp_session(page)
        for kind, points in [("touchStart", [start]), *[("touchMove", [p]) for p in path], ("touchEnd", [])]:
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y} for x, y in points]})
        cdp.detach()
        return
    page.mouse.move(*start)
    page.mouse.down()
    for point in path:
        page.mouse.move(*point)
    page.mouse.up()


def test_any_region_is_searched_a_result_opens_and_every_width_fits(app_url):
    """A click outside every detected box searches the area around it; in *Draw or adjust*, a region
    dragged with the mouse (a finger at 390 px) over what the detector did not find is searched, and
    so is the cup's box resized by its corner handle; a result opens; the search and compare tabs fit
    390, 768 and 1400 px (screenshots: artifacts/app-*-390.png, artifacts/app-*-1400.png)."""
    from gradio_client import handle_file
    from playwright.sync_api import expect, sync_playwright

    url, _ = app_url
    detected = _ready(url).predict(handle_file(str(EXAMPLE)), "", 0.25, api_name="/detect")
    cup = next(b["box"] for b in detected["boxes"] if b["label"] == "cup")
    ARTIFACTS.mkdir(exist_ok=True)
    width, height = 570, 380  # coffee.jpg; the detector's boxes end at x = 536 (dining table, cup, spoon)
    assert tuple(detected["size"]) == (width, height)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        for screen in (1400, 768, 390):
            page = browser.new_page(viewport={"width": screen, "height": 1000}, has_touch=screen == 390)
            page.goto(url)
            page.locator("#lens-upload input[type=file]").set_input_files(str(EXAMPLE))
            view, info = "#lens-view img", page.locator("#lens-info")
            checked = page.locator("#lens-subject input:checked")
            expect(info).to_contain_text("results for cup", timeout=90_000)

            # a click right of every box: the area around the click, said so (not "Whole image")
            page.mouse.click(*_image_point(page, view, 555, 190, (width, height)))
            near = r"\((55\d), (1[89]\d)\)"  # (555, 190) give or take a screen pixel
            expect(checked).to_have_value(re.compile(r"^✎ region around " + near), timeout=30_000)
            expect(page.locator("#lens-hint")).to_contain_text(re.compile("No detected object at " + near))
            expect(info).to_contain_text(re.compile("results for region around " + near), timeout=60_000)
            expect(page.locator("#lens-results img")).to_have_count(8, timeout=30_000)

            # Draw or adjust: a region dragged over the saucer's right edge, which no box covers alone
            page.locator("#lens-tool").get_by_text("Draw or adjust").click()
            editor = "#lens-annotate canvas"
            expect(page.locator(editor)).to_be_visible(timeout=30_000)
            expect(page.locator(view)).to_be_hidden()
            expect(page.locator("#lens-hint")).to_contain_text("press, drag and release", timeout=30_000)
            mode = page.locator("#lens-annotate").get_by_role("button", name="Create box")
            expect(mode).to_have_class(re.compile(r"\bselected\b"), timeout=30_000)  # it opens in Draw mode
            # (dragged from its top-right corner down and left, by a finger on a phone; its corners stay
            # clear of the cup's handles)
            _drag(page, _image_point(page, editor, 560, 30, (width, height)),
                  _image_point(page, editor, 440, 250, (width, height)), touch=screen == 390)
            corners = r"4[34]\d, [23]\d, 5[56]\d, (24|25)\d"  # 440, 30, 560, 250 give or take a screen pixel
            expect(checked).to_have_value(re.compile(r"^✎ your region: " + corners), timeout=30_000)
            expect(info).to_contain_text(re.compile(rf"results for your region \({corners}\)"), timeout=60_000)
            expect(page.locator("#lens-results img")).to_have_count(8, timeout=30_000)
            if screen == 390:
                page.screenshot(path=str(ARTIFACTS / "app-drawn-390.png"), full_page=True)

            # the cup's box resized by its bottom-right handle, 30 px right and 20 px down: that is searched
            move = page.locator("#lens-annotate").get_by_role("button", name="Drag boxes")
            move.click()
            expect(move).to_have_class(re.compile(r"\bselected\b"))
            _drag(page, _image_point(page, editor, cup[2], cup[3], (width, height)),
                  _image_point(page, editor, cup[2] + 30, cup[3] + 20, (width, height)))
            resized = [round(v) for v in (cup[0], cup[1], cup[2] + 30, cup[3] + 20)]
            near = ", ".join(rf"({v - 2}|{v - 1}|{v}|{v + 1}|{v + 2})" for v in resized)  # a screen pixel or two
            expect(checked).to_have_value(re.compile(r"^✎ your region: " + near), timeout=30_000)
            expect(info).to_contain_text(re.compile(rf"results for your region \({near}\)"), timeout=60_000)
            expect(page.locator("#lens-results img")).to_have_count(8, timeout=30_000)
            if screen == 1400:
                page.screenshot(path=str(ARTIFACTS / "app-resized-1400.png"), full_page=True)

            if screen == 1400:  # k: Enter searches; a whole number from 1 to the gallery's size
                k = page.locator("#lens-k input")
                k.fill("3")
                k.press("Enter")
                expect(page.locator("#lens-results img")).to_have_count(3, timeout=60_000)
                k.fill("0.1")
                k.press("Enter")
                expect(page.locator(".toast-body").first).to_contain_text("1", timeout=30_000)
                expect(page.locator("#lens-results img")).to_have_count(3)  # nothing searched
                k.fill("8")
                k.press("Enter")
                expect(page.locator("#lens-results img")).to_have_count(8, timeout=60_000)

            # open a result: the original, its path and a download
            page.locator("#lens-results .thumbnail-item").first.click()
            opened = page.locator("#lens-opened-note")
            expect(opened).to_contain_text("#1", timeout=30_000)
            assert page.locator("#lens-opened-image img").get_attribute("src")
            expect(page.locator("#lens-download")).to_be_visible()
            _no_horizontal_overflow(page)
            page.screenshot(path=str(ARTIFACTS / f"app-search-{screen}.png"), full_page=True)

            page.get_by_role("tab", name="Compare methods").click()
            page.locator("#lens-compare-button").click()
            for name in ("efficientnet_lite0.in1k", "vit", "clip"):  # one row per method, short names
                expect(page.locator("#lens-compare")).to_contain_text(name, timeout=60_000)
            expect(page.locator("#lens-compare-tab .lens-grid img").first).to_be_visible(timeout=30_000)
            _no_horizontal_overflow(page)
            page.screenshot(path=str(ARTIFACTS / f"app-compare-{screen}.png"), full_page=True)
            page.close()
        browser.close()
