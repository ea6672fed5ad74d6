"""End-to-end HTTP load: our server and the servers users would pick instead, side by side.

Every server runs as a real subprocess on 127.0.0.1 (a free port), pinned with ``taskset`` to the
same CPUs, serving the same ONNX file with the same preprocessing
(:func:`service.preprocess.preprocess_roi`) and the same ONNX Runtime thread count:

- ``ours``: ``python -m service`` (micro-batching, admission control, metrics);
- ``plain``: FastAPI + ONNX Runtime as tutorials write it (``benchmarks/peers/plain_fastapi.py``);
- ``bentoml``: BentoML 1.4, adaptive batching on (``benchmarks/peers/bento_service.py``);
- ``litserve``: LitServe, batching on (``benchmarks/peers/litserve_server.py``).

BentoML and LitServe run from their own venv (``.venv-peers``, see
``benchmarks/peers/requirements.txt``) and are skipped, with the reason recorded, without it.

The client (asyncio + httpx, this process) is pinned to the other CPU and sends real CP-AnemiC
pictures as multipart uploads. Closed loop at each concurrency: a fixed number of requests,
bounded in time; throughput, p50/p95/p99 end-to-end latency, errors, client and server CPU per
request, and for our server its stage breakdown read from ``/metrics``. Then an open loop at a
multiple of the best closed-loop throughput: for our server, admitted requests must keep a
bounded latency while the rest get 503 with ``Retry-After``.

    python -m benchmarks.load --out-dir benchmarks/results --plot docs/images/benchmark_load.png
    python -m benchmarks.load --smoke --servers ours,plain --out-dir /tmp/smoke     # CI
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from benchmarks.processes import free_port, ours_env
from service.config import BATCHING_MODES

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = PROJECT_ROOT / ".venv-peers"
DEFAULT_MODEL = PROJECT_ROOT / "models" / "anemia_mobilenetv2.onnx"
STANDIN_MODEL = PROJECT_ROOT / "build" / "bench" / "anemia_mobilenetv2_standin.onnx"
DEFAULT_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "cp-anemic"
# "ours-batch-on" is our server with ANEMIA_BATCHING=on: micro-batching even where warm-up
# measured a batch dearer per image than one image, to show what the warm-up decision buys.
ALL_SERVERS = ("ours", "plain", "bentoml", "litserve", "ours-batch-on")
# Servers that run from .venv-peers
PEER_SERVERS = ("bentoml", "litserve")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class ServerSpec:
    name: str
    command: List[str]
    ready_path: str
    predict_path: str
    python: str
    metrics_path: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)


def peers_python() -> Optional[Path]:
    python = PEERS_VENV / "bin" / "python"
    return python if python.is_file() else None




def server_spec(name: str, port: int, engine_path: Path, args: argparse.Namespace) -> ServerSpec:
    own_python = sys.executable
    common_env = {
        "BENCH_MODEL": str(engine_path),
        "BENCH_ORT_THREADS": str(args.threads),
        "BENCH_MAX_BATCH": str(args.max_batch),
        "BENCH_BATCH_WAIT_MS": str(args.batch_wait_ms),
    }
    if name in ("ours", "ours-batch-on"):
        python = sys.executable
        env = ours_env(
            port, args.model, args.engine_dir, args.precision,
            ANEMIA_INTRA_OP_THREADS=str(args.threads),
            ANEMIA_MAX_BATCH=str(args.max_batch),
            ANEMIA_BATCHING="on" if name == "ours-batch-on" else args.batching,
            ANEMIA_BATCH_WAIT_MS=str(args.batch_wait_ms),
            ANEMIA_LOG_LEVEL=args.ours_log_level,
        )
        if args.ours_spinning != "budget":
            env["ANEMIA_INTRA_OP_SPINNING"] = args.ours_spinning
        if not args.threads:  # 0: the thread budget decides, as `make serve` does
            del env["ANEMIA_INTRA_OP_THREADS"]
        return ServerSpec(name, [python, "-m", "service"], "/readyz", "/v1/predict", python, "/metrics", env)
    if name == "plain":
        command = [own_python, "-m", "uvicorn", "benchmarks.peers.plain_fastapi:app", "--host", "127.0.0.1", "--port", str(port)]
        return ServerSpec(name, command, "/healthz", "/predict", own_python, None, common_env)
    peer_python = peers_python()
    if peer_python is None:
        raise RuntimeError("no {} (create it: see benchmarks/peers/requirements.txt)".format(PEERS_VENV))
    python = str(peer_python)
    if name == "bentoml":
        command = [python, "-m", "bentoml", "serve", "benchmarks.peers.bento_service:AnemiaBento", "--host", "127.0.0.1", "--port", str(port)]
        env = dict(common_env, BENTOML_DO_NOT_TRACK="True", BENTOML_HOME=str(Path(tempfile.gettempdir()) / "bench-bentoml-home"))
        return ServerSpec(name, command, "/readyz", "/predict", python, None, env)
    if name == "litserve":
        command = [python, "-m", "benchmarks.peers.litserve_server", "--host", "127.0.0.1", "--port", str(port)]
        return ServerSpec(name, command, "/health", "/predict", python, None, common_env)
    raise ValueError("unknown server {!r}".format(name))


class RunningServer:
    """A server subprocess in its own session, so stopping it stops every process it started."""

    def __init__(self, spec: ServerSpec, port: int, cpus: Optional[str], log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.base_url = "http://127.0.0.1:{}".format(port)
        env = dict(os.environ)
        env.update(spec.env)
        env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        command = (["taskset", "-c", cpus] if cpus else []) + spec.command
        self.log_path = log_path
        self._log = open(str(log_path), "wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            command, cwd=str(PROJECT_ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_seconds: float) -> float:
        import httpx

        deadline = time.monotonic() + timeout_seconds
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError("{} exited with {}; log {}:\n{}".format(self.spec.name, self.process.returncode, self.log_path, self.log_tail()))
                try:
                    if client.get(self.base_url + self.spec.ready_path).status_code == 200:
                        return time.monotonic() - self.started_at
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("{} not ready after {} s; log {}:\n{}".format(self.spec.name, timeout_seconds, self.log_path, self.log_tail()))

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def pids(self) -> List[int]:
        """The server's process and every descendant (BentoML and LitServe start workers)."""
        children: Dict[int, List[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def cpu_seconds(self) -> float:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path("/proc/{}/stat".format(pid)).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return total

    def rss_bytes(self) -> Tuple[int, int]:
        """(current RSS, peak RSS) summed over the process tree."""
        current = peak = 0
        for pid in self.pids():
            try:
                status = Path("/proc/{}/status".format(pid)).read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    current += int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak += int(line.split()[1]) * 1024
        return current, peak

    def stop(self, timeout_seconds: float = 20.0) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            except ProcessLookupError:
                pass
        else:
            # The leader is gone; workers it left in its session still get the signal.
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._log.close()


# ---------------------------------------------------------------------------------------------
# Load


@dataclass
class Sample:
    status: int
    latency_seconds: float
    retry_after: Optional[str] = None
    error: Optional[str] = None


def machine_busy_seconds() -> float:
    """CPU seconds all processes spent busy so far (``/proc/stat``): with our own server's and
    client's CPU taken out, what is left is other load sharing the machine during a level."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    values = [int(v) for v in fields]
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def load_images(directory: Path, limit: int) -> List[Tuple[str, bytes]]:
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit("no images under {}".format(directory))
    return [(p.name, p.read_bytes()) for p in paths[:limit]]


async def send(client: Any, url: str, image: Tuple[str, bytes]) -> Sample:
    import httpx

    name, data = image
    started = time.perf_counter()
    try:
        response = await client.post(url, files={"image": (name, data, "image/png")})
        await response.aread()
        return Sample(response.status_code, time.perf_counter() - started, response.headers.get("retry-after"))
    except httpx.HTTPError as exc:
        return Sample(0, time.perf_counter() - started, error=type(exc).__name__)


def summarize(samples: Sequence[Sample], wall_seconds: float) -> Dict[str, Any]:
    ok = [s.latency_seconds for s in samples if s.status == 200]
    statuses: Dict[str, int] = {}
    for s in samples:
        key = str(s.status) if s.status else (s.error or "error")
        statuses[key] = statuses.get(key, 0) + 1
    ms = np.asarray(ok) * 1000.0 if ok else np.zeros(0)

    def pct(q: float) -> Optional[float]:
        return float(np.percentile(ms, q)) if ms.size else None

    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(samples) - len(ok),
        "statuses": statuses,
        "wall_seconds": wall_seconds,
        "throughput_rps": len(ok) / wall_seconds if wall_seconds > 0 else 0.0,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "mean_ms": float(ms.mean()) if ms.size else None,
        "max_ms": float(ms.max()) if ms.size else None,
    }


async def closed_loop(url: str, images: Sequence[Tuple[str, bytes]], concurrency: int, requests: int, time_limit_seconds: float) -> Tuple[List[Sample], float]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    samples: List[Sample] = []
    counter = {"next": 0}
    deadline = time.perf_counter() + time_limit_seconds
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                index = counter["next"]
                if index >= requests:
                    return
                counter["next"] = index + 1
                samples.append(await send(client, url, images[index % len(images)]))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return samples, wall


async def open_loop(url: str, images: Sequence[Tuple[str, bytes]], rate_rps: float, duration_seconds: float, timeout_seconds: float) -> Tuple[List[Sample], float, float]:
    """Send at a fixed rate regardless of answers; returns samples, wall time and the rate achieved."""
    import httpx

    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=512)
    interval = 1.0 / rate_rps
    tasks: List["asyncio.Task[Sample]"] = []
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_seconds)) as client:
        started = time.perf_counter()
        index = 0
        while True:
            due = started + index * interval
            now = time.perf_counter()
            if due - started >= duration_seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.ensure_future(send(client, url, images[index % len(images)])))
            index += 1
        sent_seconds = time.perf_counter() - started
        samples = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - started
    return samples, wall, len(tasks) / sent_seconds if sent_seconds > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Our server's own numbers from /metrics


def scrape(base_url: str, path: str) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + path, timeout=10.0).text
    values: Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return values


def metric_delta(before: Dict[Any, float], after: Dict[Any, float], name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def stage_breakdown(before: Dict[Any, float], after: Dict[Any, float]) -> Dict[str, Any]:
    stages: Dict[str, Any] = {}
    for stage in ("decode", "preprocess", "queue", "inference"):
        count = metric_delta(before, after, "anemia_stage_duration_seconds_count", stage=stage)
        total = metric_delta(before, after, "anemia_stage_duration_seconds_sum", stage=stage)
        stages[stage + "_mean_ms"] = total / count * 1000.0 if count else None
    count = metric_delta(before, after, "anemia_request_duration_seconds_count", endpoint="/v1/predict", status="200")
    total = metric_delta(before, after, "anemia_request_duration_seconds_sum", endpoint="/v1/predict", status="200")
    stages["server_total_mean_ms"] = total / count * 1000.0 if count else None
    batches = metric_delta(before, after, "anemia_batch_size_count")
    images = metric_delta(before, after, "anemia_batch_size_sum")
    stages["batches"] = batches
    stages["mean_batch_size"] = images / batches if batches else None
    return stages


# ---------------------------------------------------------------------------------------------
# One server, all levels


def bench_server(name: str, engine_path: Path, images: Sequence[Tuple[str, bytes]], args: argparse.Namespace, log_dir: Path) -> Dict[str, Any]:
    port = free_port()
    spec = server_spec(name, port, engine_path, args)
    server = RunningServer(spec, port, args.server_cpus or None, log_dir / "{}.log".format(name))
    result: Dict[str, Any] = {"name": name, "command": " ".join(spec.command), "levels": []}
    try:
        result["startup_seconds"] = server.wait_ready(args.ready_timeout)
        url = server.base_url + spec.predict_path
        warm, _ = asyncio.run(closed_loop(url, images, min(4, args.warmup), args.warmup, 60.0))
        bad = [s for s in warm if s.status != 200]
        if bad:
            raise RuntimeError("{} warm-up failed: {}; log:\n{}".format(name, summarize(bad, 1.0)["statuses"], server.log_tail()))
        result["probe_probability"] = probe_probability(url, images[0])
        if spec.metrics_path:  # our server: what warm-up decided about batching
            result["batching"] = batching_decision(server.base_url)
        best_rps = 0.0
        for concurrency in args.concurrency:
            requests = max(args.min_requests, args.requests_per_connection * concurrency)
            before = scrape(server.base_url, spec.metrics_path) if spec.metrics_path else None
            server_cpu_before, client_cpu_before = server.cpu_seconds(), time.process_time()
            busy_before = machine_busy_seconds()
            samples, wall = asyncio.run(closed_loop(url, images, concurrency, requests, args.level_seconds))
            server_cpu = server.cpu_seconds() - server_cpu_before
            client_cpu = time.process_time() - client_cpu_before
            other_cpu = max(0.0, machine_busy_seconds() - busy_before - server_cpu - client_cpu)
            level = summarize(samples, wall)
            level.update(
                {
                    "concurrency": concurrency,
                    "client_cpu_fraction": client_cpu / wall,
                    "client_cpu_ms_per_request": client_cpu / max(1, len(samples)) * 1000.0,
                    "server_cpu_fraction": server_cpu / wall,
                    "server_cpu_ms_per_request": server_cpu / max(1, len(samples)) * 1000.0,
                    "other_cpu_cores": other_cpu / wall,
                    "time_limited": len(samples) < requests,
                }
            )
            if before is not None:
                level["stages"] = stage_breakdown(before, scrape(server.base_url, str(spec.metrics_path)))
            best_rps = max(best_rps, level["throughput_rps"])
            result["levels"].append(level)
            print(
                "{:9s} c={:<3d} {:4d} req  {:7.1f} req/s  p50 {}  p99 {}  errors {}".format(
                    name, concurrency, level["requests"], level["throughput_rps"], _fmt(level["p50_ms"]), _fmt(level["p99_ms"]), level["errors"]
                ),
                file=sys.stderr,
                flush=True,
            )
        if args.open_loop_seconds > 0 and best_rps > 0:
            rate = best_rps * args.overload_factor
            if args.open_loop_max_rps:
                rate = min(rate, args.open_loop_max_rps)
            before = scrape(server.base_url, spec.metrics_path) if spec.metrics_path else None
            client_cpu_before = time.process_time()
            samples, wall, achieved = asyncio.run(open_loop(url, images, rate, args.open_loop_seconds, args.open_loop_timeout))
            client_cpu = time.process_time() - client_cpu_before
            overload = summarize(samples, wall)
            rejected = [s for s in samples if s.status == 503]
            overload.update(
                {
                    "target_rps": rate,
                    "sent_rps": achieved,
                    "capacity_rps": best_rps,
                    "duration_seconds": args.open_loop_seconds,
                    "rejected_503": len(rejected),
                    "rejected_with_retry_after": sum(1 for s in rejected if s.retry_after is not None),
                    "client_cpu_fraction": client_cpu / wall,
                }
            )
            if before is not None:
                overload["stages"] = stage_breakdown(before, scrape(server.base_url, str(spec.metrics_path)))
            result["open_loop"] = overload
            print(
                "{:9s} open loop {:.0f} req/s (sent {:.0f}): ok {} p99 {}  503 {} (Retry-After {})  other {}".format(
                    name, rate, achieved, overload["ok"], _fmt(overload["p99_ms"]), len(rejected),
                    overload["rejected_with_retry_after"], overload["errors"] - len(rejected)
                ),
                file=sys.stderr,
                flush=True,
            )
        result["rss_bytes"], result["peak_rss_bytes"] = server.rss_bytes()
    finally:
        server.stop()
    return result


def batching_decision(base_url: str) -> Optional[Dict[str, Any]]:
    """Our server's warm-up decision (``/v1/model`` ``batching``): mode, batch limit, ms per image."""
    import httpx

    found = httpx.get(base_url + "/v1/model", timeout=10.0).json().get("batching")
    return dict(found) if found else None


def probe_probability(url: str, image: Tuple[str, bytes]) -> Optional[float]:
    """The probability one server gives the first picture: every server must agree (same model, same preprocessing)."""
    import httpx

    name, data = image
    body = httpx.post(url, files={"image": (name, data, "image/png")}, timeout=30.0).json()
    if isinstance(body, list) and body:  # BentoML's batchable API answers with a one-item list
        body = body[0]
    value = body.get("anemia_probability") if isinstance(body, dict) else None
    return float(value) if value is not None else None


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else "{:.1f} ms".format(value)


# ---------------------------------------------------------------------------------------------
# Raw inference reference, versions, report


def raw_inference_ms(args: argparse.Namespace) -> Optional[float]:
    """Median batch-1 ``backend.infer`` time for the served engine, pinned like the servers."""
    command = [
        sys.executable, "-m", "benchmarks.inference", "--child-engine",
        "--model", str(args.model), "--engine-dir", str(args.engine_dir), "--images", str(args.images),
        "--precision", args.precision, "--backend", "onnxruntime", "--threads", str(args.threads), "--batches", "1",
        "--warmup", "5", "--iterations", "10" if args.smoke else "300", "--min-iterations", "10" if args.smoke else "50",
        "--max-seconds", "1" if args.smoke else "6",
    ]
    if args.server_cpus:
        command = ["taskset", "-c", args.server_cpus] + command
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    done = subprocess.run(command, cwd=str(PROJECT_ROOT), env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        print("raw inference timing failed: " + done.stderr[-2000:], file=sys.stderr)
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1])["rows"][0]["median_ms"])


