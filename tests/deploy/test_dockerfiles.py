"""The Dockerfiles, read with BuildKit's own parser: what they copy exists and reaches the build
context, the runtime stages are what the deployment relies on (non-root, health check on
/readyz, offline start proven at build time), and their settings are valid service settings."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from deploy_helpers import FERMAM_PREFIX, REPO, dockerfile_commands, settings_fields

CUDA_DOCKERFILE = REPO / "docker" / "Dockerfile"
CPU_DOCKERFILE = REPO / "docker" / "Dockerfile.cpu"
SHIPPED_WEIGHTS = "model/weights/fermam-ferplus.safetensors"


class Stage:
    """One build stage: its base, name, and instructions."""

    def __init__(self, base: str, name: str | None) -> None:
        self.base, self.name, self.commands = base, name, []

    def values(self, instruction: str) -> list[tuple[str, ...]]:
        return [c.value for c in self.commands if c.cmd == instruction]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage (BuildKit gives them as a flat key, value list)."""
        pairs: dict[str, str] = {}
        for value in self.values("ENV"):
            pairs.update(zip(value[0::2], value[1::2], strict=True))
        return pairs


def read_stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (with earlier ARGs in them resolved, as Docker does) and the stages,
    with ${ARG} in FROM lines resolved to those public defaults."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []

    def resolve(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], text)

    for command in dockerfile_commands(path):
        if command.cmd == "FROM":
            base = resolve(command.value[0])
            name = command.value[2] if len(command.value) == 3 and command.value[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            global_args[name] = resolve(default)
        elif stages:
            stages[-1].commands.append(command)
    return global_args, stages


def stage_args(stage: Stage) -> dict[str, str]:
    args = {}
    for value in stage.values("ARG"):
        name, _, default = value[0].partition("=")
        args[name] = default.strip('"')
    return args


def _dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().lstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern (Go filepath.Match plus `**`) as a regex."""
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out + r"\Z")


def excluded_from_context(relative_path: str) -> bool:
    """Whether .dockerignore keeps this path (or a folder above it) out of the build context."""
    parts = relative_path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    patterns = [_ignore_regex(pattern) for pattern in _dockerignore_patterns()]
    return any(pattern.match(prefix) for pattern in patterns for prefix in prefixes)


@pytest.mark.parametrize("path", [CUDA_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_every_copied_path_exists_in_the_build_context(path) -> None:
    sources = []
    for command in dockerfile_commands(path):
        if command.cmd in {"COPY", "ADD"} and not any(f.startswith("--from=") for f in command.flags):
            sources += list(command.value[:-1])
    assert sources, "no COPY found: parser or file changed"
    for source in sources:
        assert list(REPO.glob(source.rstrip("/"))), f"{path.name} copies missing {source}"
        assert not excluded_from_context(source), f"{path.name} copies {source}, which .dockerignore drops"


def test_dockerignore_keeps_the_shipped_weights_and_drops_local_state() -> None:
    assert not (REPO / ".dockerignore").read_text().count("\n!"), "negations are not modelled by this test"
    assert not excluded_from_context(SHIPPED_WEIGHTS)
    assert not excluded_from_context("service/http/app.py")
    local_state = (".venv/bin/python", ".git/HEAD", "service/__pycache__/cli.cpython-311.pyc", "runs/a/log")
    for local in local_state:
        assert excluded_from_context(local), local


def test_cuda_image_builds_and_runs_on_the_cpu_images_python_base() -> None:
    """No nvidia/cuda images (issue 27): torch's CUDA wheels carry the CUDA libraries, nvcc comes
    from NVIDIA's wheels at torch's own toolkit version and is gone before the runtime copies the
    venv; the NVIDIA Container Toolkit is told to mount the driver's compute libraries."""
    cuda_args, stages = read_stages(CUDA_DOCKERFILE)
    cpu_args, _ = read_stages(CPU_DOCKERFILE)
    by_name = {stage.name: stage for stage in stages}
    assert cuda_args["BASE_IMAGE"] == cpu_args["BASE_IMAGE"]
    assert by_name["build"].base == by_name["runtime-base"].base == cuda_args["BASE_IMAGE"]
    assert stages[-1].name == "runtime" and stages[-1].base == "runtime-base"
    assert not any("nvidia/cuda" in stage.base for stage in stages)
    runs = [" ".join(value) for value in by_name["build"].values("RUN")]
    (install,) = [run for run in runs if "cuda_toolkit.py requirement" in run]
    (kernel,) = [run for run in runs if "build_mamba_ssm.sh" in run]
    assert 'CUDA_HOME="$(python /opt/build/cuda_toolkit.py home)"' in kernel
    assert kernel.index("build_mamba_ssm.sh") < kernel.index("cuda_toolkit.py remove")
    assert runs.index(install) < runs.index(kernel)
    env = stages[-1].env()
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in env["NVIDIA_DRIVER_CAPABILITIES"]


def test_cuda_image_pins_cuda_torch_and_builds_the_kernel_for_ampere_ada_hopper() -> None:
    _, stages = read_stages(CUDA_DOCKERFILE)
    build = next(stage for stage in stages if stage.name == "build")
    args = stage_args(build)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX"])
    # Same release as CI's CPU torch, so what CI tests is what the image runs.
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    shipped = {arch.removesuffix("+PTX") for arch in args["CUDA_ARCHS"].split()}
    assert {"8.0", "8.6", "8.9", "9.0"} <= shipped
    copied = " ".join(" ".join(v) for v in build.values("COPY"))
    assert "docker/fatbin_archs.py" in copied  # the script's proof of the architectures built
    runs = " ".join(" ".join(v) for v in build.values("RUN"))
    assert 'build_mamba_ssm.sh "${CUDA_ARCHS}"' in runs
    assert "pip install --no-deps /opt/wheels/mamba_ssm-" in runs


def test_cpu_image_uses_cpu_torch_on_python_slim() -> None:
    _, stages = read_stages(CPU_DOCKERFILE)
    assert [stage.base for stage in stages[:-1]] == ["scratch"]  # the empty torch-wheels default
    assert stages[-1].base.startswith("python:3.11-slim")
    args = stage_args(stages[-1])
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]


