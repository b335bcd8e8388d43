"""docker-compose.yml and its CPU override: valid Compose, and what they run is what we mean.

No Docker engine runs in CI, so the files are checked against the Compose specification's JSON
schema (the copy that check-jsonschema ships) and the settings they pass are built into the
service's own Settings object, as `fermam serve` would at start.
"""

from __future__ import annotations

import copy
import json
from importlib import resources

import jsonschema
import pytest
from deploy_helpers import (
    FERMAM_PREFIX,
    REPO,
    interpolate,
    load_compose,
    settings_fields,
    tagged_paths,
)

GPU_FILE = REPO / "docker-compose.yml"
CPU_FILE = REPO / "docker-compose.cpu.yml"


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)


def _errors(validator: jsonschema.protocols.Validator, document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("path", [GPU_FILE, CPU_FILE], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path, compose_validator) -> None:
    assert _errors(compose_validator, load_compose(path)) == []


def test_schema_check_catches_a_misspelt_gpu_reservation(compose_validator) -> None:
    broken = copy.deepcopy(load_compose(GPU_FILE))
    device = broken["services"]["fermam"]["deploy"]["resources"]["reservations"]["devices"][0]
    device["capabilites"] = device.pop("capabilities")
    assert any("capabilites" in error for error in _errors(compose_validator, broken))


def test_gpu_service_reserves_one_nvidia_gpu_and_uses_the_cuda_image() -> None:
    service = load_compose(GPU_FILE)["services"]["fermam"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_gpu_service_is_health_checked_restarted_and_log_rotated() -> None:
    service = load_compose(GPU_FILE)["services"]["fermam"]
    assert service["healthcheck"]["test"][-1] == "/readyz"
    assert (REPO / "docker" / "healthcheck.py").is_file()
    assert service["restart"] in {"always", "unless-stopped", "on-failure"}
    assert service["logging"]["driver"] == "json-file"
    assert {"max-size", "max-file"} <= set(service["logging"]["options"])


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in sorted(units, key=len, reverse=True):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    return float(duration)


def test_stop_grace_period_outlasts_the_drain(build_settings) -> None:
    service = load_compose(GPU_FILE)["services"]["fermam"]
    settings = build_settings(_container_environment(service))
    assert _seconds(service["stop_grace_period"]) > settings.drain_timeout_s


def _container_environment(*services: dict, host: dict[str, str] | None = None) -> dict[str, str]:
    """The FERMAM_* variables a container gets from these service definitions, later ones
    overriding earlier ones as Compose merges `environment` maps."""
    merged: dict[str, str] = {}
    for service in services:
        merged.update({k: interpolate(v, host) for k, v in service.get("environment", {}).items()})
    return {k: v for k, v in merged.items() if k.startswith(FERMAM_PREFIX)}


@pytest.mark.parametrize("path", [GPU_FILE, CPU_FILE], ids=lambda p: p.name)
def test_every_fermam_variable_is_a_setting(path) -> None:
    """Unknown FERMAM_* variables are ignored by the service, so a typo would pass silently."""
    environment = load_compose(path)["services"]["fermam"]["environment"]
    unknown = {name for name in environment if name.startswith(FERMAM_PREFIX)} - settings_fields()
    assert unknown == set()


def test_gpu_settings_build_a_valid_cuda_configuration(build_settings) -> None:
    settings = build_settings(_container_environment(load_compose(GPU_FILE)["services"]["fermam"]))
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.device == "cuda"
    assert settings.face_backend == "face-alignment"
    assert settings.api_keys == []


def test_host_variables_reach_the_settings(build_settings) -> None:
    service = load_compose(GPU_FILE)["services"]["fermam"]
    host = {"DETECT_MAX_BATCH_SIZE": "32", "API_KEYS": "first-key-123,second-key-456"}
    settings = build_settings(_container_environment(service, host=host))
    assert settings.detect_max_batch_size == 32
    assert settings.api_keys == ["first-key-123", "second-key-456"]


def test_cpu_override_runs_the_cpu_image_without_a_gpu(build_settings) -> None:
    gpu = load_compose(GPU_FILE)["services"]["fermam"]
    cpu = load_compose(CPU_FILE)["services"]["fermam"]
    assert (REPO / gpu["build"]["context"] / cpu["build"]["dockerfile"]).is_file()
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    # `!reset` drops the GPU file's reservation and CUDA build arguments instead of merging.
    reset = tagged_paths(CPU_FILE, "!reset")
    assert ("services", "fermam", "deploy", "resources", "reservations", "devices") in reset
    assert ("services", "fermam", "build", "args") in reset
    settings = build_settings(_container_environment(gpu, cpu))
    assert (settings.device, settings.dtype, settings.face_backend) == ("cpu", "float32", "dlib")


def test_monitoring_services_mount_files_that_exist() -> None:
    services = load_compose(GPU_FILE)["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    assert services["prometheus"]["image"].split(":")[1].startswith("v")  # pinned, not latest
    assert ":" in services["grafana"]["image"] and not services["grafana"]["image"].endswith(":latest")