def versions() -> Dict[str, str]:
    import fastapi
    import httpx
    import onnxruntime
    import uvicorn

    from service import __version__

    found = {
        "python": sys.version.split()[0],
        "service": __version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "onnxruntime": onnxruntime.__version__,
        "httpx (client)": httpx.__version__,
    }
    for optional in ("uvloop", "httptools"):  # what uvicorn[standard] brings; uvicorn uses them when present
        try:
            found[optional] = str(__import__(optional).__version__)
        except ImportError:
            found[optional] = "absent"
    python = peers_python()
    if python is not None:
        probe = (
            "import bentoml, litserve, onnxruntime, uvicorn, uvloop, httptools, fastapi; "
            "print(bentoml.__version__, litserve.__version__, onnxruntime.__version__, uvicorn.__version__, "
            "uvloop.__version__, httptools.__version__, fastapi.__version__)"
        )
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            keys = ("bentoml", "litserve", "onnxruntime", "uvicorn", "uvloop", "httptools", "fastapi")
            found.update({"{} (.venv-peers)".format(k): v for k, v in zip(keys, done.stdout.split())})
    return found


def level_at(result: Dict[str, Any], concurrency: int) -> Optional[Dict[str, Any]]:
    for level in result.get("levels", []):
        if level["concurrency"] == concurrency:
            return dict(level)
    return None