@pytest.mark.parametrize("path", [CUDA_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_final_stage_runs_unprivileged_health_checked_and_proven_offline(path) -> None:
    final = read_stages(path)[1][-1]
    users = final.values("USER")
    assert users and users[-1][0] not in {"root", "0"}
    (healthcheck,) = final.values("HEALTHCHECK")
    assert healthcheck[0] == "CMD" and healthcheck[-1] == "/readyz"
    copied = [c.value for c in final.commands if c.cmd == "COPY" and not c.flags]
    assert any("docker/healthcheck.py" in value for value in copied)
    offline = [c for c in final.commands if c.cmd == "RUN" and "--network=none" in c.flags]
    assert offline and "smoke_check.py" in " ".join(offline[-1].value)
    assert final.values("CMD")[-1] == ("fermam", "serve")


def resolved_env(stage: Stage) -> dict[str, str]:
    """The stage's ENV with ${ARG} replaced by the stage's ARG defaults, as a default build has it."""
    args = stage_args(stage)
    return {k: re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), v) for k, v in stage.env().items()}


def test_image_settings_are_valid_and_select_the_intended_backend(build_settings) -> None:
    cuda_env = resolved_env(read_stages(CUDA_DOCKERFILE)[1][-1])
    cpu_env = resolved_env(read_stages(CPU_DOCKERFILE)[1][-1])
    for env in (cuda_env, cpu_env):
        assert {k for k in env if k.startswith(FERMAM_PREFIX)} <= settings_fields()
    cuda = build_settings({k: v for k, v in cuda_env.items() if k.startswith(FERMAM_PREFIX)})
    assert (cuda.host, cuda.device, cuda.face_backend) == ("0.0.0.0", "cuda", "face-alignment")
    cpu = build_settings({k: v for k, v in cpu_env.items() if k.startswith(FERMAM_PREFIX)})
    assert (cpu.host, cpu.device, cpu.face_backend) == ("0.0.0.0", "cpu", "dlib")


