"""A small request beside a bulky one, against a real `fermam serve` (issue 23).

A one-face photo sent while a request of four 6300x6300 PNGs is in flight was answered after
5.0 s (2.5x the queue-wait bound) in one run and refused 429 at once in another: the bulky
request's decodes and detections were queued first come first served, and admission counted its
images as ordinary photos. Now the decode pool and the detect queue take requests in turns and
admission counts pixels, so the photo waits for at most one running job of each stage.

The bound is sized from this machine's speed, measured here, because one 6300x6300 PNG's
decode and detection cannot be split and take 1-5 s each depending on the CPU and its load:
`--max-queue-wait-ms` is 1.25 times one image's decode plus detection, plus 1 s. Now the photo
waits for at most one running decode (and admission estimates one image's detection ahead of it),
well within that; first come first served, it waited for two rounds of decoding and two of
detection (four images on two threads), 0.75 x (decode + detection) beyond the bound (2.5 s on
an idle 2-core AMD EPYC, more under load).
"""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
from http_bodies import PHOTOS, photo
from PIL import Image
from server_process import start_server

from service.engine.decode import decode_image
from service.engine.detect_stage import detect_bounded
from service.engine.faces import create_face_backend

BIG_SIDE = 6300
BIG_IMAGES = 4
SMALL = "aflw-test.jpg"  # one face, 450x450
URL = "/v1/expressions"


def big_png() -> bytes:
    """A real photo upscaled to BIG_SIDE x BIG_SIDE, made here (no dataset image is committed)."""
    image = Image.open(PHOTOS / "group_selfie.jpg").convert("RGB").resize((BIG_SIDE, BIG_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def seconds_for_one_image(data: bytes) -> float:
    """Decode and detection of one image in this process, as the server runs them (the faster of
    two runs: the first also loads the detector)."""
    backend = create_face_backend("dlib", min_face_size=20)
    runs = []
    for _ in range(2):
        started = time.monotonic()
        pixels = decode_image(data, max_bytes=len(data), max_pixels=BIG_SIDE * BIG_SIDE).pixels
        detect_bounded(backend, [pixels], [20], 1280, 0.15)
        runs.append(time.monotonic() - started)
    return min(runs)


def post(client: httpx.Client, base: str, *files: tuple[str, bytes]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = client.post(f"{base}{URL}", files=[("files", (name, data)) for name, data in files])
    return response, time.monotonic() - started


@pytest.mark.slow
def test_a_small_request_beside_a_bulky_one_is_answered_within_the_queue_wait_bound(weights_path) -> None:
    big = big_png()
    one_s = seconds_for_one_image(big)
    max_wait_ms = round(1000 * (1.25 * one_s + 1.0))
    base, process = start_server(
        weights_path,
        *("--max-queue-wait-ms", str(max_wait_ms), "--decode-threads", "2", "--detect-threads", "2"),
        *("--max-image-bytes", str(len(big) + 1), "--max-image-pixels", str(BIG_SIDE * BIG_SIDE)),
        # The bulky request itself may take long on a loaded machine; only the small one is timed.
        *("--default-timeout-ms", "120000"),
    )  # fmt: skip
    try:
        small = photo(SMALL)
        with httpx.Client(timeout=180) as client:
            # Warm up: both detect threads' detectors, and the measured rates admission uses.
            assert post(client, base, ("a.jpg", small), ("b.jpg", small))[0].status_code == 200
            for _ in range(4):
                assert post(client, base, ("a.jpg", small))[0].status_code == 200

            bulky: dict[str, object] = {}

            def send_bulky() -> None:
                with httpx.Client(timeout=180) as own:
                    bulky["response"], bulky["seconds"] = post(
                        own, base, *((f"big{k}.png", big) for k in range(BIG_IMAGES))
                    )

            sender = threading.Thread(target=send_bulky)
            sender.start()
            time.sleep(1.0)  # the bulky request is uploaded and decoding
            assert sender.is_alive(), "the bulky request finished before the small one was sent"
            response, seconds = post(client, base, ("small.jpg", small))
            sender.join(180)
        print(f"small request: {response.status_code} after {seconds:.2f} s; bound {max_wait_ms} ms + 1 s")
        assert response.status_code == 200, response.text
        assert len(response.json()["images"][0]["faces"]) == 1
        assert seconds <= max_wait_ms / 1000 + 1.0, (
            f"answered after {seconds:.2f} s; bound {max_wait_ms} ms + 1 s (one image {one_s:.2f} s); "
            f"server timings {response.json()['timings']}"
        )
        assert bulky["response"].status_code == 200  # type: ignore[union-attr]
    finally:
        process.kill()
        process.wait(10)
