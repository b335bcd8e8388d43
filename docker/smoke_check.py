"""Fail the image build unless the service starts and answers from what is inside the image.

Run as the last build step with the network cut (``RUN --network=none``): it reads the settings
from the image's FERMAM_* environment exactly as ``fermam serve`` does, loads the FERMam
checkpoint, builds the configured face backend from the baked-in weights (downloads refused), and
with ``--require-mamba`` insists that mamba-ssm's compiled selective-scan kernel imports, because
the model falls back to its slower PyTorch scan without a word when it does not. Then it starts
``fermam serve`` itself on loopback, posts the sample photo, expects one face, and stops it with
SIGTERM (exit 0): an import only the server needs (issue 22: scipy, missing from the base install)
fails the build instead of the first `docker run`. The build machine has no GPU, so everything
runs on the CPU; what differs on CUDA is only where tensors live.

    python smoke_check.py [--require-mamba] [--photo PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In the image the photo lies beside this script; in a checkout it is the repository's sample.
PHOTOS = (HERE / "grace_hopper.jpg", HERE.parent / "samples" / "grace_hopper.jpg")
READY_TIMEOUT_S = 600  # the CUDA image's face-alignment models warm up slowly on a build CPU


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-mamba", action="store_true", help="fail unless mamba-ssm's kernel imports")
    parser.add_argument(
        "--photo", type=Path, default=next((p for p in PHOTOS if p.is_file()), PHOTOS[0]),
        help="a photo with one face, posted to the started server",
    )  # fmt: skip
    args = parser.parse_args(argv)

    from model.checkpoint import load_checkpoint
    from service.engine.faces import create_face_backend
    from service.settings import Settings

    settings = Settings()
    model, metadata = load_checkpoint(settings.weights, map_location="cpu")
    parameters = sum(p.numel() for p in model.parameters())
    print(f"FERMam: {settings.weights} ({parameters / 1e6:.1f} M parameters)")

    create_face_backend(
        settings.face_backend,
        device="cpu",
        min_face_size=settings.min_face_size,
        detector=settings.detector,
        weights_dir=settings.face_weights_dir,
        allow_download=False,
    )
    print(f"face backend: {settings.face_backend} loaded from local weights")

    if args.require_mamba:
        from model.scan import available_backends

        backends = available_backends()
        if "mamba" not in backends:
            try:  # model.scan swallows the reason; show it
                import mamba_ssm.ops.selective_scan_interface  # noqa: F401
            except Exception as error:  # noqa: BLE001 - any failure is the answer here
                print(f"mamba-ssm's kernel does not import: {error!r}", file=sys.stderr)
            return 1
        print("selective scan: mamba-ssm kernel importable")
    return serve_and_post(args.photo)


def serve_and_post(photo: Path) -> int:
    """`fermam serve` as the image runs it (on the CPU, on loopback): ready, one face, clean stop."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "service.cli", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if server.poll() is not None:
                print(
                    f"fermam serve exited with {server.returncode}:\n{server.stdout.read()[-3000:]}",
                    file=sys.stderr,
                )
                return 1
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                print(f"fermam serve not ready within {READY_TIMEOUT_S} s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        files = [("files", (photo.name, photo.read_bytes(), "image/jpeg"))]
        response = httpx.post(f"{base}/v1/expressions", files=files, timeout=300)
        faces = response.json()["images"][0]["faces"] if response.status_code == 200 else None
        if faces is None or len(faces) != 1:
            print(f"POST {photo.name}: {response.status_code} {response.text[:500]}", file=sys.stderr)
            return 1
        print(f"fermam serve: {photo.name} -> one face, {faces[0]['expression']}")
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
        if server.returncode != 0 or "Traceback" in output:
            print(
                f"fermam serve ended with {server.returncode} after SIGTERM:\n{output[-3000:]}",
                file=sys.stderr,
            )
            return 1
        print("fermam serve: stopped cleanly on SIGTERM")
        return 0
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
