"""The demo page in a real headless Chromium against a real `fermam serve`: a photo upload and a
fake webcam (a .y4m video the test makes from the sample photo) through WS /v1/stream, checked on
screenshots. Needs Debian's `chromium` and the `playwright` package (no browser download):
skipped, and marked `browser`, where either is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import REPO, live_server
from PIL import Image

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

SAMPLE = REPO / "samples" / "grace_hopper.jpg"
PALETTE = ("#00e676", "#ff9100", "#2979ff", "#f50057", "#ffea00", "#00e5ff", "#d500f9", "#76ff03")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
CAMERA = (640, 480)


def write_y4m(path: Path, photo: Path, frames: int = 12) -> None:
    """A 4:2:0 .y4m clip: the photo fitted into 640x480, drifting right a pixel or two a frame."""
    width, height = CAMERA
    with Image.open(photo) as im:
        face = im.convert("RGB")
    face = face.resize((round(face.width * height / face.height), height))
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F10:1 Ip A1:1 C420jpeg\n".encode())
        for index in range(frames):
            canvas = Image.new("RGB", CAMERA, (90, 90, 90))
            canvas.paste(face, (100 + 2 * index, 0))
            y, cb, cr = canvas.convert("YCbCr").split()
            out.write(b"FRAME\n" + y.tobytes())
            for plane in (cb, cr):
                out.write(plane.resize((width // 2, height // 2)).tobytes())


def hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])


def points_share(shot: Path, image_width: int, points: list[list[float]], colour: str) -> float:
    """Share of `points` (image pixels) that show `colour` within 2 screen pixels in the screenshot."""
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    scale = pixels.shape[1] / image_width
    near = []
    for x, y in points:
        col, row = round(x * scale), round(y * scale)
        patch = pixels[row - 2 : row + 3, col - 2 : col + 3].reshape(-1, 3)
        near.append(np.abs(patch - hex_rgb(colour)).sum(axis=1).min() < 60)
    return float(np.mean(near))


def box_edge_share(shot: Path, image_width: int, box: dict, colour: str) -> float:
    """Share of the left edge of `box` (image pixels) that shows `colour` in the screenshot."""
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    scale = pixels.shape[1] / image_width  # the screenshot is of the canvas element alone
    x = round((box["x"] + 1) * scale)
    rows = range(
        round((box["y"] + 0.2 * box["height"]) * scale), round((box["y"] + 0.8 * box["height"]) * scale)
    )
    near = [np.abs(pixels[r, x - 2 : x + 3] - hex_rgb(colour)).sum(axis=1).min() < 60 for r in rows]
    return float(np.mean(near))


@pytest.fixture(scope="module")
def server(weights_path):
    with live_server(weights_path, "--stream-max-fps", "30") as base:
        yield base


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as driver:
        yield driver


def open_page(browser, base: str, requests: list[str], viewport: tuple[int, int] = (1000, 1200)):
    width, height = viewport
    context = browser.new_context(viewport={"width": width, "height": height}, permissions=["camera"])
    page = context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.goto(base + "/")
    page.wait_for_function("window.fermamDemo && window.fermamDemo.classes.length === 8")
    return page


def assert_local(requests: list[str], base: str) -> None:
    outside = [url for url in requests if not url.startswith((base, "ws://127.0.0.1", "data:", "blob:"))]
    assert requests and not outside, outside


def upload(page, photo: Path = SAMPLE) -> dict:
    """Pick `photo` in the upload input and wait for the page's answer to it."""
    page.evaluate("window.fermamDemo.photoResult = null")
    page.set_input_files("#photo", str(photo))
    page.wait_for_function("window.fermamDemo.photoResult !== null || window.fermamDemo.errors.length > 0")
    assert page.evaluate("window.fermamDemo.errors") == []
    return page.evaluate("window.fermamDemo.photoResult")


def expression_posts(requests: list[str]) -> int:
    return sum(url.endswith("/v1/expressions") for url in requests)


def test_uploaded_photo_is_drawn_with_its_box_and_bars(server, playwright, tmp_path) -> None:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    try:
        requests: list[str] = []
        page = open_page(browser, server, requests)
        page.set_input_files("#photo", str(SAMPLE))
        page.wait_for_function(
            "window.fermamDemo.photoResult !== null || window.fermamDemo.errors.length > 0"
        )
        assert page.evaluate("window.fermamDemo.errors") == []
        result = page.evaluate("window.fermamDemo.photoResult")
        (face,) = result["images"][0]["faces"]
        assert "1 face(s)" in page.inner_text("#status")
        shot = tmp_path / "photo.png"
        page.locator("#view").screenshot(path=str(shot))
        assert box_edge_share(shot, result["images"][0]["width"], face["box"], PALETTE[0]) > 0.9
        assert_local(requests, server)
    finally:
        browser.close()


