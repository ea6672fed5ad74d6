"""Where a request's CPU goes in our server under load: a per-stage budget from py-spy and /proc.

Starts ``python -m service`` with its defaults (plus ``--env``), drives it with ``wrk`` pinned to
the last CPU at one concurrency, and meanwhile

- reads every server thread's CPU time from ``/proc/PID/task/TID/stat`` (before and after), and
- samples the Python stacks of every thread with ``py-spy record --threads`` (on-CPU samples).

Each thread's CPU per request is then split over the stages by the share of that thread's samples
whose innermost known frame belongs to the stage (``STAGES``); threads without Python frames
(ONNX Runtime's intra-op pool) count as engine. The sum is the server's CPU per request.

    python -m benchmarks.profile_stages --out-dir benchmarks/results/profile_int8_c16
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.load import DEFAULT_IMAGES, RunningServer, load_images, scrape, stage_breakdown
from benchmarks.processes import free_port
from benchmarks.wrk_load import load_average, parse_wrk, server_spec, write_script

#: (stage, substrings of a py-spy frame), checked from the innermost frame outwards; the first
#: frame that matches any stage names the sample's stage.
STAGES: List[Tuple[str, Tuple[str, ...]]] = [
    ("logging", ("logging/__init__.py", "logging_setup.py")),
    ("metrics", ("prometheus_client",)),
    ("engine", ("InferenceSession.run", "onnxruntime_inference_collection", "OnnxRuntimeBackend.infer")),
    ("decode", ("decode_image", "_to_rgb_and_alpha", "apply_orientation")),
    ("resize", ("resize_to_fit",)),
    ("normalisation", ("normalized_chw",)),
    ("ROI", ("roi_mask", "parse_roi_json", "preprocess_decoded", "_clip_polygon")),
    ("multipart", ("read_predict_form", "multipart", "formparsers", "Request.form", "_get_form", "UploadFile")),
    ("JSON", ("jsonable_encoder", "serialize_response", "JSONResponse", "serialize_json", "dump_json", "pydantic", "BaseModel")),
    (
        "queue hand-off",
        ("wrap_future", "run_in_executor", "call_soon_threadsafe", "_chain_future", "_call_set_state", "_copy_future_state",
         "set_result", "MicroBatcher", "submit_nowait", "queue.py", "concurrent/futures", "run_blocking"),
    ),
    ("HTTP", ("httptools", "uvicorn", "starlette", "fastapi", "service/app.py", "asyncio")),
]
ENGINE_POOL = "engine"  # threads py-spy saw no Python frame in: ONNX Runtime's own pool


def classify(frames: List[str]) -> str:
    for frame in reversed(frames):
        for stage, keys in STAGES:
            if any(key in frame for key in keys):
                return stage
    return "other"


def parse_raw(path: Path) -> Tuple[Dict[int, str], Dict[int, collections.Counter]]:
    """Thread names by id and, per thread, sample counts per stage, from py-spy's ``--format raw``."""
    names: Dict[int, str] = {}
    samples: Dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        match = re.match(r"thread \((0x[0-9a-f]+|\d+)\)(?:: (.*))?", frames[0])
        if not match:
            continue
        tid = int(match.group(1), 0)
        names[tid] = re.sub(r"_\d+$", "", match.group(2) or "?")
        samples[tid][classify(frames[1:])] += int(count)
    return names, samples


def thread_cpu(pid: int) -> Dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    out: Dict[int, float] = {}
    for task in Path("/proc/{}/task".format(pid)).iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def budget(cpu_seconds: Dict[int, float], names: Dict[int, str], samples: Dict[int, collections.Counter], requests: int) -> Dict[str, Any]:
    """CPU ms per request by thread and by stage."""
    by_thread: Dict[str, float] = collections.defaultdict(float)
    by_stage: Dict[str, float] = collections.defaultdict(float)
    for tid, seconds in cpu_seconds.items():
        ms = seconds / requests * 1000.0
        if ms <= 0:
            continue
        counted = samples.get(tid)
        name = names.get(tid, "ONNX Runtime pool" if counted is None else "?")
        by_thread[name] += ms
        if not counted:
            by_stage[ENGINE_POOL] += ms
            continue
        total = sum(counted.values())
        for stage, n in counted.items():
            by_stage[stage] += ms * n / total
    return {
        "cpu_ms_per_request_by_thread": dict(sorted(by_thread.items(), key=lambda kv: -kv[1])),
        "cpu_ms_per_request_by_stage": dict(sorted(by_stage.items(), key=lambda kv: -kv[1])),
        "cpu_ms_per_request": sum(by_thread.values()),
    }


