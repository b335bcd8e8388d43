"""The helper scripts the images run: the mamba-ssm gencode patch (against the real source
package), the weight fetcher, the health check and the offline smoke check, each run for real."""

from __future__ import annotations

import ast
import hashlib
import http.server
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from deploy_helpers import REPO, SHARED

DOCKER = REPO / "docker"
MAMBA_SDIST = SHARED / "gpu" / "mamba_ssm-2.3.2.post1.tar.gz"
SHIPPED_ARCHS = "8.0 8.6 8.9 9.0+PTX"


def load_script(name: str) -> ModuleType:
    """Import a docker/ script as a module (docker/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mamba_gencode = load_script("mamba_gencode")
fetch_face_weights = load_script("fetch_face_weights")
fatbin_archs = load_script("fatbin_archs")
cuda_toolkit = load_script("cuda_toolkit")


# -- mamba-ssm's gencode patch -------------------------------------------------------------------


def test_gencode_flags_give_machine_code_per_arch_and_ptx_where_asked() -> None:
    assert mamba_gencode.gencode_flags("8.0;8.6 9.0+PTX") == [
        "-gencode", "arch=compute_80,code=sm_80",
        "-gencode", "arch=compute_86,code=sm_86",
        "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90",
    ]  # fmt: skip


@pytest.mark.parametrize("archs", ["", "8", "sm_80", "9.0+ptx", "8.6 ampere"])
def test_gencode_refuses_what_nvcc_would_not_understand(archs) -> None:
    with pytest.raises(ValueError):
        mamba_gencode.gencode_flags(archs)


@pytest.fixture(scope="module")
def mamba_setup_source() -> str:
    with tarfile.open(MAMBA_SDIST) as sdist:
        return sdist.extractfile("mamba_ssm-2.3.2.post1/setup.py").read().decode()


def test_patch_replaces_the_gencode_list_after_setup_py_builds_it(mamba_setup_source) -> None:
    """In the real setup.py, our assignment must come after every cc_flag.append of the CUDA
    branch and before the flags are handed to nvcc, or the build would compile nine archs."""
    flags = mamba_gencode.gencode_flags(SHIPPED_ARCHS)
    patched = ast.parse(mamba_gencode.patch_setup_source(mamba_setup_source, flags))
    ours = [
        node
        for node in ast.walk(patched)
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["cc_flag"]
        and isinstance(node.value, ast.List)
        and node.value.elts
    ]
    assert len(ours) == 1 and ast.literal_eval(ours[0].value) == flags
    appends = [
        node.lineno
        for node in ast.walk(patched)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "cc_flag.append"
    ]
    uses = [
        node.lineno
        for node in ast.walk(patched)
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["extra_compile_args"]
    ]
    assert appends and uses
    assert max(appends) < ours[0].lineno < min(uses)


def test_patch_refuses_a_setup_py_it_does_not_recognise(mamba_setup_source) -> None:
    changed = mamba_setup_source.replace("# HACK: The compiler flag", "# The compiler flag")
    with pytest.raises(ValueError, match="patch point"):
        mamba_gencode.patch_setup_source(changed, ["-gencode", "arch=compute_90,code=sm_90"])


def test_patch_cli_edits_setup_py_in_place_and_lists_the_archs(tmp_path, mamba_setup_source) -> None:
    setup_py = tmp_path / "setup.py"
    setup_py.write_text(mamba_setup_source)
    done = subprocess.run(
        [sys.executable, DOCKER / "mamba_gencode.py", SHIPPED_ARCHS, setup_py], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["sm_80", "sm_86", "sm_89", "sm_90"]
    assert "arch=compute_89,code=sm_89" in setup_py.read_text()


def test_build_script_parses_and_stops_early_on_a_bad_arch(tmp_path) -> None:
    script = DOCKER / "build_mamba_ssm.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    done = subprocess.run(
        ["bash", script, "8.0 9.x", tmp_path],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 2 and "9.x" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.version.cuda is not None, reason="with CUDA torch the script would really build")
def test_build_script_refuses_cpu_torch(tmp_path) -> None:
    script = DOCKER / "build_mamba_ssm.sh"
    done = subprocess.run(
        ["bash", script, SHIPPED_ARCHS, tmp_path],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode != 0
    assert "is a CPU build" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_cxx_standard_follows_what_the_torch_headers_demand(mamba_setup_source) -> None:
    """torch 2.14's ATen.h refuses C++17, which mamba-ssm's setup.py fixes for both compilers (the
    first CUDA image build failed on it): the standard is read from the installed torch's header
    and replaces every -std=c++17; without one, setup.py keeps its own."""
    from torch.utils.cpp_extension import include_paths

    installed = (Path(include_paths()[0]) / "ATen" / "ATen.h").read_text()
    assert mamba_gencode.torch_cxx_standard(installed) >= 17
    cuda_2_14 = "#error C++20 or later compatible compiler is required to use ATen."
    assert mamba_gencode.torch_cxx_standard(cuda_2_14) == 20
    flags = mamba_gencode.gencode_flags("9.0")
    patched = mamba_gencode.patch_setup_source(mamba_setup_source, flags, 20)
    assert "-std=c++17" not in patched and patched.count('"-std=c++20"') == mamba_setup_source.count(
        '"-std=c++17"'
    )
    assert mamba_gencode.patch_setup_source(mamba_setup_source, flags).count('"-std=c++17"') > 0


def test_ptx_names_are_listed_only_where_asked() -> None:
    done = subprocess.run(
        [sys.executable, DOCKER / "mamba_gencode.py", "--ptx", SHIPPED_ARCHS], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.split() == ["compute_90"]


# -- the GPU code a library holds (cuobjdump is in no PyPI wheel) ---------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile a real fat binary")
@pytest.mark.parametrize(
    ("gencode", "expected"),
    [
        (["-gencode", "arch=compute_80,code=sm_80"], {"sm_80"}),
        (
            ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"],
            {"sm_80", "sm_90", "compute_90"},
        ),
    ],
)
def test_fatbin_archs_reads_what_nvcc_compiled(tmp_path, gencode, expected) -> None:
    """A real kernel library compiled by nvcc (no GPU needed): the architectures asked for, and no
    others, are read back from its fat binary."""
    source = tmp_path / "kernel.cu"
    source.write_text(
        "__global__ void add(float* x) { x[threadIdx.x] += 1.0f; }\n"
        "void launch(float* x) { add<<<1, 32>>>(x); }\n"
    )
    library = tmp_path / "kernel.so"
    subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", *gencode, source, "-o", library], check=True)
    assert fatbin_archs.archs(fatbin_archs.fatbin_section(library.read_bytes())) == expected
    done = subprocess.run(
        [sys.executable, DOCKER / "fatbin_archs.py", library], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.split() == sorted(expected)


def test_fatbin_archs_refuses_a_library_without_gpu_code(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, DOCKER / "fatbin_archs.py", sys.executable], capture_output=True, text=True
    )
    assert done.returncode == 1 and "no .nv_fatbin section" in done.stderr
    text = tmp_path / "notes.txt"
    text.write_text("not an ELF file")
    with pytest.raises(fatbin_archs.NotAFatBinary):
        fatbin_archs.fatbin_section(text.read_bytes())


# -- nvcc from NVIDIA's wheels (the CUDA image's compiler) -----------------------------------------

# torch 2.14.1's CUDA wheel, as its METADATA lists it (Linux markers dropped).
CUDA_TORCH_REQUIREMENTS = [
    "filelock",
    "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3",
    "nvidia-cudnn-cu13==9.24.0.43",
    "triton~=3.8.0",
]


def test_the_compiler_wheels_match_the_cuda_toolkit_torch_requires(monkeypatch) -> None:
    monkeypatch.setattr(cuda_toolkit, "_torch_requirements", lambda: CUDA_TORCH_REQUIREMENTS)
    assert cuda_toolkit.requirement() == "cuda-toolkit[nvcc,cccl]==13.0.3"
    # Only what torch does not need itself goes once the kernel is built.
    assert cuda_toolkit.compile_only_distributions() == list(cuda_toolkit.COMPILE_ONLY)
    monkeypatch.setattr(
        cuda_toolkit, "_torch_requirements", lambda: [*CUDA_TORCH_REQUIREMENTS, "nvidia-nvvm"]
    )
    assert "nvidia-nvvm" not in cuda_toolkit.compile_only_distributions()


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch has a toolkit version")
def test_the_compiler_requirement_refuses_cpu_torch() -> None:
    with pytest.raises(SystemExit, match="CPU build"):
        cuda_toolkit.requirement()


def test_cuda_home_links_are_made_for_nvcc_and_removed_after(tmp_path) -> None:
    """The layout NVIDIA's wheels install (site-packages/nvidia/cu13/{bin,include,lib}) gets the
    links a CUDA_HOME has, which nvcc.profile and torch's cpp_extension use, and loses them again."""
    home = tmp_path / "nvidia" / "cu13"
    for folder in ("bin", "include", "lib", "nvvm/bin"):
        (home / folder).mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "include" / "cuda_runtime.h").write_text("")
    (home / "lib" / "libcudart.so.13").write_text("")
    before = sorted(str(p.relative_to(home)) for p in home.rglob("*"))

    assert cuda_toolkit.make_home(home) == home
    target = (
        home / "targets" / cuda_toolkit._TARGET_DIRS.get(os.uname().machine, f"{os.uname().machine}-linux")
    )
    assert (home / "lib64" / "libcudart.so.13").is_file()
    assert (target / "include" / "cuda_runtime.h").is_file() and (
        target / "lib" / "libcudart.so.13"
    ).is_file()
    assert os.readlink(home / "lib" / "libcudart.so") == "libcudart.so.13"

    cuda_toolkit.remove_links(home)
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == before


