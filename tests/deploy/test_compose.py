"""deploy/compose.yaml structure (the docker CLI here has no compose plugin, so no `config`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

import pytest
import yaml

from tests.deploy.promql import DEPLOY_DIR, PROJECT_ROOT

COMPOSE = DEPLOY_DIR / "compose.yaml"
_DEFAULT = re.compile(r"\$\{(\w+)(?::?-([^}]*)|:\?[^}]*)?\}")


def with_defaults(value: str, env: Dict[str, str]) -> str:
    """Compose's ${VAR:-default} interpolation, with ``env`` standing in for the shell."""
    return _DEFAULT.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value)


@pytest.fixture(scope="module")
def compose() -> Dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_images(compose: Dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"anemia", "prometheus", "grafana"}
    build = services["anemia"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == PROJECT_ROOT
    assert (PROJECT_ROOT / with_defaults(build["dockerfile"], {})).name == "Dockerfile.jetson"
    # the default target exists in the default Dockerfile, and the x86 env file's target in its file
    jetson = (PROJECT_ROOT / "Dockerfile.jetson").read_text()
    assert re.search(r"^FROM .* AS {}$".format(with_defaults(build["target"], {})), jetson, re.M)
    x86_env = dict(line.split("=", 1) for line in (DEPLOY_DIR / "x86-cpu.env").read_text().splitlines() if line and not line.startswith("#"))
    x86 = (PROJECT_ROOT / with_defaults(build["dockerfile"], x86_env)).read_text()
    assert re.search(r"^FROM .* AS {}$".format(with_defaults(build["target"], x86_env)), x86, re.M)
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.match(r"^[\w./-]+:v?\d+\.\d+\.\d+$", image), "{} must pin a version: {}".format(name, image)


def test_ports(compose: Dict[str, Any]) -> None:
    ports = {name: [with_defaults(p, {}) for p in service["ports"]] for name, service in compose["services"].items()}
    # Prometheus only on the box's loopback: its API is not for the clinic Wi-Fi.
    assert ports == {"anemia": ["8000:8000"], "prometheus": ["127.0.0.1:9090:9090"], "grafana": ["3000:3000"]}


def test_https_and_a_key_by_default(compose: Dict[str, Any]) -> None:
    anemia = compose["services"]["anemia"]
    env = anemia["environment"]
    mounts = {with_defaults(v, {}).split(":")[1]: with_defaults(v, {}).split(":")[0] for v in anemia["volumes"]}
    assert mounts[env["ANEMIA_CREDENTIALS_DIR"]] in compose["volumes"]  # a named volume: kept across upgrades
    assert mounts[env["ANEMIA_SCRAPE_DIR"]] in compose["volumes"]
    assert with_defaults(env["ANEMIA_API_KEY"], {}) == ""  # empty: the generated key
    assert anemia["ulimits"]["nofile"]["soft"] >= 4096
    prometheus = compose["services"]["prometheus"]
    assert not any("lifecycle" in flag for flag in prometheus["command"])
    scrape_mount = [v for v in prometheus["volumes"] if v.startswith(mounts[env["ANEMIA_SCRAPE_DIR"]] + ":")]
    assert scrape_mount and scrape_mount[0].endswith(":ro")
    in_prometheus = scrape_mount[0].split(":")[1]
    job = yaml.safe_load((DEPLOY_DIR / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["scheme"] == "https"
    assert job["authorization"]["credentials_file"] == in_prometheus + "/metrics-token"
    assert job["tls_config"]["ca_file"] == in_prometheus + "/tls-cert.pem"
    assert "insecure_skip_verify" not in job["tls_config"]


def test_volumes_exist_and_are_declared(compose: Dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = with_defaults(volume, {}).split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), "{}: {} missing".format(name, source)
            elif not source.startswith("/"):
                assert source in declared, "{}: volume {} not declared".format(name, source)
    anemia = [with_defaults(v, {}).split(":")[1] for v in compose["services"]["anemia"]["volumes"]]
    assert "/var/lib/anemia/engines" in anemia  # engines persist across restarts
    assert compose["services"]["anemia"]["environment"]["ANEMIA_ENGINE_DIR"] == "/var/lib/anemia/engines"


def test_prometheus_and_grafana_mounts_match_their_config(compose: Dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((DEPLOY_DIR / "prometheus" / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["anemia:8000"]  # the compose service name and its container port
    grafana = compose["services"]["grafana"]
    provider = yaml.safe_load((DEPLOY_DIR / "grafana" / "provisioning" / "dashboards" / "anemia.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert "./grafana/dashboards:{}:ro".format(dashboards_path) in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    datasource = yaml.safe_load((DEPLOY_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_path) and (DEPLOY_DIR / "grafana" / "dashboards" / Path(home).name).exists()
    # no default admin password
    assert ":?" in grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]


def test_healthchecks(compose: Dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and check["retries"] >= 1, name
    anemia = compose["services"]["anemia"]["healthcheck"]
    assert anemia["test"] == ["CMD", "python", "/usr/local/bin/healthcheck.py"]
    assert "/readyz" in (PROJECT_ROOT / "deploy" / "docker" / "healthcheck.py").read_text()
    assert "/-/ready" in " ".join(compose["services"]["prometheus"]["healthcheck"]["test"])
    assert "/api/health" in " ".join(compose["services"]["grafana"]["healthcheck"]["test"])


def test_jetson_runtime_and_telemetry(compose: Dict[str, Any]) -> None:
    anemia = compose["services"]["anemia"]
    assert with_defaults(anemia["runtime"], {}) == "nvidia"
    assert with_defaults(anemia["environment"]["ANEMIA_TEGRASTATS"], {}) == "1"
    assert any(v.endswith(":/usr/bin/tegrastats:ro") for v in anemia["volumes"])
