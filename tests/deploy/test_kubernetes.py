"""The Kubernetes example: every manifest validates offline against the Kubernetes API schemas
that kubernetes-validate bundles (oldest and newest version we claim), and the pieces agree with
each other, with the image, and with the service's metrics and settings."""

from __future__ import annotations

import copy
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    FERMAM_PREFIX,
    REPO,
    exposed_series,
    fermam_series_in,
    load_yaml_documents,
    settings_fields,
)

K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
KUBERNETES_VERSIONS = ("1.30", "1.37")


def _resources() -> dict[str, dict]:
    return {
        doc["kind"]: doc
        for path in MANIFESTS
        for doc in load_yaml_documents(path)
        if doc["kind"] != "ConfigMap"
    }


def _config_maps() -> dict[str, dict]:
    docs = [doc for path in MANIFESTS for doc in load_yaml_documents(path)]
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "ConfigMap"}


def _container() -> dict:
    (container,) = _resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path, version) -> None:
    for document in load_yaml_documents(path):
        kubernetes_validate.validate(document, version, strict=True)


def test_schema_check_catches_a_misplaced_field() -> None:
    deployment = copy.deepcopy(_resources()["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_kustomization_applies_every_app_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    app = {path.name for path in MANIFESTS} - {"prometheus-adapter-config.yaml"}
    assert set(kustomization["resources"]) == app


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_renders_the_app() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(done.stdout))
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


def test_each_pod_gets_one_gpu_and_health_probes() -> None:
    container = _container()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = container["ports"][0]
    assert port["name"] == "http" and port["containerPort"] == 8000
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"


def test_pod_runs_as_the_image_user() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    spec = _resources()["Deployment"]["spec"]["template"]["spec"]
    assert f"--uid {spec['securityContext']['runAsUser']} " in dockerfile
    assert _container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_service_and_autoscaler_target_the_deployment() -> None:
    resources = _resources()
    deployment = resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert resources["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert resources["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = resources["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_settings_are_valid_and_shutdown_fits_the_grace_period(build_settings) -> None:
    settings_map = _config_maps()["fermam-settings"]["data"]
    container = _container()
    assert container["envFrom"][0]["configMapRef"]["name"] == "fermam-settings"
    variables = set(settings_map) | {
        e["name"] for e in container["env"] if e["name"].startswith(FERMAM_PREFIX)
    }
    assert variables <= settings_fields()
    settings = build_settings(settings_map)
    assert (settings.host, settings.device, settings.face_backend) == ("0.0.0.0", "cuda", "face-alignment")
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = _resources()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop + settings.drain_timeout_s < grace


def _adapter_rules() -> list[dict]:
    config = _config_maps()["prometheus-adapter"]["data"]["config.yaml"]
    return yaml.safe_load(config)["rules"]


def test_adapter_rules_query_only_series_the_service_exposes() -> None:
    for rule in _adapter_rules():
        mentioned = fermam_series_in(rule["seriesQuery"]) | fermam_series_in(rule["metricsQuery"])
        mentioned |= fermam_series_in(rule["name"]["matches"])
        assert mentioned and mentioned - exposed_series() == set(), rule["name"]["as"]
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def test_autoscaler_scales_on_queue_time_of_both_stages_as_the_adapter_names_it() -> None:
    from service.engine.pipeline import CLASSIFY_STAGE, DETECT_STAGE

    served = {rule["name"]["as"] for rule in _adapter_rules()}
    metrics = [m["pods"]["metric"] for m in _resources()["HorizontalPodAutoscaler"]["spec"]["metrics"]]
    assert {metric["name"] for metric in metrics} <= served
    queue_stages = {
        metric["selector"]["matchLabels"]["stage"]
        for metric in metrics
        if metric["name"] == "fermam_queue_wait_seconds_mean"
    }
    assert queue_stages == {DETECT_STAGE, CLASSIFY_STAGE}
