"""HTTP load from a compiled client: ``wrk`` pinned to its own core, servers as a new user starts them.

``benchmarks/load.py`` drives the servers from Python (httpx costs 1.6–3 ms of CPU per request, on
the server's cores in the shared layout). Here the client is ``wrk`` (Debian package ``wrk``), one
thread pinned with ``taskset`` to the last CPU, sending multipart uploads of real CP-AnemiC
pictures (a Lua script rotates through them). Every server runs with *its defaults*, unpinned on
all CPUs, as ``make serve`` or a tutorial would start it:

- ``ours``: ``python -m service`` with only the model, engine directory and precision set (INT8 is
  ``make serve``'s default);
- ``plain-engine``: the tutorial FastAPI server (``benchmarks/peers/plain_fastapi.py``) handed our
  engine file, ONNX Runtime's default threads;
- ``plain-fp32``: the same server on the FP32 model file, what a user without our engine runs.

Per server and concurrency: throughput, wrk's latency percentiles, non-2xx answers and socket
errors, server CPU per request (``/proc``), other load on the machine, RSS after the run and, for
ours, the stage breakdown from ``/metrics``. ``uptime``'s load averages are recorded before each run.

    python -m benchmarks.wrk_load --out-dir benchmarks/results/wrk_int8
    python -m benchmarks.wrk_load --smoke --out-dir /tmp/wrk-smoke      # CI, when wrk is installed
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks.load import (
    DEFAULT_IMAGES,
    DEFAULT_MODEL,
    PROJECT_ROOT,
    STANDIN_MODEL,
    RunningServer,
    ServerSpec,
    load_images,
    machine_busy_seconds,
    scrape,
    stage_breakdown,
)
from benchmarks.processes import free_port, ours_env

SERVERS = ("ours", "plain-engine", "plain-fp32")
#: Our server again, the picture sent as the whole body (Content-Type: image/png), not multipart.
RAW = "ours-raw"
KNOWN = SERVERS + (RAW,)
BOUNDARY = "----anemia-wrk-boundary"

LUA = r"""
-- Rotates through the multipart bodies written beside this script (body_1 .. body_N).
local bodies = {}
local n = %(count)d
for i = 1, n do
  local f = assert(io.open("%(directory)s/%(prefix)s" .. i, "rb"))
  bodies[i] = f:read("*all")
  f:close()
end
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "%(content_type)s"
request = function()
  i = (i %% n) + 1
  return wrk.format(nil, "%(path)s", nil, bodies[i])
end
"""


def multipart_body(name: str, data: bytes) -> bytes:
    head = (
        "--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{n}\"\r\nContent-Type: image/png\r\n\r\n"
    ).format(b=BOUNDARY, n=name).encode()
    return head + data + "\r\n--{}--\r\n".format(BOUNDARY).encode()


def write_script(directory: Path, images: Sequence[Tuple[str, bytes]], path: str, raw: bool = False) -> Path:
    """A wrk Lua script posting ``images`` in turn: multipart uploads, or with ``raw`` the bytes
    themselves as an ``image/png`` body (our server only)."""
    prefix = "raw_" if raw else "body_"
    for index, (name, data) in enumerate(images, start=1):
        (directory / "{}{}".format(prefix, index)).write_bytes(data if raw else multipart_body(name, data))
    script = directory / "post_{}{}.lua".format(path.strip("/").replace("/", "_"), "_raw" if raw else "")
    content_type = "image/png" if raw else "multipart/form-data; boundary={}".format(BOUNDARY)
    script.write_text(LUA % {"count": len(images), "directory": str(directory), "prefix": prefix, "content_type": content_type, "path": path})
    return script


def server_spec(name: str, port: int, args: argparse.Namespace, int8_engine: Path) -> ServerSpec:
    python = sys.executable
    if name in ("ours", RAW):
        env = ours_env(port, args.model, args.engine_dir, args.precision, ANEMIA_LOG_LEVEL=args.ours_log_level)
        env.update(dict(item.split("=", 1) for item in args.ours_env))
        return ServerSpec(name, [python, "-m", "service"], "/readyz", "/v1/predict", python, "/metrics", env)
    if name not in KNOWN:
        raise ValueError("unknown server {!r}; use {}".format(name, ", ".join(KNOWN)))
    engine = int8_engine if name == "plain-engine" else args.model
    command = [python, "-m", "uvicorn", "benchmarks.peers.plain_fastapi:app", "--host", "127.0.0.1", "--port", str(port)]
    # BENCH_ORT_THREADS=0: ONNX Runtime's own default, as the tutorial leaves it.
    return ServerSpec(name, command, "/healthz", "/predict", python, None, {"BENCH_MODEL": str(engine), "BENCH_ORT_THREADS": "0"})


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    if not match:
        raise ValueError("not a wrk duration: {!r}".format(text))
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> Dict[str, Any]:
    """Throughput, latency percentiles (``--latency``), request count and errors from wrk's report."""
    result: Dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    for percentile in ("50", "75", "90", "99"):
        match = re.search(r"^\s+{}%\s+(\S+)".format(percentile), output, re.M)
        result["p{}_ms".format(percentile)] = _ms(match.group(1)) if match else None
    match = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    if match:
        result["requests"] = int(match.group(1))
        result["wall_seconds"] = _ms(match.group(2) + match.group(3)) / 1000.0
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    result["throughput_rps"] = float(match.group(1)) if match else 0.0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if match:
        result["non_2xx"] = int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        result["socket_errors"] = sum(int(v) for v in match.groups())
    return result


