"""The benchmark scripts, run once each in smoke mode: they must keep working, not be fast.

No timing is asserted (CI shares its CPU); what is checked is that every request was answered,
that our server's stage breakdown came back from ``/metrics``, and that the FLOP count of a graph
whose arithmetic is known by hand comes out exactly.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from benchmarks.inference import count_flops
from benchmarks.load import PEERS_VENV, Sample, ratios_and_goals, summarize
from engine_build.build import build_engine
from tests.images import conjunctiva_rgba, encode
from tests.model_factory import make_test_model

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = make_test_model(tmp_path_factory.mktemp("bench-model") / "model.onnx", width=8)
    build_engine(model, "fp32", "onnxruntime", model.parent / "engines")
    return model


@pytest.fixture(scope="module")
def bench_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench-images")
    for seed in range(4):
        (directory / "crop_{}.png".format(seed)).write_bytes(encode(conjunctiva_rgba(seed=seed, red=150 + 20 * seed)))
    return directory


def run_script(module: str, args: List[str], timeout_seconds: float = 120.0) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module] + args, cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=timeout_seconds
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_flops_of_the_test_model_match_the_hand_count(bench_model: Path) -> None:
    width, side = 8, 112  # stride-2 stem on 224x224
    stem = side * side * width * (3 * 3 * 3)
    depthwise = side * side * width * (3 * 3)
    pointwise = side * side * width * width
    head = width
    flops = count_flops(bench_model, (3, 224, 224))
    assert flops["flops_per_image"] == 2 * (stem + depthwise + pointwise + head)
    assert flops["by_op"]["Gemm"] == 2 * head


def test_inference_smoke(bench_model: Path, bench_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "inference.json"
    run_script(
        "benchmarks.inference",
        ["--smoke", "--model", str(bench_model), "--engine-dir", str(bench_model.parent / "engines"), "--images", str(bench_images),
         "--threads", "1", "--out-json", str(out), "--out-md", str(tmp_path / "inference.md")],
    )
    report = json.loads(out.read_text())
    engines = {e["precision"]: e for e in report["engines"]}
    assert "fp32" in engines
    assert [row["batch"] for row in engines["fp32"]["rows"]] == [1, 2]
    assert all(row["median_ms"] > 0 and row["floor_ms"] > 0 for e in engines.values() for row in e["rows"])
    assert engines["fp32"]["file_size_bytes"] == bench_model.stat().st_size  # fp32 engine is a copy
    assert report["gemm"]["fp32_gflops"] > 0
    assert "| fp32 | onnxruntime |" in (tmp_path / "inference.md").read_text()


def _load_report(bench_model: Path, bench_images: Path, tmp_path: Path, servers: str) -> Dict[str, Any]:
    run_script(
        "benchmarks.load",
        ["--smoke", "--servers", servers, "--model", str(bench_model), "--engine-dir", str(bench_model.parent / "engines"),
         "--images", str(bench_images), "--out-dir", str(tmp_path), "--plot", str(tmp_path / "plot.png")],
        timeout_seconds=180.0,
    )
    return dict(json.loads((tmp_path / "load.json").read_text()))


@pytest.mark.slow
def test_load_smoke_ours_and_plain(bench_model: Path, bench_images: Path, tmp_path: Path) -> None:
    report = _load_report(bench_model, bench_images, tmp_path, "ours,plain")
    assert set(report["servers"]) == {"ours", "plain"}
    for name, result in report["servers"].items():
        assert [level["concurrency"] for level in result["levels"]] == [1, 4], name
        for level in result["levels"]:
            assert level["errors"] == 0 and level["ok"] == level["requests"], (name, level["statuses"])
        assert result["open_loop"]["requests"] > 0
    assert report["servers"]["ours"]["batching"]["decided"] is True  # the warm-up decision, from /v1/model
    stages = report["servers"]["ours"]["levels"][0]["stages"]
    assert stages["batches"] >= 1 and stages["inference_mean_ms"] > 0  # read back from /metrics
    assert report["summary"]["goals"]["no_errors_below_capacity"]["met"] is True
    # Same model file, same preprocessing: both servers give the same probability for one picture.
    assert report["summary"]["same_answer"]["max_abs_difference"] < 1e-6
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(not (PEERS_VENV / "bin" / "python").is_file(), reason="no .venv-peers (BentoML, LitServe): see benchmarks/peers/requirements.txt")
def test_load_smoke_bentoml_litserve_and_ours_batching_on(bench_model: Path, bench_images: Path, tmp_path: Path) -> None:
    report = _load_report(bench_model, bench_images, tmp_path, "bentoml,litserve,ours-batch-on")
    assert set(report["servers"]) == {"bentoml", "litserve", "ours-batch-on"}
    assert report["summary"]["same_answer"]["max_abs_difference"] < 1e-6
    for name, result in report["servers"].items():
        for level in result["levels"]:
            assert level["errors"] == 0 and level["ok"] == level["requests"], (name, level["statuses"])


def test_summary_percentiles_and_errors() -> None:
    samples = [Sample(200, ms / 1000.0) for ms in range(1, 101)] + [Sample(503, 0.001, "1"), Sample(0, 0.5, error="ReadTimeout")]
    summary = summarize(samples, wall_seconds=2.0)
    assert summary["ok"] == 100 and summary["errors"] == 2
    assert summary["statuses"] == {"200": 100, "503": 1, "ReadTimeout": 1}
    assert summary["throughput_rps"] == pytest.approx(50.0)
    assert summary["p50_ms"] == pytest.approx(50.5)


def test_ratios_and_goals() -> None:
    def server(rps_c16: float, p99_c1: float, p50_c1: float, errors: int = 0) -> Dict[str, Any]:
        return {
            "levels": [
                {"concurrency": 1, "throughput_rps": 10.0, "p50_ms": p50_c1, "p99_ms": p99_c1, "errors": 0},
                {"concurrency": 16, "throughput_rps": rps_c16, "p50_ms": 50.0, "p99_ms": 90.0, "errors": errors},
            ]
        }

    results = {"ours": server(300.0, 12.0, 10.0), "plain": server(150.0, 24.0, 9.0), "bentoml": server(310.0, 30.0, 20.0)}
    summary = ratios_and_goals(results, raw_ms=8.5, concurrency_ratio=16)
    assert summary["ratios"]["plain"] == {"throughput_c16": 2.0, "p99_c1": 0.5}
    goals = summary["goals"]
    assert goals["single_request"]["met"] is True  # 10.0 <= 8.5 + 2
    assert goals["throughput_c16"]["plain"]["met"] is True
    assert goals["throughput_c16"]["bentoml"]["met"] is False  # behind BentoML
    assert goals["no_errors_below_capacity"]["met"] is True


def test_edge_attacks_smoke(model_path: Path, tmp_path: Path) -> None:
    from tests.reliability.corpus import valid_png

    image = tmp_path / "eye.png"
    image.write_bytes(valid_png())
    out = tmp_path / "edge.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.edge_attacks", "--model", str(model_path), "--image", str(image),
         "--attacks", "slow-bodies,header-flood", "--requests", "2", "--settle-s", "1", "--out-json", str(out)],
        cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["attack"] for row in rows] == ["slow-bodies", "header-flood"]
    assert all(row["holds"] and row["predict_200"] == 2 for row in rows)


WRK_OUTPUT = """Running 15s test @ http://127.0.0.1:8000
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    52.10ms   10.02ms 120.33ms   70.00%
    Req/Sec   307.12     20.11   350.00     68.00%
  Latency Distribution
     50%   51.20ms
     75%   57.00ms
     90%    1.20s
     99%  850.00us
  4601 requests in 15.02s, 1.90MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:    306.33