def test_cuda_image_points_the_face_backend_at_the_weights_it_downloads(monkeypatch) -> None:
    from service.engine.faces import fan_backend

    _, stages = read_stages(CUDA_DOCKERFILE)
    env = resolved_env(stages[-1])
    # Where the face-alignment backend looks when no FERMAM_FACE_WEIGHTS_DIR is set (the image sets
    # none, so a FACE_BACKEND=dlib build reads dlib's weights from their package instead).
    monkeypatch.setenv("TORCH_HOME", env["TORCH_HOME"])
    weights_dir = str(fan_backend.default_weights_dir())
    assert weights_dir == env["TORCH_HOME"] + "/hub/checkpoints"
    assert "FERMAM_FACE_WEIGHTS_DIR" not in env
    assert env["FERMAM_FACE_BACKEND"] == "face-alignment"
    fetch = next(stage for stage in stages if stage.name == "face-weights")
    (run,) = [c for c in fetch.commands if c.cmd == "RUN"]
    # Fetched, or taken (digest-checked) from the face-weights-src stage where the host is unreachable.
    assert f"fetch_face_weights.py {weights_dir} --from /tmp/face-weights-src" in run.value[-1]
    assert "--mount=type=bind,from=face-weights-src,target=/tmp/face-weights-src" in run.flags
    assert stage_args(fetch)["FACE_BACKEND"] == "face-alignment"
    assert any("--from=face-weights" in c.flags for c in stages[-1].commands if c.cmd == "COPY")
    assert env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("path", [CUDA_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.name)
def test_builds_behind_a_proxy_with_public_defaults_unchanged(path) -> None:
    """Base images, the torch wheel source and the CA bundle are build arguments (docker/build_local.sh
    builds the CPU image with them where no registry is reachable); their defaults are the public
    images and indexes, and the CA bundle is a secret mount, never an ARG, ENV or COPY."""
    global_args, stages = read_stages(path)
    assert global_args["TORCH_WHEELS"] == "scratch"
    wheels = next(stage for stage in stages if stage.name == "torch-wheels")
    assert wheels.base == "scratch" and not wheels.commands
    assert not global_args["BASE_IMAGE"].startswith("fermam-local")
    if path == CUDA_DOCKERFILE:
        assert global_args["FACE_WEIGHTS"] == "scratch"
        weights = next(stage for stage in stages if stage.name == "face-weights-src")
        assert weights.base == "scratch" and not weights.commands
    torch_runs = [
        c
        for stage in stages
        for c in stage.commands
        if c.cmd == "RUN" and "torch==${TORCH_VERSION}" in " ".join(c.value)
    ]
    (torch_run,) = torch_runs
    assert "--mount=type=bind,from=torch-wheels,target=/tmp/torch-wheels" in torch_run.flags
    assert "--find-links /tmp/torch-wheels" in " ".join(torch_run.value)
    pip_runs = [
        c for stage in stages for c in stage.commands if c.cmd == "RUN" and "pip install" in " ".join(c.value)
    ]
    for run in [torch_run, *pip_runs]:
        assert "--mount=type=secret,id=ca_bundle,required=false" in run.flags, run.value
    text = path.read_text()
    assert "ca_bundle" not in " ".join(
        " ".join(c.value)
        for stage in stages
        for c in stage.commands
        if c.cmd in {"ARG", "ENV", "COPY", "ADD"}
    )
    assert "--network=none" in text  # what docker/build_local.sh strips for Docker < 23 only


def test_build_local_script_parses_and_builds_with_those_arguments() -> None:
    script = (REPO / "docker" / "build_local.sh").read_text()
    for argument in (
        "BASE_IMAGE=", "TORCH_WHEELS=", "TORCH_INDEX=", "--secret id=ca_bundle,src=",
        "CUDA_ARCHS=", "FACE_WEIGHTS=", "FACE_BACKEND=dlib", "FERMAM_DEVICE=cpu", "fatbin_archs.py",
    ):  # fmt: skip
        assert argument in script, argument
    assert subprocess.run(["bash", "-n", REPO / "docker" / "build_local.sh"]).returncode == 0