def run_wrk(url: str, script: Path, concurrency: int, seconds: float, client_cpu: Optional[str]) -> Tuple[Dict[str, Any], str]:
    command = ["wrk", "-t1", "-c{}".format(concurrency), "-d{}s".format(max(1, int(round(seconds)))), "--latency", "--timeout", "30s", "-s", str(script), url]
    if client_cpu:
        command = ["taskset", "-c", client_cpu] + command
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError("wrk failed ({}): {}".format(done.returncode, done.stderr[-2000:]))
    return parse_wrk(done.stdout), done.stdout


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def bench_server(name: str, args: argparse.Namespace, int8_engine: Path, images: Sequence[Tuple[str, bytes]], work: Path) -> Dict[str, Any]:
    port = free_port()
    spec = server_spec(name, port, args, int8_engine)
    server = RunningServer(spec, port, None, work / "{}.log".format(name))
    result: Dict[str, Any] = {"name": name, "command": " ".join(spec.command), "env": spec.env, "levels": []}
    try:
        result["startup_seconds"] = server.wait_ready(args.ready_timeout)
        script = write_script(work, images, spec.predict_path, raw=name == RAW)
        url = server.base_url
        warm, _ = run_wrk(url, script, 4, args.warmup_seconds, args.client_cpu)
        if warm["non_2xx"] or warm["socket_errors"] or not warm.get("requests"):
            raise RuntimeError("{} warm-up failed: {}; log:\n{}".format(name, warm, server.log_tail()))
        result["rss_after_warmup_bytes"] = server.rss_bytes()[0]
        if spec.metrics_path:
            import httpx

            result["model"] = {k: v for k, v in httpx.get(url + "/v1/model", timeout=10).json().items() if k in ("threads", "batching")}
        for concurrency in args.concurrency:
            before = scrape(url, spec.metrics_path) if spec.metrics_path else None
            cpu_before, busy_before, loadavg = server.cpu_seconds(), machine_busy_seconds(), load_average()
            level, raw = run_wrk(url, script, concurrency, args.seconds, args.client_cpu)
            server_cpu = server.cpu_seconds() - cpu_before
            busy = machine_busy_seconds() - busy_before
            wall = level.get("wall_seconds") or args.seconds
            requests = max(1, level.get("requests", 0))
            level.update(
                {
                    "concurrency": concurrency,
                    "loadavg_before": loadavg,
                    "server_cpu_ms_per_request": server_cpu / requests * 1000.0,
                    "server_cpu_cores": server_cpu / wall,
                    # everything busy on the machine but the server: wrk itself plus any other load
                    "client_and_other_cores": max(0.0, busy - server_cpu) / wall,
                    "wrk_output": raw,
                }
            )
            if before is not None:
                level["stages"] = stage_breakdown(before, scrape(url, str(spec.metrics_path)))
            result["levels"].append(level)
            print(
                "{:13s} c={:<3d} {:7.1f} req/s  p50 {:.2f} ms  p99 {:.2f} ms  server CPU {:.2f} ms/req  non-2xx {}  load {}".format(
                    name, concurrency, level["throughput_rps"], level["p50_ms"] or 0, level["p99_ms"] or 0,
                    level["server_cpu_ms_per_request"], level["non_2xx"], loadavg,
                ),
                file=sys.stderr,
                flush=True,
            )
        if spec.metrics_path:
            result["overhead"] = stage_overhead(url + spec.predict_path, images, args.overhead_requests, raw=name == RAW)
        result["rss_bytes"], result["peak_rss_bytes"] = server.rss_bytes()
    finally:
        server.stop()
    return result


