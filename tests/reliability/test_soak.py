"""A short soak through benchmarks/soak.py, as CI runs it: the full run's numbers are in
docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.server import PROJECT_ROOT


@pytest.mark.slow
def test_short_soak_has_no_5xx_and_bounded_memory(model_path: Path, engine_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.soak",
            "--requests=600",
            "--concurrency=8",
            "--model={}".format(model_path),
            "--engine-dir={}".format(engine_dir),
            "--server-env=ANEMIA_INTRA_OP_THREADS=1",
            "--max-seconds=60",
            # 150 requests a quarter are too few for a stable p99 on a shared 2-core runner; the full run checks it.
            "--max-p99-ratio=0",
            "--json={}".format(out),
        ],
        cwd=str(PROJECT_ROOT),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["statuses"] == {"200": 600} and summary["five_xx"] == 0 and not summary["transport_errors"]
    assert summary["rss_mb"]["growth_after_warmup"] < 50.0
    assert summary["server_log"]["error_lines"] == 0 and summary["server_log"]["not_json"] == 0
    assert summary["server_exit_code"] in (0, -15)  # uvicorn re-raises SIGTERM after a clean shutdown
    quarters = summary["quarters"]
    assert len(quarters) == 4 and all(0 < q["p50_ms"] <= q["p99_ms"] for q in quarters)
    # The ratio the full run gates on (off here) is the last quarter's p99 over the first's.
    assert summary["p99_last_over_first"] == round(quarters[3]["p99_ms"] / quarters[0]["p99_ms"], 3)
    print("short soak:", json.dumps({k: summary[k] for k in ("throughput_rps", "latency_ms", "p99_last_over_first", "rss_mb")}))


def test_the_p99_ratio_fails_the_soak_only_above_its_limit() -> None:
    from benchmarks.soak import verdict

    summary = {"completed": 10, "requests": 10, "five_xx": 0, "transport_errors": {}, "rss_mb": {"growth_after_warmup": 1.0}}
    drifting = dict(summary, p99_last_over_first=1.5)
    assert any("p99 of the last quarter is 1.5x" in failure for failure in verdict(drifting, 50.0, 1.2))
    assert verdict(drifting, 50.0, 2.0) == [] and verdict(drifting, 50.0, 0.0) == []  # 0 turns the check off
    assert verdict(dict(summary, p99_last_over_first=None), 50.0, 1.2) == []


def test_soak_refuses_to_start_without_a_model(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--requests=10", "--model={}".format(tmp_path / "none.onnx")],
        cwd=str(PROJECT_ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "not found" in result.stderr