def test_fake_webcam_streams_frames_and_keeps_one_track(server, playwright, tmp_path) -> None:
    clip = tmp_path / "camera.y4m"
    write_y4m(clip, SAMPLE)
    flags = [*FLAGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
             f"--use-file-for-fake-video-capture={clip}"]  # fmt: skip
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
    try:
        requests: list[str] = []
        page = open_page(browser, server, requests)
        page.click("#camera")
        page.wait_for_function(
            "window.fermamDemo.results >= 4 || window.fermamDemo.errors.length > 0", timeout=120_000
        )
        assert page.evaluate("window.fermamDemo.errors") == []
        page.click("#camera")  # stop, so the canvas keeps the last drawn frame
        last = page.evaluate("window.fermamDemo.lastResult")
        tracks = page.evaluate("[...window.fermamDemo.tracksSeen]")
        assert (last["width"], last["height"]) == CAMERA
        (face,) = last["faces"]
        assert tracks == [face["track_id"]]  # the same person kept one id across the frames
        assert face["smoothed"]["expression"] in page.evaluate("window.fermamDemo.classes")
        assert set(face["pose"]) == {"yaw", "pitch", "roll"} and face["quality"]["size"] > 100
        assert f"#{face['track_id']}" in page.inner_text("#status")
        shot = tmp_path / "camera.png"
        page.locator("#view").screenshot(path=str(shot))
        colour = PALETTE[face["track_id"] % len(PALETTE)]
        assert box_edge_share(shot, CAMERA[0], face["box"], colour) > 0.9
        assert_local(requests, server)
    finally:
        browser.close()


def test_swagger_ui_renders_the_schema_with_no_request_leaving_the_server(server, playwright) -> None:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    try:
        requests: list[str] = []
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(server + "/docs")
        page.wait_for_selector('[data-path="/v1/expressions"]', timeout=60_000)
        assert "fermam-service" in page.inner_text(".swagger-ui .info")
        assert_local(requests, server)
    finally:
        browser.close()


def test_ticking_landmarks_after_an_upload_redraws_the_photo_with_them(server, playwright, tmp_path) -> None:
    # Where the landmarks are, asked of the server directly: the page may not have asked for them.
    files = [("files", (SAMPLE.name, SAMPLE.read_bytes(), "image/jpeg"))]
    truth = httpx.post(server + "/v1/expressions", files=files, timeout=120).json()["images"][0]
    (face,) = truth["faces"]
    inner = face["landmarks"][27:]  # nose, eyes and mouth: away from the box's edges and the bars
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    try:
        requests: list[str] = []
        page = open_page(browser, server, requests)
        assert not page.is_checked("#landmarks")
        upload(page)
        shares = []
        for ticked in (False, True, False):
            page.set_checked("#landmarks", ticked)
            shot = tmp_path / f"landmarks-{len(shares)}.png"
            page.locator("#view").screenshot(path=str(shot))
            shares.append(points_share(shot, truth["width"], inner, PALETTE[0]))
        assert shares[0] < 0.2 and shares[1] > 0.9 and shares[2] < 0.2, shares
        assert expression_posts(requests) == 1  # redrawn from the last result, not asked again
    finally:
        browser.close()


def test_picking_the_same_photo_again_sends_it_again(server, playwright) -> None:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    try:
        requests: list[str] = []
        page = open_page(browser, server, requests)
        for picked in (1, 2):
            upload(page)
            assert expression_posts(requests) == picked
            # What lets the browser's file dialog fire `change` for the same file again.
            assert page.evaluate("document.getElementById('photo').value") == ""
    finally:
        browser.close()


def test_a_portrait_photo_is_drawn_whole_within_the_window(server, playwright) -> None:
    window = (1440, 900)
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
    try:
        page = open_page(browser, server, [], viewport=window)
        image = upload(page)["images"][0]
        assert image["height"] > image["width"]  # the sample is a portrait
        shown = page.locator("#view").evaluate(
            "(view) => { const r = view.getBoundingClientRect();"
            " return {top: r.top, bottom: r.bottom, width: r.width, height: r.height}; }"
        )
        assert shown["bottom"] <= window[1], shown
        assert shown["width"] / shown["height"] == pytest.approx(image["width"] / image["height"], rel=0.01)
        assert shown["height"] >= window[1] - shown["top"] - 40, shown  # as large as the window allows
    finally:
        browser.close()