def ratios_and_goals(results: Dict[str, Dict[str, Any]], raw_ms: Optional[float], concurrency_ratio: int) -> Dict[str, Any]:
    ours = results.get("ours")
    out: Dict[str, Any] = {"ratios": {}, "goals": {}}
    probes = {name: r.get("probe_probability") for name, r in results.items()}
    known = [v for v in probes.values() if v is not None]
    out["same_answer"] = {"probabilities": probes, "max_abs_difference": (max(known) - min(known)) if known else None}
    if not ours or "levels" not in ours:
        return out
    ours_c = level_at(ours, concurrency_ratio)
    ours_1 = level_at(ours, 1)
    for name, peer in results.items():
        if name.startswith("ours") or "levels" not in peer:
            continue
        peer_c, peer_1 = level_at(peer, concurrency_ratio), level_at(peer, 1)
        entry: Dict[str, Any] = {}
        if ours_c and peer_c and peer_c["throughput_rps"]:
            entry["throughput_c{}".format(concurrency_ratio)] = ours_c["throughput_rps"] / peer_c["throughput_rps"]
        if ours_1 and peer_1 and peer_1["p99_ms"] and ours_1["p99_ms"]:
            entry["p99_c1"] = ours_1["p99_ms"] / peer_1["p99_ms"]
        out["ratios"][name] = entry
    if ours_1 and raw_ms is not None and ours_1["p50_ms"] is not None:
        out["goals"]["single_request"] = {
            "p50_ms": ours_1["p50_ms"],
            "raw_inference_ms": raw_ms,
            "budget_ms": raw_ms + 2.0,
            "met": ours_1["p50_ms"] <= raw_ms + 2.0,
        }
    throughput_goal: Dict[str, Any] = {}
    for name, need in (("plain", 1.5), ("bentoml", 1.0), ("litserve", 1.0)):
        ratio = out["ratios"].get(name, {}).get("throughput_c{}".format(concurrency_ratio))
        if ratio is not None:
            throughput_goal[name] = {"ratio": ratio, "needed": "> {}".format(need) if need == 1.0 else ">= {}".format(need), "met": ratio >= need if need > 1.0 else ratio > need}
    out["goals"]["throughput_c{}".format(concurrency_ratio)] = throughput_goal
    out["goals"]["no_errors_below_capacity"] = {
        "errors_by_concurrency": {str(level["concurrency"]): level["errors"] for level in ours["levels"]},
        "met": all(level["errors"] == 0 for level in ours["levels"]),
    }
    return out


