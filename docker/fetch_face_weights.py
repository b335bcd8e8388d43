"""Download face-alignment's S3FD detector and 2DFAN-4 landmark weights at image build time.

The container runs with no network, and face-alignment would otherwise fetch these on first use.
They go where torch.hub (and so face-alignment and our backend) look: ``$TORCH_HOME/hub/checkpoints``.
Standard library only, so it runs in a bare stage whose cache survives code changes. The file
names carry the first hex digits of each file's SHA-256 (torch.hub's convention); a download that
does not match is deleted and the build fails. tests/deploy checks these URLs against the ones
the installed face-alignment release uses, so an upgrade cannot silently change them.

Where the download host cannot be reached from the build (a mirror-only or air-gapped build host),
`--from DIR` takes the files from DIR instead (the Dockerfile mounts its `face-weights-src` stage
there: `--build-context face-weights-src=DIR` or `--build-arg FACE_WEIGHTS=IMAGE`); they are held
to the same digests, and a file missing there is downloaded.

    python fetch_face_weights.py DEST_DIR [--from DIR]
"""

from __future__ import annotations

import hashlib
import re
import sys
import urllib.request
from pathlib import Path
from typing import BinaryIO

# face_alignment 1.5.0: detection/sfd/sfd_detector.py models_urls["s3fd"] and
# api.py models_urls["2DFAN-4"].
FACE_ALIGNMENT_WEIGHTS: dict[str, str] = {
    "s3fd": "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",
    "2DFAN-4": "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")
_CHUNK = 1 << 20


def expected_sha256_prefix(url: str) -> str:
    """The digest prefix torch.hub reads from a file name such as ``s3fd-619a316812.pth``."""
    match = _HASH_IN_NAME.search(url.rsplit("/", 1)[-1])
    if match is None:
        raise ValueError(f"no SHA-256 prefix in the file name of {url}")
    return match[1]


def _save_verified(source: BinaryIO, url: str, dest_dir: Path, label: str) -> Path:
    """Write `source` into `dest_dir` under the name in `url`, held to the digest prefix in that
    name: a mismatch leaves nothing behind."""
    target = dest_dir / url.rsplit("/", 1)[-1]
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    prefix = expected_sha256_prefix(url)
    if not digest.hexdigest().startswith(prefix):
        partial.unlink()
        raise RuntimeError(f"{label}: SHA-256 {digest.hexdigest()} does not start with {prefix}")
    partial.rename(target)
    return target


def fetch(url: str, dest_dir: Path) -> Path:
    """Download `url` into `dest_dir` under its own name; verify its digest prefix."""
    with urllib.request.urlopen(url, timeout=120) as response:
        return _save_verified(response, url, dest_dir, url)


def copy_verified(source: Path, url: str, dest_dir: Path) -> Path:
    """Copy a local copy of `url`'s file into `dest_dir`, held to the digest prefix in its name."""
    with source.open("rb") as handle:
        return _save_verified(handle, url, dest_dir, str(source))


def main(argv: list[str]) -> int:
    local_dir: Path | None = None
    if len(argv) == 3 and argv[1] == "--from":
        local_dir = Path(argv[2])
    elif len(argv) != 1:
        print("usage: fetch_face_weights.py DEST_DIR [--from DIR]", file=sys.stderr)
        return 2
    dest_dir = Path(argv[0])
    dest_dir.mkdir(parents=True, exist_ok=True)
    for name, url in FACE_ALIGNMENT_WEIGHTS.items():
        local = None if local_dir is None else local_dir / url.rsplit("/", 1)[-1]
        if local is not None and local.is_file():
            path, how = copy_verified(local, url, dest_dir), f"from {local_dir}"
        else:
            path, how = fetch(url, dest_dir), "downloaded"
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB, {how}, SHA-256 prefix verified)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