def markdown(report: Dict[str, Any]) -> str:
    b = report["budget"]
    lines = [
        "wrk c={} for {:.0f} s: {:.1f} req/s, p50 {:.2f} ms, p99 {:.2f} ms, non-2xx {}; load average before: {}".format(
            report["concurrency"], report["seconds"], report["wrk"]["throughput_rps"], report["wrk"]["p50_ms"] or 0,
            report["wrk"]["p99_ms"] or 0, report["wrk"]["non_2xx"], report["loadavg_before"],
        ),
        "",
        "| stage | server CPU ms per request | share |",
        "|---|---:|---:|",
    ]
    total = b["cpu_ms_per_request"] or 1.0
    for stage, ms in b["cpu_ms_per_request_by_stage"].items():
        lines.append("| {} | {:.2f} | {:.0f} % |".format(stage, ms, 100.0 * ms / total))
    lines.append("| **total** | **{:.2f}** | |".format(b["cpu_ms_per_request"]))
    lines += ["", "| thread | CPU ms per request |", "|---|---:|"]
    for thread, ms in b["cpu_ms_per_request_by_thread"].items():
        lines.append("| {} | {:.2f} |".format(thread, ms))
    st = report.get("stages") or {}
    if st:
        lines += ["", "Stage wall times from `/metrics` (means, ms): " + ", ".join(
            "{} {:.2f}".format(k.replace("_mean_ms", ""), v) for k, v in st.items() if k.endswith("_mean_ms") and v is not None
        )]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Per-stage CPU budget of our server under wrk load (py-spy + /proc).")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--engine-dir", type=Path, default=None)
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for our server")
    parser.add_argument("--client-cpu", default=None)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists() or shutil.which("wrk") is None:
        print("needs py-spy (pip) and wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    from benchmarks.wrk_load import parse_args as wrk_args

    wargs = wrk_args(
        (["--model", str(args.model)] if args.model else []) + (["--engine-dir", str(args.engine_dir)] if args.engine_dir else [])
        + ["--precision", args.precision, "--ours-log-level", "info"] + sum((["--ours-env", e] for e in args.env), [])
        + (["--client-cpu", args.client_cpu] if args.client_cpu is not None else [])
    )
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    port = free_port()
    spec = server_spec("ours", port, wargs, wargs.model)
    server = RunningServer(spec, port, None, work / "ours.log")
    try:
        server.wait_ready(120.0)
        script = write_script(work, load_images(args.images, 64), spec.predict_path)
        base = ["wrk", "-t1", "-c{}".format(args.concurrency), "--latency", "-s", str(script), server.base_url]
        pin = ["taskset", "-c", wargs.client_cpu] if wargs.client_cpu else []
        subprocess.run(pin + base[:3] + ["-d3s"] + base[3:], capture_output=True, check=True, timeout=60)  # warm-up
        metrics_before = scrape(server.base_url, "/metrics")
        loadavg = load_average()
        cpu_before = thread_cpu(server.process.pid)
        started = time.monotonic()
        wrk = subprocess.Popen(pin + base[:3] + ["-d{}s".format(int(args.seconds))] + base[3:], stdout=subprocess.PIPE, text=True)
        raw = work / "py-spy.raw"
        subprocess.run(
            [py_spy, "record", "-p", str(server.process.pid), "-r", str(args.rate), "-d", str(max(1, int(args.seconds) - 2)),
             "--threads", "--nonblocking", "--format", "raw", "-o", str(raw)],
            capture_output=True, timeout=args.seconds + 60,
        )
        output, _ = wrk.communicate(timeout=args.seconds + 60)
        cpu_after = thread_cpu(server.process.pid)
        wall = time.monotonic() - started
        metrics_after = scrape(server.base_url, "/metrics")
    finally:
        server.stop()
    result = parse_wrk(output)
    names, samples = parse_raw(raw)
    cpu = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
    report: Dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "wall_seconds": wall,
        "loadavg_before": loadavg,
        "env": args.env,
        "wrk": result,
        "budget": budget(cpu, names, samples, max(1, result.get("requests", 1))),
        "stages": stage_breakdown(metrics_before, metrics_after),
        "samples_by_thread": {names.get(t, str(t)): dict(c) for t, c in samples.items()},
        "wrk_output": output,
    }
    text = markdown(report)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out_dir / "profile.md").write_text(text)
        shutil.copy(str(raw), str(args.out_dir / "py-spy.raw"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
