"""nvcc and the CUDA headers for compiling mamba-ssm's kernel, from NVIDIA's wheels on PyPI.

The CUDA image compiles its kernel against the CUDA of the installed torch wheel. Instead of an
nvidia/cuda devel image (which a build host behind a mirror cannot pull, and whose CUDA must be
kept in step with torch's by hand), the compiler comes from the same place as torch's CUDA
runtime: NVIDIA's `cuda-toolkit` wheels, at the version torch itself requires. They install
under `site-packages/nvidia/cuXX` beside the runtime, cuBLAS and cuSPARSE headers torch already
pulled in; `home` adds the few links a CUDA_HOME has (`lib64`, `targets/<arch>-linux`, the
unversioned `libcudart.so`) and prints it; `remove` takes the compile-only wheels and those links
out again once the kernel is built, so the runtime image carries no compiler. Standard library
only (torch is read through its metadata and `import torch` only where its CUDA version is needed).

    python cuda_toolkit.py requirement   # e.g. cuda-toolkit[nvcc,cccl]==13.0.3
    python cuda_toolkit.py home          # makes the tree a CUDA_HOME and prints its path
    python cuda_toolkit.py remove        # uninstalls nvcc, crt, nvvm, cccl; removes the links
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

# cuda-toolkit's extras that hold nvcc (with crt and nvvm) and CCCL (cub, thrust: the kernel uses cub).
EXTRAS = "nvcc,cccl"
# Installed by those extras, needed only to compile: removed after the build unless torch needs them.
COMPILE_ONLY = ("nvidia-cuda-nvcc", "nvidia-cuda-crt", "nvidia-nvvm", "nvidia-cuda-cccl")
LINKS_FILE = ".fermam-links.json"  # the links `home` made, for `remove`
_TARGET_DIRS = {"x86_64": "x86_64-linux", "aarch64": "sbsa-linux"}


def _torch_requirements() -> list[str]:
    return metadata.requires("torch") or []


def requirement() -> str:
    """The pip requirement for nvcc and CCCL at the CUDA toolkit version torch was built with."""
    for line in _torch_requirements():
        match = re.match(r"cuda-toolkit\s*(\[[^\]]*\])?\s*==\s*([\w.*]+)", line)
        if match:
            return f"cuda-toolkit[{EXTRAS}]=={match[2]}"
    # Older CUDA wheels list the nvidia-* packages one by one: match torch's CUDA major.minor.
    import torch

    if torch.version.cuda is None:
        raise SystemExit(f"cuda_toolkit.py: torch {torch.__version__} is a CPU build")
    return f"cuda-toolkit[{EXTRAS}]=={torch.version.cuda}.*"


def cuda_home() -> Path:
    """`site-packages/nvidia/cuXX` for the CUDA major version of the installed torch."""
    import torch

    if torch.version.cuda is None:
        raise SystemExit(f"cuda_toolkit.py: torch {torch.__version__} is a CPU build")
    major = torch.version.cuda.split(".")[0]
    return Path(sysconfig.get_paths()["purelib"]) / "nvidia" / f"cu{major}"


def _link(link: Path, target: str, made: list[str]) -> None:
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    made.append(str(link))


def make_home(home: Path | None = None) -> Path:
    """Add the links nvcc.profile and torch's cpp_extension expect of a CUDA_HOME."""
    home = cuda_home() if home is None else home
    nvcc = home / "bin" / "nvcc"
    if not nvcc.is_file():
        raise SystemExit(f"cuda_toolkit.py: no {nvcc}; install the `requirement` first")
    made: list[str] = []
    _link(home / "lib64", "lib", made)  # torch links with -L$CUDA_HOME/lib64
    target_dir = home / "targets" / _TARGET_DIRS.get(platform.machine(), f"{platform.machine()}-linux")
    _link(target_dir / "include", "../../include", made)  # nvcc.profile: $(TOP)/targets/<arch>/include
    _link(target_dir / "lib", "../../lib", made)
    versioned = sorted((home / "lib").glob("libcudart.so.*"))
    if versioned:
        _link(home / "lib" / "libcudart.so", versioned[0].name, made)  # -lcudart
    (home / LINKS_FILE).write_text(json.dumps(made))
    return home


def remove_links(home: Path) -> None:
    """Undo `make_home`: the links it made, and the folders it made for them."""
    links_file = home / LINKS_FILE
    if not links_file.is_file():
        return
    for link in json.loads(links_file.read_text()):
        Path(link).unlink(missing_ok=True)
    links_file.unlink()
    for folder in [*sorted(home.glob("targets/*")), home / "targets"]:
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()


def compile_only_distributions() -> list[str]:
    """The compiler's wheels, less any that torch itself depends on."""
    needed = {re.match(r"[A-Za-z0-9._-]+", line)[0].lower() for line in _torch_requirements()}
    return [name for name in COMPILE_ONLY if name not in needed]


def remove() -> None:
    """Uninstall the compile-only wheels and remove the links `home` made."""
    remove_links(cuda_home())
    names = compile_only_distributions()
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", *names], check=True)


def main(argv: list[str]) -> int:
    commands = {
        "requirement": lambda: print(requirement()),
        "home": lambda: print(make_home()),
        "remove": remove,
    }
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: cuda_toolkit.py {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    commands[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
