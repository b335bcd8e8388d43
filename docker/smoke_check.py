"""Fail the image build unless everything the service loads at start is inside the image.

Run as the last build step with the network cut (``RUN --network=none``): it reads the settings
from the image's FERMAM_* environment exactly as ``fermam serve`` does, loads the FERMam
checkpoint, builds the configured face backend from the baked-in weights (downloads refused), and
with ``--require-mamba`` insists that mamba-ssm's compiled selective-scan kernel imports, because
the model falls back to its slower PyTorch scan without a word when it does not. The build machine
has no GPU, so the models are loaded on the CPU; what differs on CUDA is only where tensors live.

    python smoke_check.py [--require-mamba]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-mamba", action="store_true", help="fail unless mamba-ssm's kernel imports")
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
