"""The helper scripts the images run: the mamba-ssm gencode patch (against the real source
package), the weight fetcher, the health check and the offline smoke check, each run for real."""

from __future__ import annotations

import ast
import hashlib
import http.server
import importlib.util
import os
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
