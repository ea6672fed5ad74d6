"""Prometheus config, rules and dashboard queries: valid for promtool and only naming metrics the
service really exposes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, List, Set

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.telemetry import TegrastatsMonitor
from tests.deploy.promql import (
    DASHBOARD_FILES,
    PROMETHEUS_DIR,
    PROMETHEUS_SYNTHETIC,
    RULE_FILES,
    dashboard_expressions,
    metric_names,
    recorded_names,
    rule_groups,
    substitute_grafana_variables,
)
from tests.support import XAVIER_NX_JP51

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`; .ci/run installs it)"
)


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=str(cwd), capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    # promtool opens the scrape credentials and CA: give it real ones where compose mounts them.
    from service.credentials import ensure_credentials

    scrape = tmp_path / "scrape"
    ensure_credentials(tmp_path / "credentials", scrape, names=["anemia"])
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    assert "/etc/prometheus/anemia/" in config
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/anemia/", str(scrape) + "/"))
    for name in ("rules", "fleet"):
        (tmp_path / name).symlink_to(PROMETHEUS_DIR / name)
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr
    # both rule files are loaded by the config
    assert "SUCCESS: {} rule files found".format(len(RULE_FILES)) in result.stdout


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", *[str(path) for path in RULE_FILES])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    # deploy/prometheus/tests/rules_test.yml: recorded p95/p50/error ratio values and alert timing
    result = promtool("test", "rules", "tests/rules_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: one recording rule per dashboard query.
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    rules = [{"record": "dashboard_query_{}".format(index), "expr": substitute_grafana_variables(expr)} for index, (_, expr) in enumerate(expressions)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: {} rules found".format(len(rules)) in result.stdout


@needs_promtool
def test_a_broken_expression_is_caught(tmp_path: Path) -> None:
    # The parse check above is only worth something if promtool rejects a bad query.
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "x", "expr": "sum by (le (rate(a[5m]))"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (job, le) (rate(anemia_x_bucket{endpoint="/v1/predict",a=~"b"}[5m])))'
        " * on (instance) group_left (precision) anemia_model_info > bool 0.5 or vector(1) unless up offset 5m"
    )
    assert metric_names(expr) == {"anemia_x_bucket", "anemia_model_info", "up"}


@pytest.fixture
def exposed_names(client: Any, crop_png: bytes) -> Set[str]:
    """Sample names in the real /metrics after a prediction and an error, plus the tegrastats gauges."""
    ok = client.post("/v1/predict", files={"image": ("eye.png", crop_png, "image/png")})
    assert ok.status_code == 200, ok.text
    bad = client.post("/v1/predict", files={"image": ("eye.png", b"not an image", "image/png")})
    assert bad.status_code >= 400
    text = client.get("/metrics").text
    registry = CollectorRegistry()
    telemetry = TegrastatsMonitor(registry)
    assert telemetry.update(XAVIER_NX_JP51)
    text += generate_latest(registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def _expressions() -> List[Any]:
    found = [("{} {}".format(path.name, rule.get("record") or rule.get("alert")), rule["expr"]) for path, rule in rule_groups()]
    return found + dashboard_expressions()


def test_every_metric_in_rules_and_dashboard_is_exposed(exposed_names: Set[str]) -> None:
    known = exposed_names | recorded_names() | PROMETHEUS_SYNTHETIC
    missing = {}
    used: Set[str] = set()
    for where, expr in _expressions():
        names = metric_names(expr)
        assert names, "no metric found in {}: {}".format(where, expr)
        used |= names
        unknown = names - known
        if unknown:
            missing[where] = sorted(unknown)
    assert not missing, "metrics not in /metrics nor recorded: {}".format(missing)
    # and the other way round: every service metric family is shown or alerted on somewhere
    families = {
        "anemia_request_duration_seconds", "anemia_stage_duration_seconds", "anemia_batch_size", "anemia_queue_depth",
        "anemia_requests_in_flight", "anemia_predictions_total", "anemia_errors_total", "anemia_model_info", "anemia_ready",
        "anemia_jetson_gpu_load_ratio", "anemia_jetson_cpu_load_ratio", "anemia_jetson_temperature_celsius", "anemia_jetson_power_watts",
    }
    unused = {family for family in families if not any(name == family or name.startswith(family + "_") for name in used)}
    assert not unused


def test_recording_rules_cover_percentiles_per_stage_and_precision() -> None:
    records = {rule["record"]: rule["expr"] for _, rule in rule_groups() if "record" in rule}
    for quantile in ("50", "95", "99"):
        expr = records["stage_precision:anemia_stage_duration_seconds:p{}_5m".format(quantile)]
        assert "histogram_quantile(0.{}".format(quantile) in expr
        assert "by (stage, precision, le)" in expr
    alerts = {rule["alert"] for _, rule in rule_groups() if "alert" in rule}
    assert {"AnemiaServiceNotReady", "AnemiaHighServerErrorRatio", "AnemiaPredictLatencyP95OverSLO"} <= alerts


def test_dashboard_uses_the_provisioned_datasource() -> None:
    provisioning = yaml.safe_load((PROMETHEUS_DIR.parent / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = provisioning["datasources"][0]["uid"]

    assert DASHBOARD_FILES
    for path in DASHBOARD_FILES:
        dashboard = json.loads(path.read_text())
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), "duplicate panel ids in {}".format(path.name)
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == uid, (path.name, panel["title"])
