"""Prometheus and Grafana files: they parse, point at each other, and every series they query is
one the service's own metrics registry exposes (so a renamed metric breaks CI, not a dashboard)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from deploy_helpers import REPO, exposed_series, fermam_series_in, load_compose

PROMETHEUS = REPO / "docker" / "prometheus.yml"
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fermam.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_prometheus_scrapes_the_compose_service_metrics_route() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "fermam"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]
    services = load_compose(REPO / "docker-compose.yml")["services"]
    assert discovery["names"] == ["fermam"] and discovery["type"] == "A"
    assert discovery["port"] == int(services["fermam"]["environment"]["FERMAM_PORT"])
    seconds = {
        key: float(config["global"][key].removesuffix("s")) for key in ("scrape_timeout", "scrape_interval")
    }
    assert seconds["scrape_timeout"] < seconds["scrape_interval"]


def test_grafana_provisions_the_datasource_the_dashboard_uses(dashboard) -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    used = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    used |= {t["datasource"]["uid"] for panel in dashboard["panels"] for t in panel.get("targets", [])}
    assert used == {source["uid"]}
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fermam.yml").read_text())
    mounts = load_compose(REPO / "docker-compose.yml")["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{providers['providers'][0]['options']['path']}:ro" in mounts


def test_dashboard_layout_is_well_formed(dashboard) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        assert panel["type"] == "row" or panel.get("targets"), panel["title"]
    assert dashboard["uid"] and dashboard["title"]


def test_dashboard_covers_what_an_operator_needs(dashboard) -> None:
    """Request rate and errors, latency quantiles, queue depth, batch sizes per stage, faces per
    second, device memory: each must be charted."""
    text = "\n".join(_queries(dashboard))
    assert "rate(fermam_requests_total" in text and 'status=~"5.."' in text
    assert re.search(
        r"histogram_quantile\(0\.99, sum by \(le\) \(rate\(fermam_request_duration_seconds_bucket", text
    )
    assert "fermam_queue_depth" in text
    assert "sum by (stage) (rate(fermam_batch_size_sum" in text
    assert "rate(fermam_faces_total" in text
    assert "fermam_device_memory_bytes" in text


def test_dashboard_queries_only_series_the_service_exposes(dashboard) -> None:
    mentioned = set().union(*(fermam_series_in(query) for query in _queries(dashboard)))
    assert mentioned, "no fermam series found: the check would be empty"
    assert mentioned - exposed_series() == set()


def test_series_check_would_catch_a_renamed_metric() -> None:
    assert fermam_series_in("rate(fermam_faces_count[5m])") - exposed_series() == {"fermam_faces_count"}


@pytest.mark.parametrize("query_index", range(3))
def test_dashboard_queries_have_balanced_brackets(dashboard, query_index) -> None:
    """A cheap syntax guard (no PromQL parser is packaged for Python): (), {} and [] balance and
    never close out of order, outside string literals."""
    pairs = {")": "(", "}": "{", "]": "["}
    for query in _queries(dashboard)[query_index::3]:
        stack: list[str] = []
        for char in re.sub(r'"[^"]*"', '""', query):
            if char in "({[":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], query
        assert stack == [], query
