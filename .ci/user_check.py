"""The README's first command as a user runs it: a copy of the tree, a fresh venv with only what
that command installs, `fermam serve` reaching /readyz, then the README's curl example and
`fermam predict` on the sample photo, each answering with one face; SIGTERM ends the server.

    python3.11 .ci/user_check.py

Standard library only. The copy keeps the test suite's venv (`.venv` of the checkout) out of it,
so a module that only the `[test]` extra brings cannot hide a crash at start (issue 22: scipy).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme import command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PORT = 8000  # the README's examples call http://127.0.0.1:8000
INSTALL_AND_LOAD_S = 1800


def say(message: str) -> None:
    print(f"[user_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fail(message: str, log: Path | None = None) -> None:
    if log is not None and log.exists():
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
    say(f"FAIL: {message}")
    sys.exit(1)


def copy_tree(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a fresh clone of this state holds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def status_of(path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def one_face(output: str, what: str) -> None:
    try:
        answer = json.loads(output)
    except json.JSONDecodeError:
        fail(f"{what} did not print JSON: {output[:500]!r}")
    faces = answer["images"][0]["faces"]
    if len(faces) != 1:
        fail(f"{what}: {len(faces)} faces in the sample photo, expected one")
    say(f"{what}: one face, {faces[0]['expression']}")


def main() -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            fail(f"port {PORT} is already taken: the README's examples need it")
    work = Path(tempfile.mkdtemp(prefix="fermam-user-"))
    tree = work / "fermam-service"
    copy_tree(tree)
    serve = command("serve")
    say(f"in a copy of the tree ({tree}), a fresh venv: {serve}")
    log = work / "serve.log"
    started = time.monotonic()
    with log.open("w") as out:
        server = subprocess.Popen(
            ["bash", "-c", serve], cwd=tree, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}},
        )  # fmt: skip
    try:
        while status_of("/readyz") != 200:
            if server.poll() is not None:
                fail(f"the README's first command exited with {server.returncode} before /readyz", log)
            if time.monotonic() - started > INSTALL_AND_LOAD_S:
                fail(f"/readyz not 200 within {INSTALL_AND_LOAD_S} s", log)
            time.sleep(1)
        say(f"/readyz 200 after {time.monotonic() - started:.0f} s (install and model load)")

        example = command("example")
        curl = subprocess.run(["bash", "-c", example], cwd=tree, capture_output=True, text=True, timeout=120)
        if curl.returncode != 0:
            fail(f"the README's curl example exited with {curl.returncode}: {curl.stderr}")
        one_face(curl.stdout, "README curl example")

        predict = subprocess.run(
            [str(tree / ".venv" / "bin" / "fermam"), "predict", "samples/grace_hopper.jpg", "--json"],
            cwd=tree, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if predict.returncode != 0:
            fail(f"fermam predict exited with {predict.returncode}: {predict.stderr[-2000:]}")
        one_face(predict.stdout, "fermam predict --json")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                fail("the server did not stop within 60 s of SIGTERM", log)
    if "Traceback" in log.read_text(errors="replace"):
        fail("the server logged a traceback", log)
    shutil.rmtree(work, ignore_errors=True)
    say("the README's first command works as a user runs it")


if __name__ == "__main__":
    main()
