#!/usr/bin/env bash
# Builds a mamba-ssm wheel whose selective-scan CUDA kernel holds machine code for the GPU
# architectures given, then checks that the library loads and really contains each of them.
#
# Used by docker/Dockerfile's build stage, and runnable as-is on any machine with CUDA PyTorch,
# nvcc of the same CUDA major version, and setuptools, wheel and packaging (and ninja, for parallel
# compiles) installed in the Python that runs it. The build runs without isolation, so it needs
# no network when MAMBA_SDIST is given.
#
#   docker/build_mamba_ssm.sh ARCHS OUT_DIR
#     ARCHS    compute capabilities, space- or semicolon-separated; "+PTX" on one also embeds its
#              PTX so newer GPUs can JIT it. E.g. "8.0 8.6 8.9 9.0+PTX" (Ampere, Ada, Hopper)
#     OUT_DIR  where the wheel is written (created if missing)
#   MAMBA_SDIST=path/to/mamba_ssm-X.tar.gz  build from that file instead of fetching it from PyPI
#   MAMBA_SSM_VERSION=2.3.2.post1           the release fetched when MAMBA_SDIST is unset
#   MAX_JOBS=N                              parallel compile jobs (default: CPU count)
#   PYTHON=python3                          the interpreter whose torch the kernel is built for
#
# Then: pip install --no-deps OUT_DIR/mamba_ssm-*.whl   (or --target DIR and add DIR to PYTHONPATH)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage='usage: build_mamba_ssm.sh ARCHS OUT_DIR   (e.g. "8.0 8.6 8.9 9.0+PTX" /tmp/wheels)'
archs=${1:?$usage}
out_dir=${2:?$usage}
version=${MAMBA_SSM_VERSION:-2.3.2.post1}
python=${PYTHON:-python3}

# A typo in ARCHS should fail now, not after the download.
expected_sms=$("$python" "$here/mamba_gencode.py" "$archs")

"$python" - <<'PY'
import importlib.util
import sys

import torch

if torch.version.cuda is None:
    sys.exit(f"build_mamba_ssm.sh: torch {torch.__version__} is a CPU build; a CUDA build is needed")
missing = [name for name in ("setuptools", "wheel", "packaging") if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"build_mamba_ssm.sh: install {' '.join(missing)} first (the build runs without isolation)")
if importlib.util.find_spec("ninja") is None:
    print("build_mamba_ssm.sh: ninja not installed, files compile one at a time (slow)", file=sys.stderr)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
command -v nvcc >/dev/null || { echo "build_mamba_ssm.sh: nvcc not on PATH (use a CUDA devel image)" >&2; exit 2; }
nvcc --version | tail -n 2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)

if [[ -n ${MAMBA_SDIST:-} ]]; then
  sdist=$MAMBA_SDIST
else
  # PyPI has only the source package; reading its metadata runs setup.py, which imports the
  # torch installed here, hence no build isolation.
  "$python" -m pip download --quiet --no-deps --no-binary mamba-ssm --no-build-isolation \
    --dest "$work" "mamba-ssm==$version"
  sdist=$(ls "$work"/mamba_ssm-*.tar.gz)
fi
tar xzf "$sdist" -C "$work"
src=$(ls -d "$work"/mamba_ssm-*/)

# Replace setup.py's fixed nine-architecture gencode list by the one asked for, and its fixed
# -std=c++17 by the standard the installed torch's headers demand (C++20 from torch 2.14 on).
cxx_std=$("$python" - "$here" <<'PY'
import sys
from pathlib import Path

from torch.utils.cpp_extension import include_paths

sys.path.insert(0, sys.argv[1])
from mamba_gencode import torch_cxx_standard

print(torch_cxx_standard((Path(include_paths()[0]) / "ATen" / "ATen.h").read_text()))
PY
)
"$python" "$here/mamba_gencode.py" "$archs" "$src/setup.py" "$cxx_std" >/dev/null
echo "building for: $expected_sms, C++$cxx_std"

# MAMBA_FORCE_BUILD: otherwise setup.py first tries to download a prebuilt wheel, and fails offline.
# --no-deps: its runtime dependencies (einops, transformers, triton, ...) are the caller's concern.
start=$SECONDS
(
  cd "$src"
  MAMBA_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST="${archs//;/ }" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$python" -m pip wheel --no-build-isolation --no-deps --no-index --wheel-dir "$out_dir" .
)
wheel=$(ls -t "$out_dir"/mamba_ssm-*.whl | head -n 1)
echo "built $wheel in $((SECONDS - start)) s"

# The proof that the patch took: the kernel library loads beside torch (no GPU needed: the
# driver is opened only at the first kernel launch) and holds every asked-for architecture.
"$python" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$wheel" "$work/check"
library=$(ls "$work"/check/selective_scan_cuda*.so)
PYTHONPATH="$work/check" "$python" -c 'import torch, selective_scan_cuda; print("loads:", selective_scan_cuda.__name__)'
# cuobjdump is in no PyPI wheel (the CUDA image's nvcc comes from those): fatbin_archs.py reads
# the same fat binary headers. Machine code for each architecture must be there, PTX where asked.
found=" $("$python" "$here/fatbin_archs.py" "$library") "
echo "GPU code in the library:$found"
for sm in $expected_sms; do
  [[ $found == *" $sm "* ]] || { echo "build_mamba_ssm.sh: $sm missing from the library" >&2; exit 1; }
done
for ptx in $("$python" "$here/mamba_gencode.py" --ptx "$archs"); do
  [[ $found == *" $ptx "* ]] || { echo "build_mamba_ssm.sh: $ptx (PTX) missing from the library" >&2; exit 1; }
done
