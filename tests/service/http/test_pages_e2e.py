"""What a newcomer meets first, against a real `fermam serve`: the demo page, offline /docs, the
sample photo with pose and quality, a busy port, fast --help."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from live_server import REPO, free_port, live_server

from service.cli import COMMANDS

SAMPLE = REPO / "samples" / "grace_hopper.jpg"
# src/href attributes and url(...) references that leave the server.
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//""", re.I)


@pytest.fixture(scope="module")
def server(weights_path):
    with live_server(weights_path) as base:
        yield base


def test_docs_and_redoc_load_their_assets_from_this_server(server) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(server + page, timeout=10)
        assert html.status_code == 200
        assert not EXTERNAL.search(html.text), EXTERNAL.search(html.text)
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
        assert assets, page
        for asset in assets:
            response = httpx.get(server + asset, timeout=10)
            assert response.status_code == 200 and len(response.content) > 1000, asset
    assert "openapi" in httpx.get(server + "/openapi.json", timeout=10).json()


def test_demo_page_and_its_assets_are_served_and_stay_local(server) -> None:
    page = httpx.get(server + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r"""(?:src|href)=["'](/static/[^"']+)["']""", page.text)
    assert {"/static/demo/demo.js", "/static/demo/demo.css"} <= set(assets)
    for asset in assets:
        body = httpx.get(server + asset, timeout=10)
        assert body.status_code == 200, asset
        assert not EXTERNAL.search(body.text) and "http://" not in body.text and "https://" not in body.text
    assert not EXTERNAL.search(page.text)


def test_the_sample_photo_gets_a_face_with_pose_and_quality(server) -> None:
    files = [("files", (SAMPLE.name, SAMPLE.read_bytes(), "image/jpeg"))]
    response = httpx.post(server + "/v1/expressions", files=files, data={"top_k": "2"}, timeout=120)
    assert response.status_code == 200, response.text
    (face,) = response.json()["images"][0]["faces"]
    assert set(face["pose"]) == {"yaw", "pitch", "roll"} and abs(face["pose"]["yaw"]) < 8
    assert set(face["quality"]) == {"sharpness", "brightness", "size"} and face["quality"]["sharpness"] > 0.6
    assert face["quality"]["size"] == min(face["box"]["width"], face["box"]["height"])


def test_serve_on_a_busy_port_exits_2_before_loading_the_models(weights_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        command = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--port",
            str(port),
            "--weights",
            str(weights_path),
        ]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "in use" in result.stderr
    assert time.monotonic() - started < 5  # loading the models alone takes longer on this machine


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_of_a_command_does_not_import_torch(command) -> None:
    probe = (
        "import sys\nfrom service.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.stderr.strip().endswith("NO-TORCH"), result.stderr
    assert "usage: fermam " + command in result.stdout


def test_with_api_keys_the_pages_stay_open_and_the_api_needs_the_key(weights_path) -> None:
    """The demo page and the docs must load before a user can type a key into them."""
    key = "demo-key-12345"
    with live_server(weights_path, "--api-keys", key) as base:
        for page in ("/", "/docs", "/static/demo/demo.js"):
            assert httpx.get(base + page, timeout=10).status_code == 200, page
        assert httpx.get(base + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(base + "/v1/models", headers={"X-API-Key": key}, timeout=10).status_code == 200


def _serve(*flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "service.cli", "serve", "--device", "cpu", *flags]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_port_answers_while_the_models_load(weights_path) -> None:
    """Kubernetes probes expect /livez 200 and /readyz 503 while starting, not a closed port."""
    port = free_port()
    process = _serve("--port", str(port), "--weights", str(weights_path), "--log-level", "warning")
    seen: list[tuple[int, int]] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            try:
                live = httpx.get(f"http://127.0.0.1:{port}/livez", timeout=2).status_code
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.append((live, ready.status_code))
            if ready.status_code == 200:
                break
            assert ready.json()["error"] == {"code": "not_ready", "message": "not ready: starting"}
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait(10)
    assert seen and seen[-1] == (200, 200), seen
    assert (200, 503) in seen, seen


def test_a_second_signal_exits_at_once_without_a_traceback(weights_path) -> None:
    port = free_port()
    process = _serve(
        "--port", str(port), "--weights", str(weights_path), "--shutdown-grace-s", "20",
        "--drain-timeout-s", "30",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not _ready(port):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)  # draining: the listener stays open for the 20 s grace
        time.sleep(1.0)
        assert process.poll() is None
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=5)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGINT, output
    assert "Traceback" not in output and "CancelledError" not in output, output
    assert "exiting without finishing the drain" in output


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_weights_that_cannot_load_end_the_server_with_status_1(tmp_path) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--device", "cpu", "--port", str(free_port()),
         "--weights", str(broken)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fermam serve: cannot load the models" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_cuda_is_a_settings_error(weights_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--device", "cuda", "--port", str(free_port()),
         "--weights", str(weights_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "invalid settings: --device" in result.stderr and "CUDA is not available" in result.stderr


def test_fermam_without_a_command_exits_2_and_has_a_version() -> None:
    bare = subprocess.run([sys.executable, "-m", "service.cli"], cwd=REPO, capture_output=True, text=True)
    assert bare.returncode == 2 and "usage: fermam" in bare.stderr and "a command is required" in bare.stderr
    version = subprocess.run(
        [sys.executable, "-m", "service.cli", "--version"], cwd=REPO, capture_output=True, text=True
    )
    assert version.returncode == 0 and re.fullmatch(r"fermam-service \d+\.\d+\.\d+\S*\n", version.stdout)