Transfer/sec:    129.70KB
"""


def test_wrk_report_is_parsed() -> None:
    from benchmarks.wrk_load import parse_wrk

    parsed = parse_wrk(WRK_OUTPUT)
    assert parsed["throughput_rps"] == pytest.approx(306.33) and parsed["requests"] == 4601
    assert parsed["wall_seconds"] == pytest.approx(15.02)
    assert (parsed["p50_ms"], parsed["p90_ms"], parsed["p99_ms"]) == (pytest.approx(51.2), pytest.approx(1200.0), pytest.approx(0.85))
    assert parsed["non_2xx"] == 7 and parsed["socket_errors"] == 3


def test_profile_budget_splits_thread_cpu_by_stage_samples() -> None:
    import collections

    from benchmarks.profile_stages import budget, classify

    assert classify(["run (uvicorn/main.py:1)", "prepare_request (service/app.py:2)", "decode_image (service/preprocess.py:3)"]) == "decode"
    assert classify(["Thread.run", "MicroBatcher._infer (service/batching.py:1)", "Session.run (onnxruntime/capi/onnxruntime_inference_collection.py:406)"]) == "engine"
    names = {1: "MainThread", 2: "inference"}
    samples = {1: collections.Counter({"HTTP": 3, "JSON": 1}), 2: collections.Counter({"engine": 1})}
    result = budget({1: 0.4, 2: 0.3, 3: 0.1}, names, samples, requests=100)  # thread 3: no Python frames
    assert result["cpu_ms_per_request"] == pytest.approx(8.0)
    assert result["cpu_ms_per_request_by_stage"] == {"HTTP": pytest.approx(3.0), "engine": pytest.approx(4.0), "JSON": pytest.approx(1.0)}
    assert result["cpu_ms_per_request_by_thread"]["ONNX Runtime pool"] == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (Debian package 'wrk'; .ci/run installs it)")
def test_wrk_smoke_ours_and_plain(bench_model: Path, bench_images: Path, tmp_path: Path) -> None:
    run_script(
        "benchmarks.wrk_load",
        ["--smoke", "--servers", "ours,ours-raw,plain-engine", "--precision", "fp32", "--concurrency", "1,4", "--model", str(bench_model),
         "--engine-dir", str(bench_model.parent / "engines"), "--images", str(bench_images), "--out-dir", str(tmp_path)],
        timeout_seconds=180.0,
    )
    report = json.loads((tmp_path / "wrk.json").read_text())
    assert set(report["servers"]) == {"ours", "ours-raw", "plain-engine"}
    for name, result in report["servers"].items():
        assert [level["concurrency"] for level in result["levels"]] == [1, 4], name
        for level in result["levels"]:
            assert level["requests"] > 0 and level["non_2xx"] == 0 and level["socket_errors"] == 0, (name, level["wrk_output"])
            assert level["server_cpu_ms_per_request"] > 0
        assert result["rss_after_warmup_bytes"] > 0
    assert report["servers"]["ours"]["model"]["threads"]["sources"]["intra_op_threads"] == "machine"
    assert report["servers"]["ours"]["levels"][0]["stages"]["inference_mean_ms"] > 0
    assert report["servers"]["ours-raw"]["overhead"]["requests"] == 5 and report["servers"]["ours"]["overhead"]["overhead_p50_ms"] > 0


def test_rss_workers_smoke(bench_model: Path, bench_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "rss.json"
    table = run_script(
        "benchmarks.rss_workers",
        ["--smoke", "--configurations", "1-worker-no-idle,2-workers-no-idle", "--model", str(bench_model),
         "--engine-dir", str(bench_model.parent / "engines"), "--images", str(bench_images), "--out-json", str(out)],
    )
    rows = json.loads(out.read_text())["rows"]
    assert [(row["configuration"], row["engine_workers"], row["idle_session"]) for row in rows] == [
        ("1-worker-no-idle", 1, False),
        ("2-workers-no-idle", 2, False),
    ]
    assert all(row["rss_after_requests_mb"] > 0 and row["peak_rss_mb"] >= row["rss_after_requests_mb"] for row in rows)
    assert table.count("\n") == 4  # header, rule, two rows
