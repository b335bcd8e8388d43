"""Point mamba-ssm's setup.py at exactly the GPU architectures we ship.

mamba-ssm's setup.py appends a fixed list of ``-gencode`` targets (nine under CUDA 13) whatever
``TORCH_CUDA_ARCH_LIST`` says, so a default build compiles every kernel nine times and lasts an
hour. This rewrites that list, just before the extension's flags are assembled, to the
architectures asked for. Standard library only: it runs in the image's build stage before
anything else is installed, and in CI against the shared source package.

    python docker/mamba_gencode.py "8.0 8.6 8.9 9.0+PTX" [path/to/setup.py]

prints the ``sm_XY`` names the built library must contain and, given setup.py, patches it in
place (without it, only checks the architectures, before anything slow starts).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# The line of setup.py just after the gencode list is complete (and before it is used).
PATCH_ANCHOR = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
_ARCH = re.compile(r"^(\d+)\.(\d+)(\+PTX)?$")


def parse_archs(archs: str) -> list[tuple[str, bool]]:
    """ "8.0 8.6;9.0+PTX" -> [("80", False), ("86", False), ("90", True)]: space or ; separated,
    as TORCH_CUDA_ARCH_LIST is; "+PTX" also embeds that architecture's PTX for newer GPUs."""
    parsed = []
    for token in archs.replace(";", " ").split():
        match = _ARCH.match(token)
        if match is None:
            raise ValueError(f"bad CUDA architecture {token!r}: want e.g. 8.6 or 9.0+PTX")
        parsed.append((match[1] + match[2], match[3] is not None))
    if not parsed:
        raise ValueError("no CUDA architecture given")
    return parsed


def gencode_flags(archs: str) -> list[str]:
    """nvcc flags: machine code (sm_XY) for each architecture, plus PTX (compute_XY) where asked."""
    flags: list[str] = []
    for sm, with_ptx in parse_archs(archs):
        flags += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
        if with_ptx:
            flags += ["-gencode", f"arch=compute_{sm},code=compute_{sm}"]
    return flags


def patch_setup_source(source: str, flags: list[str]) -> str:
    """setup.py's text with its CUDA gencode list replaced by `flags` (HIP builds untouched)."""
    if source.count(PATCH_ANCHOR) != 1:
        raise ValueError("mamba-ssm's setup.py changed: the gencode patch point is gone")
    patch = f"    if not HIP_BUILD:\n        cc_flag = {flags!r}\n"
    return source.replace(PATCH_ANCHOR, patch + PATCH_ANCHOR)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: mamba_gencode.py ARCHS [SETUP_PY]", file=sys.stderr)
        return 2
    archs = argv[0]
    try:
        flags = gencode_flags(archs)
        if len(argv) == 2:
            setup_py = Path(argv[1])
            patched = patch_setup_source(setup_py.read_text(encoding="utf-8"), flags)
            setup_py.write_text(patched, encoding="utf-8")
    except ValueError as error:
        print(f"mamba_gencode.py: {error}", file=sys.stderr)
        return 2
    print(" ".join(f"sm_{sm}" for sm, _ in parse_archs(archs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
