"""`fermam serve` as a real process on a loopback port: real photos, bad input, SIGTERM drain."""

from __future__ import annotations

import base64
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from http_bodies import GROUP, LARGE, NO_FACE, TEST_MAX_IMAGE_BYTES, photo, png_claiming

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(weights_path):
    """One server process for the module; the last test drains it with SIGTERM."""
    port = free_port()
    command = [
        sys.executable, "-m", "service.cli", "serve",
        "--port", str(port), "--weights", str(weights_path), "--device", "cpu",
        "--max-image-bytes", str(TEST_MAX_IMAGE_BYTES), "--max-image-pixels", "4000000",
        "--drain-timeout-s", "30", "--log-level", "warning",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}: {process.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("server never became ready")
    yield base, process
    if process.poll() is None:
        process.kill()
    process.wait(10)


def test_real_photos_over_multipart(server) -> None:
    base, _ = server
    files = [
        ("files", ("g.jpg", photo(GROUP), "image/jpeg")),
        ("files", ("n.jpg", photo(NO_FACE), "image/jpeg")),
    ]
    response = httpx.post(f"{base}/v1/expressions", files=files, timeout=120)
    assert response.status_code == 200, response.text
    group, grass = response.json()["images"]
    assert len(group["faces"]) == 3 and grass["faces"] == []
    for face in group["faces"]:
        assert len(face["landmarks"]) == 68
        assert math.isclose(sum(face["scores"].values()), 1.0, abs_tol=1e-5)
    assert float(response.headers["x-inference-time"]) > 0


def test_real_photo_as_base64_json(server) -> None:
    base, _ = server
    body = {"images": [base64.b64encode(photo(GROUP)).decode()], "max_faces": 2, "top_k": 1}
    response = httpx.post(f"{base}/v1/expressions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    assert len(image["faces"]) == 2 and image["faces_over_max"] == 1


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 422),
        ({"files": [("files", ("a.txt", b"just text", "text/plain"))]}, 415),
        ({"files": [("files", ("t.jpg", photo(GROUP)[:3000], "image/jpeg"))]}, 415),
        ({"files": [("files", ("big.jpg", photo(LARGE), "image/jpeg"))]}, 413),
        ({"files": [("files", ("bomb.png", png_claiming(50_000, 50_000), "image/png"))]}, 413),
        ({"json": {"images": ["aGk="], "unknown": True}}, 422),
    ],
    ids=["empty body", "not an image", "truncated jpeg", "oversized upload", "pixel bomb", "unknown field"],
)
def test_bad_input_gets_4xx_and_the_server_keeps_serving(server, kwargs, status) -> None:
    base, process = server
    response = httpx.post(f"{base}/v1/expressions", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"code", "message"}
    assert process.poll() is None
    assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200


def metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.rsplit(" ", 1)[1])


def test_metrics_count_what_happened(server) -> None:
    base, _ = server
    files = [("files", ("t.jpg", photo(GROUP)[:3000], "image/jpeg"))]
    before = httpx.get(f"{base}/metrics", timeout=5).text
    assert httpx.post(f"{base}/v1/expressions", files=files, timeout=60).status_code == 415
    after = httpx.get(f"{base}/metrics", timeout=5).text
    bad = 'fermam_rejections_total{reason="bad_image"}'
    assert metric(after, bad) == metric(before, bad) + 1
    ok = 'fermam_requests_total{route="/v1/expressions",status="415"}'
    assert metric(after, ok) == metric(before, ok) + 1


def test_sigterm_drains_in_flight_work_then_exits(server) -> None:
    base, process = server
    outcome: dict[str, httpx.Response] = {}

    def slow_request() -> None:
        files = [("files", ("g.jpg", photo(GROUP), "image/jpeg"))] * 3  # nine faces: seconds on a CPU
        outcome["response"] = httpx.post(f"{base}/v1/expressions", files=files, timeout=120)

    worker = threading.Thread(target=slow_request)
    worker.start()
    # Signal only once the server holds the request (a fixed sleep is a guess on a loaded machine).
    deadline = time.monotonic() + 60
    while metric(httpx.get(f"{base}/metrics", timeout=5).text, "fermam_requests_in_flight") < 1:
        assert time.monotonic() < deadline and worker.is_alive(), "the request never reached the server"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    if worker.is_alive():
        # Still draining: readiness is off and new work is refused, while the listener stays open.
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 503
        refused = httpx.post(f"{base}/v1/expressions", json={"images": ["aGk="]}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
    worker.join(120)
    assert outcome["response"].status_code == 200
    assert [len(i["faces"]) for i in outcome["response"].json()["images"]] == [3, 3, 3]
    assert process.wait(60) == 0
