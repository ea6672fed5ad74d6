"""The exposition passes promtool's lint, with the names and buckets the dashboards use."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest

from service.metrics import LATENCY_BUCKETS_SECONDS
from tests.support import post_image

EXPECTED = {
    "anemia_request_duration_seconds": "histogram",
    "anemia_stage_duration_seconds": "histogram",
    "anemia_batch_size": "histogram",
    "anemia_batch_limit": "gauge",
    "anemia_queue_depth": "gauge",
    "anemia_requests_in_flight": "gauge",
    "anemia_predictions_total": "counter",
    "anemia_errors_total": "counter",
    "anemia_model_info": "gauge",
    "anemia_ready": "gauge",
}


def exposition_after_traffic(client: Any, crop_png: bytes) -> str:
    assert post_image(client, crop_png).status_code == 200
    assert post_image(client, b"not an image").status_code == 415
    return str(client.get("/metrics").text)


def test_every_metric_is_exposed_with_its_type(client: Any, crop_png: bytes) -> None:
    text = exposition_after_traffic(client, crop_png)
    for name, kind in EXPECTED.items():
        base = name[: -len("_total")] if kind == "counter" else name
        # prometheus-client writes counters' TYPE line with or without _total, by version.
        assert "# TYPE {} {}".format(name, kind) in text or "# TYPE {} {}".format(base, kind) in text, name
    # Both latency histograms use the shared buckets, which span the README's 0.5 ms to 2 s.
    for histogram in ("anemia_request_duration_seconds", "anemia_stage_duration_seconds"):
        bounds = sorted({float(le) for le in re.findall(r'^{}_bucket{{[^}}]*le="([^"]+)"'.format(histogram), text, re.M)})
        assert bounds == sorted(list(LATENCY_BUCKETS_SECONDS) + [float("inf")]), histogram
        assert (bounds[0], bounds[-2]) == (0.0005, 2.0), histogram
    assert 'anemia_errors_total{code="unsupported_image"} 1.0' in text


def test_promtool_accepts_the_exposition(client: Any, crop_png: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; .ci/run installs it)")
    text = exposition_after_traffic(client, crop_png)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr
