"""fermam-client stands alone: it imports nothing of the server, installs into a fresh venv with
httpx and websockets only (no torch), talks to a real `fermam serve` from there, and builds a
wheel that carries its `py.typed`."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CLIENT = REPO / "clients" / "python"
PHOTO = REPO / "samples" / "grace_hopper.jpg"  # one face
KEY = "client-install-key-123"
# What the server needs and a chatbot backend must not be made to install.
SERVER_ONLY = ("torch", "numpy", "PIL", "fastapi", "uvicorn", "av", "dlib", "scipy", "service", "model")

sys.path.insert(0, str(REPO / "tests" / "service" / "http"))
from server_process import start_server  # noqa: E402

# Run inside the fresh venv: one photo through Client.expressions, one frame through the stream helper.
SCRIPT = """
import importlib.util, sys
from fermam_client import Client, FrameResult, SessionEnd

base, key, photo, server_only = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
importable = [name for name in server_only if importlib.util.find_spec(name) is not None]
assert not importable, f"server-side packages importable in the client's venv: {importable}"
with Client(base, api_key=key, timeout_s=120) as client:
    faces = client.expressions([photo], top_k=2).images[0].faces
    assert len(faces) == 1, faces
    assert len(faces[0].top) == 2 and faces[0].expression in faces[0].scores
    with client.stream(top_k=1) as session:
        session.send(photo)
        frame = session.recv(timeout_s=120)
        assert isinstance(frame, FrameResult), frame
        assert [f.track_id for f in frame.faces] == [1], frame
        assert isinstance(session.end()[-1], SessionEnd)
print("one face:", faces[0].expression, "| stream track", frame.faces[0].track_id)
"""


def client_imports() -> set[str]:
    """Top-level names every module of fermam_client imports."""
    names: set[str] = set()
    for path in (CLIENT / "fermam_client").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_the_client_imports_the_standard_library_httpx_and_websockets_only() -> None:
    foreign = client_imports() - set(sys.stdlib_module_names) - {"httpx", "websockets", "fermam_client"}
    assert not foreign, f"fermam_client imports {sorted(foreign)}: it must know the HTTP API only"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment (pip's index settings included) without what points at the repo."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop} | extra


def run(command: list, cwd: Path, timeout_s: float = 600, **env: str) -> str:
    done = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, (
        f"{command}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> tuple[Path, Path]:
    """A venv with `pip install clients/python` only, and the copy of clients/python it came from."""
    root = tmp_path_factory.mktemp("client")
    # pip builds in the source folder (build/, *.egg-info): a copy keeps the checkout clean.
    source = root / "python"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    base = shutil.which("python3.11") or sys.executable
    run([base, "-m", "venv", root / "venv"], cwd=root)
    python = root / "venv" / "bin" / "python"
    run([python, "-m", "pip", "install", "--quiet", source], cwd=root)
    return python, source


@pytest.fixture(scope="module")
def server(weights_path):
    base, process = start_server(weights_path, "--api-keys", KEY)
    yield base
    process.kill()
    process.wait(10)


@pytest.mark.slow
def test_the_fresh_venv_holds_the_client_and_no_server_package(fresh_venv) -> None:
    python, source = fresh_venv
    listed = run([python, "-m", "pip", "list", "--format=freeze"], cwd=source.parent).lower()
    installed = {line.split("==")[0] for line in listed.splitlines()}
    assert "fermam-client" in installed and {"httpx", "websockets"} <= installed
    assert not installed & {"torch", "numpy", "fastapi", "av", "dlib-bin", "pillow", "fermam-service"}
    failed = subprocess.run(
        [python, "-c", "import torch"], cwd=source.parent, env=clean_env(), capture_output=True, text=True
    )
    assert failed.returncode != 0 and "No module named 'torch'" in failed.stderr


@pytest.mark.slow
def test_the_installed_client_reads_a_photo_and_a_stream_frame_from_a_real_server(fresh_venv, server) -> None:
    python, source = fresh_venv
    # Run from the venv's folder, not the checkout, so nothing of the repository is importable.
    out = run([python, "-c", SCRIPT, server, KEY, PHOTO, ",".join(SERVER_ONLY)], cwd=source.parent)
    assert out.startswith("one face:"), out


@pytest.mark.slow
def test_the_examples_run_from_the_fresh_venv(fresh_venv, server) -> None:
    python, source = fresh_venv
    examples, cwd = source / "examples", source.parent
    photos = run([python, examples / "photos.py", PHOTO, "--url", server], cwd, FERMAM_API_KEY=KEY)
    assert "1 face(s)" in photos, photos
    stream = run([python, examples / "stream.py", PHOTO, PHOTO, "--url", server], cwd, FERMAM_API_KEY=KEY)
    assert "frame 0: #1 " in stream and "frame 1: #1 " in stream, stream
    mood_command = [python, examples / "chatbot_mood.py", PHOTO, "--url", server, "--deadline", "120"]
    mood = run(mood_command, cwd, FERMAM_API_KEY=KEY)
    assert mood.startswith("mood: ") and "unknown" not in mood, mood


@pytest.mark.slow
def test_the_wheel_carries_py_typed_and_depends_on_httpx_and_websockets_only(fresh_venv, tmp_path) -> None:
    python, source = fresh_venv
    run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", source, "-w", tmp_path], cwd=source.parent)
    (wheel,) = tmp_path.glob("fermam_client-*.whl")
    version = re.search(r'__version__ = "([^"]+)"', (CLIENT / "fermam_client" / "__init__.py").read_text())
    assert version and wheel.name.startswith(f"fermam_client-{version.group(1)}-py3-none-any")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    assert {"fermam_client/__init__.py", "fermam_client/_client.py", "fermam_client/py.typed"} <= names
    assert not [n for n in names if n.split("/")[0] in {"service", "model", "examples"}]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in requires) == ["httpx", "websockets"]
