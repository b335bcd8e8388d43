"""Point mamba-ssm's setup.py at exactly the GPU architectures we ship.

mamba-ssm's setup.py appends a fixed list of ``-gencode`` targets (nine under CUDA 13) whatever
``TORCH_CUDA_ARCH_LIST`` says, so a default build compiles every kernel nine times and lasts an
hour. This rewrites that list, just before the extension's flags are assembled, to the
architectures asked for. Standard library only: it runs in the image's build stage before
anything else is installed, and in CI against the shared source package.

    python docker/mamba_gencode.py "8.0 8.6 8.9 9.0+PTX" [path/to/setup.py [CXX_STD]]
    python docker/mamba_gencode.py --ptx "8.0 8.6 8.9 9.0+PTX"    # compute_90

prints the ``sm_XY`` names the built library must contain and, given setup.py, patches it in
place (without it, only checks the architectures, before anything slow starts); with ``--ptx``,
the ``compute_XY`` names of the PTX it must contain.

setup.py also fixes ``-std=c++17`` for both compilers, while torch 2.14's headers refuse anything
before C++20 (``#error C++20 or later compatible compiler is required to use ATen``); CXX_STD (e.g.
20, what `torch_cxx_standard` reads from the installed torch) replaces it.
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


def patch_setup_source(source: str, flags: list[str], cxx_std: int | None = None) -> str:
    """setup.py's text with its CUDA gencode list replaced by `flags` (HIP builds untouched) and,
    given `cxx_std`, its fixed C++ standard replaced by that one."""
    if source.count(PATCH_ANCHOR) != 1:
        raise ValueError("mamba-ssm's setup.py changed: the gencode patch point is gone")
    patch = f"    if not HIP_BUILD:\n        cc_flag = {flags!r}\n"
    patched = source.replace(PATCH_ANCHOR, patch + PATCH_ANCHOR)
    if cxx_std is not None:
        if '"-std=c++17"' not in patched:
            raise ValueError("mamba-ssm's setup.py changed: no -std=c++17 to replace")
        patched = patched.replace('"-std=c++17"', f'"-std=c++{cxx_std}"')
    return patched


def torch_cxx_standard(aten_header: str) -> int:
    """The C++ standard torch's headers demand (ATen/ATen.h's `#error C++NN or later ...`)."""
    match = re.search(r"C\+\+(\d+) or later", aten_header)
    return int(match[1]) if match else 17


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--ptx":
        try:
            print(" ".join(f"compute_{sm}" for sm, with_ptx in parse_archs(argv[1]) if with_ptx))
        except ValueError as error:
            print(f"mamba_gencode.py: {error}", file=sys.stderr)
            return 2
        return 0
    if len(argv) not in (1, 2, 3):
        print("usage: mamba_gencode.py ARCHS [SETUP_PY [CXX_STD]]", file=sys.stderr)
        return 2
    archs = argv[0]
    try:
        flags = gencode_flags(archs)
        if len(argv) >= 2:
            setup_py = Path(argv[1])
            cxx_std = int(argv[2]) if len(argv) == 3 else None
            patched = patch_setup_source(setup_py.read_text(encoding="utf-8"), flags, cxx_std)
            setup_py.write_text(patched, encoding="utf-8")
    except ValueError as error:
        print(f"mamba_gencode.py: {error}", file=sys.stderr)
        return 2
    print(" ".join(f"sm_{sm}" for sm, _ in parse_archs(archs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
