"""deploy/ fits together without containers (none run on the test machines): every file compose.yaml mounts exists,
every port and name agrees with Prometheus', Grafana's and instructd's configuration, and instructd's /metrics port is
the one server/config.py declares, wherever it is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from instructd.server.config import DEFAULT_METRICS_PORT

from .prometheus import DEPLOY

ROOT = DEPLOY.parent


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def mounts(service: dict) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) of a service's bind mounts."""
    pairs = [volume.split(":")[:2] for volume in service.get("volumes", [])]
    return {inside: host for host, inside in pairs if host.startswith(".")}


def container_ports(service: dict) -> set[int]:
    return {int(port.split(":")[-1]) for port in service.get("ports", [])}


def test_compose_builds_instructd_from_the_repositorys_dockerfile_stages():
    stages = re.findall(r"^FROM \S+ AS (\w+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    cpu, gpu = load("compose.yaml")["services"]["instructd"], load("compose.gpu.yaml")["services"]["instructd"]
    assert (DEPLOY / cpu["build"]["context"]).resolve() == ROOT
    assert [cpu["build"]["target"], gpu["build"]["target"]] == stages == ["cpu", "gpu"]


def test_the_metrics_port_is_the_declared_one_everywhere():
    services = load("compose.yaml")["services"]
    assert DEFAULT_METRICS_PORT in container_ports(services["instructd"])
    [job] = load("prometheus.yml")["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"instructd:{DEFAULT_METRICS_PORT}"]}]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.findall(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE) == [f"50051 {DEFAULT_METRICS_PORT}"] * 2
    # /metrics listens on loopback by default; in the container Prometheus' container must reach it
    assert dockerfile.count('"--metrics-host", "0.0.0.0"') == 2
    assert all(port.startswith("127.0.0.1:") for port in services["instructd"]["ports"])  # but not the world
    readme = (ROOT / "README.md").read_text()
    assert f"localhost:{DEFAULT_METRICS_PORT}/metrics" in readme and "9090/metrics" not in readme


def test_prometheus_gets_the_config_and_the_rules_it_names():
    prometheus = load("compose.yaml")["services"]["prometheus"]
    [config_path] = [arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file=")]
    files = mounts(prometheus)
    assert files[config_path] == "./prometheus.yml"
    for rules in load("prometheus.yml")["rule_files"]:  # relative to the config file, in the container too
        assert files[str(Path(config_path).parent / rules)] == f"./{rules}"
    for host in files.values():
        assert (DEPLOY / host).is_file(), host


def test_grafana_gets_the_datasource_and_the_dashboard_it_names():
    services = load("compose.yaml")["services"]
    grafana = services["grafana"]
    files = mounts(grafana)
    provisioning = DEPLOY / files["/etc/grafana/provisioning"]
    [datasource] = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    assert host in services and int(port) in container_ports(services[host])
    assert datasource["jsonData"]["timeInterval"] == load("prometheus.yml")["global"]["scrape_interval"]
    [provider] = yaml.safe_load((provisioning / "dashboards/instructd.yml").read_text())["providers"]
    dashboards = DEPLOY / files[provider["options"]["path"]]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"]) and (dashboards / home.name).is_file()

    dashboard = json.loads((dashboards / home.name).read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == datasource["uid"] for p in panels)
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
