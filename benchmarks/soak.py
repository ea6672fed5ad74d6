"""Soak: many requests against one real ``python -m service`` process, watching for slow decay.

N requests at concurrency C over loopback (asyncio + httpx), bounded in count and in time.
What it measures, after a warm-up:

- every status code (a 5xx or a transport error is a failure);
- the server's resident memory (``/proc/PID/status`` VmRSS, sampled every 0.5 s): growth from the
  end of warm-up to the end, the peak, and the slope in MB per 1000 requests;
- latency p50/p99 per quarter of the measured requests (in completion order): the last quarter's
  p99 against the first's shows queues, caches or leaks that slow the server down over time.

Pictures are real CP-AnemiC crops when ``--images`` (default ``../shared/data/cp-anemic``) exists,
else generated in code (transparent-background crops and JPEG photos with a polygon ROI).

    python -m benchmarks.soak --requests 20000 --concurrency 8 --json soak.json
    python -m benchmarks.soak --requests 600 --model /tmp/test_model.onnx --engine-dir /tmp/engines   # CI

Exit status 0 when every criterion holds (``--max-rss-growth-mb``, ``--max-p99-ratio``, no 5xx,
no transport error, every request answered), 1 otherwise, 2 when the server would not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from benchmarks.processes import free_port, rss_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PROJECT_ROOT / "models" / "anemia_mobilenetv2.onnx"
DEFAULT_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "cp-anemic"
MB = 1e6

# One picture to send: file name, bytes, content type, optional ROI JSON.
Payload = Tuple[str, bytes, str, Optional[str]]






# -- pictures ---------------------------------------------------------------------------------


def real_payloads(directory: Path, limit: int) -> List[Payload]:
    files = sorted(directory.rglob("*.png"))[:limit]
    return [(path.name, path.read_bytes(), "image/png", None) for path in files]


def generated_payloads(count: int) -> List[Payload]:
    import cv2

    payloads: List[Payload] = []
    for index in range(count):
        rng = np.random.default_rng(index)
        if index % 3 == 2:
            # A tablet photo, 800x600 JPEG, with the conjunctiva outlined by the client.
            photo = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
            ok, buffer = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
            polygon = [[120 + index, 200], [640, 190], [660, 380], [140, 400 + index]]
            payloads.append(("photo{}.jpg".format(index), buffer.tobytes(), "image/jpeg", json.dumps({"polygon": polygon})))
            continue
        # A CP-AnemiC-like crop: reddish ellipse on a transparent background, 200..460 px wide.
        width = 200 + 20 * index
        height = width * 2 // 5
        yy, xx = np.mgrid[0:height, 0:width]
        inside = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2 <= 1.0
        bgra = np.zeros((height, width, 4), dtype=np.uint8)
        noise = rng.integers(0, 40, (height, width))
        bgra[..., 0] = 60 + noise
        bgra[..., 1] = 50 + noise
        bgra[..., 2] = 150 + noise + index
        bgra[..., 3] = np.where(inside, 255, 0)
        ok, buffer = cv2.imencode(".png", bgra)
        payloads.append(("crop{}.png".format(index), buffer.tobytes(), "image/png", None))
    return payloads


# -- the server -------------------------------------------------------------------------------


class Server:
    """``python -m service`` on 127.0.0.1; stderr (JSON logs) to a file so it never blocks."""

    def __init__(self, model: Path, engine_dir: Path, extra_env: Dict[str, str]) -> None:
        self.port = free_port()
        self.url = "http://127.0.0.1:{}".format(self.port)
        self.log_path = Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
        env = dict(os.environ)
        env.update(
            {
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "ANEMIA_MODEL": str(model),
                "ANEMIA_ENGINE_DIR": str(engine_dir),
                "ANEMIA_AUTO_BUILD": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra_env)
        with open(str(self.log_path), "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"], cwd=str(PROJECT_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_seconds: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited with {}:\n{}".format(self.process.returncode, self.log_tail()))
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server was not ready in {} s:\n{}".format(timeout_seconds, self.log_tail()))

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def log_summary(self) -> Dict[str, int]:
        levels: Counter = Counter()
        not_json = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                levels[json.loads(line).get("level", "?")] += 1
            except ValueError:
                not_json += 1
        return {"lines": sum(levels.values()) + not_json, "error_lines": levels["error"] + levels["critical"], "not_json": not_json}

    def stop(self, timeout_seconds: float = 40.0) -> Optional[int]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        try:
            self.log_path.unlink()
        except OSError:
            pass


# -- the load ---------------------------------------------------------------------------------


async def drive(
    url: str,
    pid: Optional[int],
    payloads: Sequence[Payload],
    requests: int,
    concurrency: int,
    warmup: int,
    max_seconds: float,
) -> Dict[str, Any]:
    import httpx

    latencies: List[float] = []  # in completion order
    statuses: Counter = Counter()
    transport_errors: Counter = Counter()
    rss_samples: List[Tuple[int, int]] = []  # (requests completed, bytes)
    issued = 0
    done = 0
    deadline = time.monotonic() + max_seconds
    stop_sampling = asyncio.Event()

    async def sample_rss() -> None:
        while pid is not None and not stop_sampling.is_set():
            rss_samples.append((done, rss_bytes(pid)))
            try:
                await asyncio.wait_for(stop_sampling.wait(), 0.5)
            except asyncio.TimeoutError:
                pass

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as http:

        async def worker() -> None:
            nonlocal issued, done
            while issued < requests and time.monotonic() < deadline:
                name, data, content_type, roi = payloads[issued % len(payloads)]
                issued += 1
                started = time.perf_counter()
                try:
                    response = await http.post(
                        "/v1/predict", files={"image": (name, data, content_type)}, data={"roi": roi} if roi else None
                    )
                    statuses[response.status_code] += 1
                except httpx.HTTPError as exc:
                    transport_errors[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - started)
                done += 1

        sampler = asyncio.ensure_future(sample_rss())
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_seconds = time.perf_counter() - started
        stop_sampling.set()
        await sampler
        if pid is not None:
            rss_samples.append((done, rss_bytes(pid)))

    return {
        "latencies": latencies,
        "statuses": statuses,
        "transport_errors": transport_errors,
        "rss_samples": rss_samples,
        "wall_seconds": wall_seconds,
        "completed": done,
        "warmup": min(warmup, done),
    }


def percentile_ms(values: Sequence[float], q: float) -> Optional[float]:
    return round(float(np.percentile(np.asarray(values) * 1000.0, q)), 2) if len(values) else None


def summarize(raw: Dict[str, Any], requests: int, concurrency: int) -> Dict[str, Any]:
    latencies = raw["latencies"]
    warmup = raw["warmup"]
    measured = latencies[warmup:]
    quarter = len(measured) // 4
    quarters = [measured[i * quarter : (i + 1) * quarter] for i in range(4)] if quarter else []
    quarter_stats = [{"p50_ms": percentile_ms(q, 50), "p99_ms": percentile_ms(q, 99)} for q in quarters]
    statuses = raw["statuses"]
    summary: Dict[str, Any] = {
        "requests": requests,
        "concurrency": concurrency,
        "completed": raw["completed"],
        "warmup_requests": warmup,
        "wall_seconds": round(raw["wall_seconds"], 2),
        "throughput_rps": round(raw["completed"] / raw["wall_seconds"], 1) if raw["wall_seconds"] else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "five_xx": sum(v for k, v in statuses.items() if k >= 500),
        "transport_errors": dict(raw["transport_errors"]),
        "latency_ms": {"p50": percentile_ms(measured, 50), "p99": percentile_ms(measured, 99), "max": percentile_ms(measured, 100)},
        "quarters": quarter_stats,
        "p99_last_over_first": None,
    }
    if quarter_stats:
        first, last = quarter_stats[0]["p99_ms"], quarter_stats[3]["p99_ms"]
        if first and last is not None:
            summary["p99_last_over_first"] = round(last / first, 3)
    samples = raw["rss_samples"]
    if samples:
        after = [(n, b) for n, b in samples if n >= warmup] or samples[-1:]
        counts = np.array([n for n, _ in after], dtype=np.float64)
        sizes = np.array([b for _, b in after], dtype=np.float64)
        slope = float(np.polyfit(counts, sizes, 1)[0]) * 1000 / MB if len(after) > 2 and np.ptp(counts) > 0 else 0.0
        summary["rss_mb"] = {
            "start": round(samples[0][1] / MB, 1),
            "after_warmup": round(after[0][1] / MB, 1),
            "end": round(after[-1][1] / MB, 1),
            "peak_after_warmup": round(float(sizes.max()) / MB, 1),
            "growth_after_warmup": round((after[-1][1] - after[0][1]) / MB, 1),
            "slope_per_1000_requests": round(slope, 3),
            "samples": len(samples),
            # The curve's shape tells a leak (a straight line) from allocator warm-up (a plateau).
            "by_tenth_of_requests": [
                round(next((b for n, b in samples if n >= raw["completed"] * tenth / 10), samples[-1][1]) / MB, 1)
                for tenth in range(1, 11)
            ],
        }
    return summary


def verdict(summary: Dict[str, Any], max_rss_growth_mb: float, max_p99_ratio: float) -> List[str]:
    failures = []
    if summary["completed"] < summary["requests"]:
        failures.append("only {} of {} requests finished in time".format(summary["completed"], summary["requests"]))
    if summary["five_xx"]:
        failures.append("{} answers were 5xx".format(summary["five_xx"]))
    if summary["transport_errors"]:
        failures.append("transport errors: {}".format(summary["transport_errors"]))
    growth = summary.get("rss_mb", {}).get("growth_after_warmup")
    if growth is not None and growth > max_rss_growth_mb:
        failures.append("RSS grew {} MB after warm-up (limit {})".format(growth, max_rss_growth_mb))
    ratio = summary["p99_last_over_first"]
    if max_p99_ratio > 0 and ratio is not None and ratio > max_p99_ratio:
        failures.append("p99 of the last quarter is {}x the first's (limit {})".format(ratio, max_p99_ratio))
    return failures


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=None, help="requests before measuring (default: 5%%, at least 50)")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop issuing requests after this long")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--engine-dir", type=Path, default=None, help="default: a fresh temporary directory (auto-build)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="PNG crops to send; generated pictures if absent")
    parser.add_argument("--image-count", type=int, default=24)
    parser.add_argument("--url", default=None, help="soak an already running server instead of starting one")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's pid, for its memory")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE", help="extra ANEMIA_* settings")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    parser.add_argument("--max-p99-ratio", type=float, default=1.2, help="0 disables the check")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(50, args.requests // 20)
    if args.images.is_dir() and any(args.images.rglob("*.png")):
        payloads, source = real_payloads(args.images, args.image_count), str(args.images)
    else:
        payloads, source = generated_payloads(args.image_count), "generated"
    server: Optional[Server] = None
    engine_tmp: Optional[tempfile.TemporaryDirectory] = None
    url, pid = args.url, args.pid
    if url is None:
        if not args.model.is_file():
            print("error: model {} not found; train one (make train) or pass --model".format(args.model), file=sys.stderr)
            return 2
        if args.engine_dir is None:
            engine_tmp = tempfile.TemporaryDirectory(prefix="soak-engines-")
        engine_dir = args.engine_dir or Path(engine_tmp.name)  # type: ignore[union-attr]
        extra = dict(item.split("=", 1) for item in args.server_env)
        server = Server(args.model, engine_dir, extra)
        try:
            server.wait_ready()
        except RuntimeError as exc:
            print("error: {}".format(exc), file=sys.stderr)
            server.close()
            return 2
        url, pid = server.url, server.pid
    try:
        raw = asyncio.run(drive(url, pid, payloads, args.requests, args.concurrency, warmup, args.max_seconds))
    finally:
        exit_code = server.stop() if server is not None else None
    summary = summarize(raw, args.requests, args.concurrency)
    summary.update(
        {
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": str(args.model) if args.url is None else None,
            "pictures": "{} ({} files)".format(source, len(payloads)),
            "machine": machine(),
            "server_exit_code": exit_code,
        }
    )
    if server is not None:
        summary["server_log"] = server.log_summary()
        server.close()
    if engine_tmp is not None:
        engine_tmp.cleanup()
    failures = verdict(summary, args.max_rss_growth_mb, args.max_p99_ratio)
    summary["failures"] = failures
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