def test_cuda_home_needs_nvcc(tmp_path) -> None:
    with pytest.raises(SystemExit, match="nvcc"):
        cuda_toolkit.make_home(tmp_path)


# -- face-alignment weights ----------------------------------------------------------------------


def test_fetched_weights_are_the_ones_face_alignment_and_our_backend_expect() -> None:
    pytest.importorskip("face_alignment", reason="the face-alignment extra is not installed")
    from face_alignment.api import models_urls as fan_urls
    from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls

    from service.engine.faces import fan_backend

    urls = fetch_face_weights.FACE_ALIGNMENT_WEIGHTS
    assert urls == {"s3fd": sfd_urls["s3fd"], "2DFAN-4": fan_urls["2DFAN-4"]}
    names = {url.rsplit("/", 1)[-1] for url in urls.values()}
    assert names == {fan_backend.FAN_FILE, *fan_backend.required_weight_files("sfd")}
    assert all(fan_backend.DOWNLOAD_URLS[name] in urls.values() for name in names)


@pytest.fixture
def file_server(tmp_path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on localhost serving the files of a temporary folder."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_fetch_keeps_a_download_whose_digest_matches_its_name(file_server, tmp_path) -> None:
    base, root = file_server
    payload = os.urandom(3 * 2**20 + 17)  # several read chunks
    name = f"net-{hashlib.sha256(payload).hexdigest()[:10]}.pth"
    (root / name).write_bytes(payload)
    dest = tmp_path / "checkpoints"
    dest.mkdir()
    path = fetch_face_weights.fetch(f"{base}/{name}", dest)
    assert path == dest / name and path.read_bytes() == payload
    assert [p.name for p in dest.iterdir()] == [name]


def test_fetch_deletes_a_download_whose_digest_does_not_match(file_server, tmp_path) -> None:
    base, root = file_server
    (root / "net-0123456789.pth").write_bytes(b"not the weights")
    dest = tmp_path / "checkpoints"
    dest.mkdir()
    with pytest.raises(RuntimeError, match="does not start with 0123456789"):
        fetch_face_weights.fetch(f"{base}/net-0123456789.pth", dest)
    assert list(dest.iterdir()) == []


def test_weights_are_taken_from_a_local_folder_held_to_their_digests(tmp_path, monkeypatch) -> None:
    """`--from DIR` (the face-weights-src stage) where the download host cannot be reached: files
    found there are copied when their digest matches their name, refused when not; a file missing
    there would be downloaded."""
    payloads = {name: os.urandom(2**20 + 3) for name in ("s3fd", "2DFAN-4")}
    source = tmp_path / "source"
    source.mkdir()
    urls = {}
    for name, payload in payloads.items():
        file_name = f"{name}-{hashlib.sha256(payload).hexdigest()[:10]}.pth"
        (source / file_name).write_bytes(payload)
        urls[name] = f"http://unreachable.invalid/{file_name}"
    monkeypatch.setattr(fetch_face_weights, "FACE_ALIGNMENT_WEIGHTS", urls)
    monkeypatch.setattr(fetch_face_weights, "fetch", lambda *a: pytest.fail("downloaded a local file"))
    dest = tmp_path / "checkpoints"
    assert fetch_face_weights.main([str(dest), "--from", str(source)]) == 0
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == {
        p.name: p.read_bytes() for p in source.iterdir()
    }

    (source / urls["s3fd"].rsplit("/", 1)[-1]).write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="does not start with"):
        fetch_face_weights.main([str(tmp_path / "again"), "--from", str(source)])


