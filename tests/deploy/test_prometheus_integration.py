"""A real Prometheus scrapes a real server (python -m service on loopback) and answers a p95.

Prometheus scrapes every 0.5 s and evaluates deploy/prometheus/rules/recording.yml, so the test also
exercises the recording rules' join onto anemia_model_info on live data. The p95 Prometheus returns
over the scraped buckets is compared with the quantile computed from the server's own /metrics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.promql import PROJECT_ROOT, RULE_FILES
from benchmarks.processes import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package `prometheus`; .ci/run installs it)"),
]
SCRAPE_INTERVAL = "500ms"  # Prometheus durations take no fractions ("0.5s" is refused)
P95_TOTAL_QUERY = 'histogram_quantile(0.95, sum by (le) (anemia_request_duration_seconds_bucket{endpoint="/v1/predict"}))'
P95_QUERY = 'histogram_quantile(0.95, sum by (le) (rate(anemia_request_duration_seconds_bucket{endpoint="/v1/predict"}[30s])))'




def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout_seconds: float,
    process: Optional[subprocess.Popen] = None,
    log_path: Optional[Path] = None,
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log = log_path.read_text()[-3000:] if log_path is not None else ""
            raise AssertionError("{}: the process exited with {}\n{}".format(what, process.returncode, log))
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("timed out after {} s waiting for {}".format(timeout_seconds, what))


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def server(model_path: Path, engine_dir: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = dict(
        os.environ,
        HOST="127.0.0.1",
        PORT=str(port),
        ANEMIA_MODEL=str(model_path),
        ANEMIA_ENGINE_DIR=str(engine_dir),
        ANEMIA_BACKEND="onnxruntime",
        ANEMIA_PRECISION="fp32",
        ANEMIA_TEGRASTATS="0",
        ANEMIA_INTRA_OP_THREADS="1",
        ANEMIA_PREPROCESS_THREADS="1",
        ANEMIA_LOG_LEVEL="warning",
    )
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = "http://127.0.0.1:{}".format(port)
    try:
        wait_for("the server's /readyz", lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, 30, process, tmp_path / "server.log")
        yield url
    finally:
        stop(process)
        log.close()


@pytest.fixture
def prometheus(server: str, tmp_path: Path) -> Iterator[str]:
    assert PROMETHEUS is not None
    port = free_port()
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(path) for path in RULE_FILES],
        "scrape_configs": [{"job_name": "anemia", "static_configs": [{"targets": [server.split("//")[1]]}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            "--config.file={}".format(config_path),
            "--storage.tsdb.path={}".format(tmp_path / "tsdb"),
            "--web.listen-address=127.0.0.1:{}".format(port),
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = "http://127.0.0.1:{}".format(port)
    try:
        wait_for("Prometheus /-/ready", lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, 30, process, tmp_path / "prometheus.log")
        yield url
    finally:
        stop(process)
        log.close()


def query(prometheus: str, expr: str) -> List[Tuple[Dict[str, str], float]]:
    response = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=5)
    payload = response.json()
    assert payload["status"] == "success", payload
    return [(item["metric"], float(item["value"][1])) for item in payload["data"]["result"]]


def predict_buckets(server: str) -> Dict[float, float]:
    """Cumulative /v1/predict bucket counts (all statuses) from the server's own /metrics."""
    buckets: Dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(server + "/metrics", timeout=5).text):
        for sample in family.samples:
            if sample.name == "anemia_request_duration_seconds_bucket" and sample.labels["endpoint"] == "/v1/predict":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def quantile_from_buckets(q: float, cumulative: Dict[float, float]) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q*total."""
    bounds = sorted(cumulative)
    total = cumulative[math.inf]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        if cumulative[bound] >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (cumulative[bound] - lower_count)
        lower_bound, lower_count = bound, cumulative[bound]
    raise AssertionError("unreachable")


def scraped_count(prometheus: str) -> float:
    results = query(prometheus, 'sum(anemia_request_duration_seconds_count{endpoint="/v1/predict"})')
    return results[0][1] if results else -1.0


def test_prometheus_returns_p95_of_the_running_service(server: str, prometheus: str, crop_png: bytes) -> None:
    wait_for("the first scrape", lambda: [v for _, v in query(prometheus, 'up{job="anemia"}')] == [1.0], 15)

    def send(count: int) -> None:
        with httpx.Client(base_url=server, timeout=10) as client:
            for _ in range(count):
                response = client.post("/v1/predict", files={"image": ("eye.png", crop_png, "image/png")})
                assert response.status_code == 200, response.text

    # The series appears with the first prediction; rate() counts increases after its first sample,
    # so a first wave creates it and the measured wave comes after Prometheus has seen it.
    send(1)
    wait_for("the first prediction in Prometheus", lambda: scraped_count(prometheus) == 1.0, 10)
    before = predict_buckets(server)
    send(30)
    after = predict_buckets(server)
    wait_for("the 31 predictions in Prometheus", lambda: scraped_count(prometheus) == 31.0, 10)

    # What the dashboard plots: p95 of the rate. rate() extrapolates each bucket series by its own
    # first value, so it only approximates the quantile of the 30 new observations.
    results = query(prometheus, P95_QUERY)
    assert len(results) == 1
    p95_rate_seconds = results[0][1]
    largest_bound = max(b for b in after if not math.isinf(b))
    assert 0.0 < p95_rate_seconds <= largest_bound
    assert after[math.inf] - before[math.inf] == 30.0

    # Exactly: histogram_quantile over the scraped cumulative buckets equals the quantile of the
    # server's own bucket counts.
    results = query(prometheus, P95_TOTAL_QUERY)
    assert len(results) == 1
    assert results[0][1] == pytest.approx(quantile_from_buckets(0.95, after), rel=1e-9)
    print("p95 /v1/predict: rate-based {:.4f} s, cumulative {:.4f} s".format(p95_rate_seconds, results[0][1]))

    # The recording rule (joined onto anemia_model_info for the precision label) agrees.
    def recorded() -> bool:
        rows = query(prometheus, "precision:anemia_predict_duration_seconds:p95_5m")
        return len(rows) == 1 and rows[0][0].get("precision") == "fp32" and not math.isnan(rows[0][1])

    wait_for("the recorded p95", recorded, 10)
    stage_rows = query(prometheus, "stage_precision:anemia_stage_duration_seconds:p95_5m")
    assert {row[0]["stage"] for row in stage_rows if not math.isnan(row[1])} >= {"inference", "preprocess"}
    assert all(row[0]["precision"] == "fp32" for row in stage_rows)


def test_the_shipped_scrape_job_reads_metrics_over_https_with_the_token(model_path: Path, engine_dir: Path, tmp_path: Path) -> None:
    """deploy/prometheus/prometheus.yml's job (scheme, CA, bearer credentials file) against a
    server with generated credentials, as compose runs them; without the token the target is down."""
    assert PROMETHEUS is not None
    port = free_port()
    credentials, scrape = tmp_path / "credentials", tmp_path / "scrape"
    env = dict(
        os.environ, HOST="127.0.0.1", PORT=str(port), ANEMIA_MODEL=str(model_path), ANEMIA_ENGINE_DIR=str(engine_dir),
        ANEMIA_BACKEND="onnxruntime", ANEMIA_TEGRASTATS="0", ANEMIA_INTRA_OP_THREADS="1", ANEMIA_LOG_LEVEL="warning",
        ANEMIA_CREDENTIALS_DIR=str(credentials), ANEMIA_SCRAPE_DIR=str(scrape),
    )
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "service"], cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    prometheus_process = None
    try:
        url = "https://127.0.0.1:{}".format(port)
        wait_for("the HTTPS server", lambda: httpx.get(url + "/readyz", verify=False, timeout=2).status_code == 200, 60, server, tmp_path / "server.log")
        shipped = yaml.safe_load((PROJECT_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
        job = {key: shipped[key] for key in ("job_name", "metrics_path", "scheme", "tls_config", "authorization")}
        job = json.loads(json.dumps(job).replace("/etc/prometheus/anemia/", str(scrape) + "/"))
        job["static_configs"] = [{"targets": ["127.0.0.1:{}".format(port)]}]
        no_token = dict(job, job_name="anemia-no-token")
        del no_token["authorization"]
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump({"global": {"scrape_interval": SCRAPE_INTERVAL}, "scrape_configs": [job, no_token]}))
        prometheus_port = free_port()
        prometheus_log = open(tmp_path / "prometheus.log", "w")
        prometheus_process = subprocess.Popen(
            [PROMETHEUS, "--config.file={}".format(config_path), "--storage.tsdb.path={}".format(tmp_path / "tsdb"),
             "--web.listen-address=127.0.0.1:{}".format(prometheus_port), "--log.level=warn"],
            stdout=prometheus_log, stderr=subprocess.STDOUT,
        )
        prometheus_url = "http://127.0.0.1:{}".format(prometheus_port)
        wait_for("Prometheus /-/ready", lambda: httpx.get(prometheus_url + "/-/ready", timeout=2).status_code == 200, 30, prometheus_process)

        def scraped() -> bool:
            rows = {row[0]["job"]: row[1] for row in query(prometheus_url, "up")}
            return rows.get("anemia") == 1.0 and rows.get("anemia-no-token") == 0.0

        wait_for("up == 1 with the token and 0 without", scraped, 15)
        assert query(prometheus_url, 'anemia_ready{job="anemia"}')[0][1] == 1.0
    finally:
        if prometheus_process is not None:
            stop(prometheus_process)
        stop(server)
        log.close()