def markdown(report: Dict[str, Any]) -> str:
    lines: List[str] = []
    lines.append("| server | concurrency | requests | ok | errors | req/s | p50 ms | p95 ms | p99 ms | client CPU (of its core) | client CPU ms/req | server CPU ms/req | other load (cores) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, result in report["servers"].items():
        if "levels" not in result:
            continue
        for level in result["levels"]:
            lines.append(
                "| {} | {} | {} | {} | {} | {:.1f} | {} | {} | {} | {:.0f}% | {:.2f} | {:.2f} | {:.2f} |".format(
                    name, level["concurrency"], level["requests"], level["ok"], level["errors"], level["throughput_rps"],
                    _num(level["p50_ms"]), _num(level["p95_ms"]), _num(level["p99_ms"]),
                    level["client_cpu_fraction"] * 100.0, level["client_cpu_ms_per_request"], level["server_cpu_ms_per_request"],
                    level["other_cpu_cores"],
                )
            )
    for name, result in report["servers"].items():
        if not any("stages" in level for level in result.get("levels", [])):
            continue
        lines += ["", "`{}`: stage breakdown from its `/metrics` (means, ms):".format(name), ""]
        lines.append("| concurrency | decode | preprocess | queue | inference (per batch) | server total | mean batch |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|")
        for level in result["levels"]:
            st = level.get("stages", {})
            lines.append(
                "| {} | {} | {} | {} | {} | {} | {} |".format(
                    level["concurrency"], _num(st.get("decode_mean_ms"), 2), _num(st.get("preprocess_mean_ms"), 2),
                    _num(st.get("queue_mean_ms"), 2), _num(st.get("inference_mean_ms"), 2),
                    _num(st.get("server_total_mean_ms"), 2), _num(st.get("mean_batch_size"), 2),
                )
            )
    if any("open_loop" in r for r in report["servers"].values()):
        lines += ["", "Open loop past capacity:", ""]
        lines.append("| server | target req/s | sent req/s | sent | 200 | p50 ms (200) | p99 ms (200) | max ms (200) | 503 | 503 with Retry-After | other errors |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, result in report["servers"].items():
            ol = result.get("open_loop")
            if not ol:
                continue
            other = {k: v for k, v in ol["statuses"].items() if k not in ("200", "503")}
            lines.append(
                "| {} | {:.0f} | {:.0f} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    name, ol["target_rps"], ol["sent_rps"], ol["requests"], ol["ok"], _num(ol["p50_ms"]), _num(ol["p99_ms"]),
                    _num(ol["max_ms"]), ol["rejected_503"], ol["rejected_with_retry_after"],
                    ", ".join("{}: {}".format(k, v) for k, v in sorted(other.items())) or "0",
                )
            )
    skipped = report.get("skipped", {})
    for name, reason in skipped.items():
        lines += ["", "Skipped {}: {}".format(name, reason)]
    summary = report.get("summary", {})
    if summary.get("ratios"):
        lines += ["", "Ratios, ours / peer (throughput: higher is better for us; p99: lower is better for us):", ""]
        lines.append("| peer | throughput at c={} | p99 at c=1 |".format(report["config"]["ratio_concurrency"]))
        lines.append("|---|---:|---:|")
        for name, entry in summary["ratios"].items():
            lines.append("| {} | {} | {} |".format(name, _num(entry.get("throughput_c{}".format(report["config"]["ratio_concurrency"])), 2), _num(entry.get("p99_c1"), 2)))
    return "\n".join(lines) + "\n"


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else "{:.{}f}".format(value, digits)


def plot(report: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, result in report["servers"].items():
        levels = result.get("levels") or []
        if not levels:
            continue
        xs = [level["concurrency"] for level in levels]
        left.plot(xs, [level["throughput_rps"] for level in levels], marker="o", label=name)
        right.plot(xs, [level["p99_ms"] or float("nan") for level in levels], marker="o", label=name)
    for axis, title, label in ((left, "Throughput", "requests / s"), (right, "p99 end-to-end latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(report["config"]["concurrency"])
        axis.set_xticklabels([str(c) for c in report["config"]["concurrency"]])
        axis.set_xlabel("concurrent clients (closed loop)")
        axis.set_ylabel(label)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend()
    machine = report["machine"]
    fig.suptitle(
        "{} | server CPUs {}, client CPUs {} | ONNX Runtime threads: {} | {}".format(
            machine["cpu"], report["config"]["server_cpus"] or "all", report["config"]["client_cpus"] or "all",
            report["config"]["threads"], machine["date_utc"][:10]
        ),
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="End-to-end HTTP load: ours against plain FastAPI, BentoML, LitServe.")
    parser.add_argument("--model", type=Path, default=None, help="FP32 ONNX (default: models/anemia_mobilenetv2.onnx, else the stand-in)")
    parser.add_argument("--engine-dir", type=Path, default=None, help="default: engines/ for models/anemia_mobilenetv2.onnx, else engines/ beside the model")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--max-images", type=int, default=1000)
    parser.add_argument("--servers", default=",".join(ALL_SERVERS))
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--min-requests", type=int, default=200)
    parser.add_argument("--requests-per-connection", type=int, default=20)
    parser.add_argument("--level-seconds", type=float, default=60.0, help="time bound of one closed-loop level")
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--open-loop-seconds", type=float, default=5.0, help="0 skips the open loop")
    parser.add_argument("--overload-factor", type=float, default=2.0, help="open-loop rate as a multiple of the best closed-loop throughput")
    parser.add_argument("--open-loop-max-rps", type=float, default=0.0)
    parser.add_argument("--open-loop-timeout", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, every server alike (0: ours' thread budget, the peers' ONNX Runtime default)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--batching", choices=BATCHING_MODES, default="auto", help="our server's ANEMIA_BATCHING")
    parser.add_argument("--ours-spinning", choices=("budget", "true", "false"), default="budget", help="our server's ANEMIA_INTRA_OP_SPINNING (budget: unset, the thread budget decides)")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--ours-log-level", default="info", help="our server's ANEMIA_LOG_LEVEL (info logs every prediction)")
    parser.add_argument("--server-cpus", default="0", help="taskset list for every server; empty for none")
    parser.add_argument("--client-cpus", default="1", help="CPUs this client process pins itself to; empty for none")
    parser.add_argument("--ratio-concurrency", type=int, default=16)
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--smoke", action="store_true", help="a handful of requests per level (CI), no timing claims")
    parser.add_argument("--out-dir", type=Path, default=None, help="writes load.json and load.md here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG: throughput and p99 against concurrency")
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = DEFAULT_MODEL if DEFAULT_MODEL.is_file() else STANDIN_MODEL
    if args.engine_dir is None:
        args.engine_dir = PROJECT_ROOT / "engines" if args.model.resolve() == DEFAULT_MODEL.resolve() else args.model.resolve().parent / "engines"
    args.model, args.engine_dir = args.model.resolve(), args.engine_dir.resolve()
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    if args.smoke:
        args.concurrency = [c for c in args.concurrency if c <= 4] or [1]
        args.min_requests, args.requests_per_connection, args.warmup = 6, 2, 2
        args.open_loop_seconds = min(args.open_loop_seconds, 1.0) if args.open_loop_seconds else 0.0
        args.open_loop_max_rps = args.open_loop_max_rps or 20.0
        args.level_seconds = min(args.level_seconds, 20.0)
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if len(available) < 2 and (args.server_cpus or args.client_cpus):
        print("fewer than 2 CPUs available: not pinning", file=sys.stderr)
        args.server_cpus = args.client_cpus = ""
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from service.config import load_settings
    from service.model_info import ModelInfo
    from service.startup import resolve_engine

    model = ModelInfo.from_onnx(args.model)
    settings = load_settings(model=args.model, engine_dir=args.engine_dir, precision=args.precision, backend="onnxruntime", auto_build=True)
    engine = resolve_engine(settings, model)
    images = load_images(args.images, args.max_images)
    from benchmarks.inference import code_version, machine_info

    machine = machine_info()
    raw_ms = raw_inference_ms(args)
    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    requested = [s for s in args.servers.split(",") if s]
    skipped: Dict[str, str] = {}
    results: Dict[str, Dict[str, Any]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    for name in requested:
        if name in PEER_SERVERS and peers_python() is None:
            skipped[name] = "no {} (see benchmarks/peers/requirements.txt)".format(PEERS_VENV.name)
            continue
        results[name] = bench_server(name, engine.path, images, args, log_dir)
    report: Dict[str, Any] = {
        "machine": machine,
        "versions": versions(),
        "code": code_version(),
        "model": str(args.model),
        "model_note": model.metadata.get("benchmark_note") or "{} {}".format(model.name, model.version),
        "engine": engine.entry.to_dict(),
        "images": {"directory": str(args.images), "count": len(images), "mean_bytes": float(np.mean([len(d) for _, d in images]))},
        "raw_inference_ms_batch1": raw_ms,
        "config": {
            "concurrency": args.concurrency,
            "server_cpus": args.server_cpus,
            "client_cpus": args.client_cpus,
            "threads": args.threads,
            "max_batch": args.max_batch,
            "batching": args.batching,
            "ours_spinning": args.ours_spinning,
            "batch_wait_ms": args.batch_wait_ms,
            "min_requests": args.min_requests,
            "requests_per_connection": args.requests_per_connection,
            "level_seconds": args.level_seconds,
            "open_loop_seconds": args.open_loop_seconds,
            "overload_factor": args.overload_factor,
            "ours_log_level": args.ours_log_level,
            "ratio_concurrency": args.ratio_concurrency,
            "smoke": args.smoke,
        },
        "command": " ".join(["python", "-m", "benchmarks.load"] + (argv if argv is not None else sys.argv[1:])),
        "servers": results,
        "skipped": skipped,
        "logs": str(log_dir),
    }
    report["summary"] = ratios_and_goals(results, raw_ms, args.ratio_concurrency)
    text = markdown(report)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "load.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out_dir / "load.md").write_text(text)
    if args.plot:
        plot(report, args.plot)
    print(text)
    print(json.dumps(report["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