# -- health check --------------------------------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[int]:
    """A real HTTP server answering /livez 200 and /readyz 503 (a loading service)."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response({"/livez": 200, "/readyz": 503}.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _healthcheck(port: int, route: str) -> int:
    env = {**os.environ, "FERMAM_PORT": str(port)}
    return subprocess.run(
        [sys.executable, DOCKER / "healthcheck.py", route], env=env, capture_output=True
    ).returncode


def test_healthcheck_passes_on_200_and_fails_on_503(health_server) -> None:
    assert _healthcheck(health_server, "/livez") == 0
    assert _healthcheck(health_server, "/readyz") == 1


def test_healthcheck_fails_when_nothing_listens(health_server) -> None:
    with __import__("socket").socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    assert _healthcheck(free_port, "/readyz") == 1


# -- offline smoke check -------------------------------------------------------------------------


@pytest.fixture
def cpu_image_environment(build_settings, weights_path) -> None:
    """The CPU image's settings, with the FERMam weights the service tests use."""
    build_settings(
        {"FERMAM_DEVICE": "cpu", "FERMAM_FACE_BACKEND": "dlib", "FERMAM_WEIGHTS": str(weights_path)}
    )


@pytest.mark.slow
def test_smoke_check_passes_with_the_cpu_image_settings(cpu_image_environment, capsys) -> None:
    """It loads the models, then starts `fermam serve` and gets one face for the sample photo."""
    assert load_script("smoke_check").main([]) == 0
    out = capsys.readouterr().out
    assert "face backend: dlib" in out
    assert "fermam serve: grace_hopper.jpg -> one face" in out and "stopped cleanly on SIGTERM" in out


@pytest.mark.slow
def test_smoke_check_fails_when_the_served_photo_gets_no_face(cpu_image_environment, capsys) -> None:
    no_face = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "photos" / "grass_no_face.jpg"
    assert load_script("smoke_check").main(["--photo", str(no_face)]) == 1
    assert '"faces":[]' in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="where CUDA runs, mamba-ssm may import")
def test_smoke_check_fails_an_image_without_mamba_kernel(cpu_image_environment, capsys) -> None:
    assert load_script("smoke_check").main(["--require-mamba"]) == 1
    assert "mamba-ssm's kernel does not import" in capsys.readouterr().err