def stage_overhead(url: str, images: Sequence[Tuple[str, bytes]], requests: int, raw: bool = False) -> Dict[str, Any]:
    """One request at a time: p50 of the server's own stage timings (``latency_ms``) and of its
    overhead, total minus inference (HTTP, multipart, decode, preprocessing, hand-offs, JSON)."""
    import httpx

    rows: List[Dict[str, float]] = []
    with httpx.Client(timeout=30.0) as client:
        for index in range(requests):
            name, data = images[index % len(images)]
            if raw:
                response = client.post(url, content=data, headers={"Content-Type": "image/png"})
            else:
                response = client.post(url, files={"image": (name, data, "image/png")})
            response.raise_for_status()
            rows.append(response.json()["latency_ms"])
    p50 = {key: float(np.median([row[key] for row in rows])) for key in rows[0]} if rows else {}
    overhead = [row["total"] - row["inference"] for row in rows]
    return {
        "requests": len(rows),
        "p50_ms": p50,
        "overhead_p50_ms": float(np.median(overhead)) if overhead else None,
        "overhead_p90_ms": float(np.percentile(overhead, 90)) if overhead else None,
    }


def markdown(report: Dict[str, Any]) -> str:
    lines = [
        "| server | concurrency | req/s | p50 ms | p90 ms | p99 ms | non-2xx | socket errors | server CPU ms/req | server cores | wrk + other cores | load avg before |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, result in report["servers"].items():
        for level in result.get("levels", []):
            lines.append(
                "| {} | {} | {:.1f} | {:.2f} | {:.2f} | {:.2f} | {} | {} | {:.2f} | {:.2f} | {:.2f} | {} |".format(
                    name, level["concurrency"], level["throughput_rps"], level["p50_ms"] or 0, level["p90_ms"] or 0,
                    level["p99_ms"] or 0, level["non_2xx"], level["socket_errors"], level["server_cpu_ms_per_request"],
                    level["server_cpu_cores"], level["client_and_other_cores"], " ".join(level["loadavg_before"].split()[:3]),
                )
            )
    lines += ["", "| server | RSS after warm-up MB | RSS after the runs MB | peak RSS MB |", "|---|---:|---:|---:|"]
    for name, result in report["servers"].items():
        lines.append(
            "| {} | {:.0f} | {:.0f} | {:.0f} |".format(
                name, result.get("rss_after_warmup_bytes", 0) / 1e6, result.get("rss_bytes", 0) / 1e6, result.get("peak_rss_bytes", 0) / 1e6
            )
        )
    for ours_name in ("ours", RAW):
        oh = report["servers"].get(ours_name, {}).get("overhead")
        if oh and oh.get("requests"):
            lines += ["", "`{}`, one request at a time ({} requests), p50 of its own `latency_ms` (ms): {}; overhead (total − inference) p50 {:.2f}, p90 {:.2f}".format(
                ours_name, oh["requests"], ", ".join("{} {:.2f}".format(k, v) for k, v in oh["p50_ms"].items()), oh["overhead_p50_ms"], oh["overhead_p90_ms"])]
    for ours_name in ("ours", RAW):
        ours = report["servers"].get(ours_name)
        if not ours or not any("stages" in level for level in ours.get("levels", [])):
            continue
        lines += ["", "`{}`, stage means from `/metrics` (ms):".format(ours_name), "", "| concurrency | decode | preprocess | queue | inference | server total | mean batch |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for level in ours["levels"]:
            st = level.get("stages", {})
            lines.append(
                "| {} | {} |".format(
                    level["concurrency"],
                    " | ".join("-" if st.get(k) is None else "{:.2f}".format(st[k]) for k in ("decode_mean_ms", "preprocess_mean_ms", "queue_mean_ms", "inference_mean_ms", "server_total_mean_ms", "mean_batch_size")),
                )
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="wrk, pinned to its own core, against ours and the plain FastAPI server.")
    parser.add_argument("--model", type=Path, default=None, help="FP32 ONNX (default: models/anemia_mobilenetv2.onnx, else the stand-in)")
    parser.add_argument("--engine-dir", type=Path, default=None)
    parser.add_argument("--precision", default="int8", help="ours' ANEMIA_PRECISION and the plain-engine peer's engine")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--max-images", type=int, default=64)
    parser.add_argument("--servers", default=",".join(SERVERS), help="of {}".format(", ".join(KNOWN)))
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--seconds", type=float, default=15.0, help="per level")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--client-cpu", default=None, help="taskset CPU for wrk (default: the last CPU; empty: unpinned)")
    parser.add_argument("--ours-log-level", default="info")
    parser.add_argument("--ours-env", action="append", default=[], help="KEY=VALUE for our server (e.g. ANEMIA_INTRA_OP_THREADS=1)")
    parser.add_argument("--overhead-requests", type=int, default=200, help="sequential requests for ours' stage-timing overhead")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--smoke", action="store_true", help="1 s per level (CI), no timing claims")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = DEFAULT_MODEL if DEFAULT_MODEL.is_file() else STANDIN_MODEL
    if args.engine_dir is None:
        args.engine_dir = PROJECT_ROOT / "engines" if args.model.resolve() == DEFAULT_MODEL.resolve() else args.model.resolve().parent / "engines"
    args.model, args.engine_dir = args.model.resolve(), args.engine_dir.resolve()
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    if args.client_cpu is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        args.client_cpu = str(cpus[-1]) if len(cpus) > 1 else ""
    if args.smoke:
        args.seconds, args.warmup_seconds, args.max_images = 1.0, 1.0, min(args.max_images, 4)
        args.overhead_requests = min(args.overhead_requests, 5)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    from benchmarks.inference import code_version, machine_info
    from benchmarks.load import versions
    from service.config import load_settings
    from service.model_info import ModelInfo
    from service.startup import resolve_engine

    model = ModelInfo.from_onnx(args.model)
    settings = load_settings(model=args.model, engine_dir=args.engine_dir, precision=args.precision, backend="onnxruntime", auto_build=True)
    engine = resolve_engine(settings, model)
    images = load_images(args.images, args.max_images)
    work = Path(tempfile.mkdtemp(prefix="bench-wrk-"))
    results: Dict[str, Any] = {}
    for name in [s for s in args.servers.split(",") if s]:
        results[name] = bench_server(name, args, engine.path, images, work)
    report = {
        "machine": machine_info(),
        "versions": versions(),
        "code": code_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(args.model),
        "engine": engine.entry.to_dict(),
        "images": {"directory": str(args.images), "count": len(images)},
        "config": {"concurrency": args.concurrency, "seconds": args.seconds, "client_cpu": args.client_cpu, "servers_pinned": False, "ours_env": args.ours_env},
        "command": " ".join(["python", "-m", "benchmarks.wrk_load"] + (argv if argv is not None else sys.argv[1:])),
        "servers": results,
        "logs": str(work),
    }
    text = markdown(report)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "wrk.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out_dir / "wrk.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
