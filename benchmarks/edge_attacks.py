"""The attacks of issue 16 against a real ``python -m service``, one at a time, and what held.

For each attack: start a fresh server (under ``prlimit --nofile=1024`` like a default systemd
unit), measure idle RSS, start the attack from 127.0.0.2 (so a per-address cap can tell it from
the honest client on 127.0.0.1), let it settle, then send valid predictions and ``/readyz`` from
127.0.0.1 and record their status and latency and the server's RSS; then stop the attack.

Attacks (each bounded in time):

- ``slow-bodies``: 80 sockets send ``POST /v1/predict`` headers with ``Content-Length: 100000``
  and no body;
- ``slowloris``: 200 sockets send a request head one header every 0.5 s, never finishing;
- ``header-flood``: one socket sends 100 MiB of one never-terminated header;
- ``many-headers``: 20 sockets each send 100 000 terminated headers;
- ``idle-sockets``: 1100 sockets that send nothing (the server has 1024 descriptors);
- ``slow-large-bodies``: 40 sockets each upload a 2 MiB body at 256 KiB/s (the byte budget per
  request is 10 MiB; what many of them cost in memory).

    python -m benchmarks.edge_attacks --out-json edge.json --out-md edge.md
    python -m benchmarks.edge_attacks --project-dir /path/to/old/checkout   # the same attacks, other code

Exit status 0 when, during every attack, each valid prediction got 200 within 1 s, ``/readyz``
answered 200, and RSS stayed within 100 MB of idle; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from benchmarks.processes import free_port, rss_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PROJECT_ROOT / "models" / "anemia_mobilenetv2.onnx"
DEFAULT_IMAGE = PROJECT_ROOT.parent / "shared" / "data" / "cp-anemic" / "Anemic" / "Image_001.png"
ATTACKER = "127.0.0.2"
MIB = 1024 * 1024
MB = 1e6


class Server:
    def __init__(self, project_dir: Path, model: Path, engine_dir: Path, nofile: int, env: Dict[str, str]) -> None:
        self.port = free_port()
        self.url = "http://127.0.0.1:{}".format(self.port)
        self.log_path = Path(tempfile.mkstemp(prefix="edge-server-", suffix=".log")[1])
        values = dict(os.environ)
        values.update(
            HOST="127.0.0.1", PORT=str(self.port), ANEMIA_MODEL=str(model), ANEMIA_ENGINE_DIR=str(engine_dir),
            ANEMIA_AUTO_BUILD="1", ANEMIA_PRECISION="fp32", ANEMIA_BACKEND="onnxruntime", PYTHONUNBUFFERED="1",
            ANEMIA_LOG_LEVEL="warning",
        )
        values.update(env)
        with open(str(self.log_path), "wb") as log:
            self.process = subprocess.Popen(
                ["prlimit", "--nofile={0}:{0}".format(nofile), "--", sys.executable, "-m", "service"],
                cwd=str(project_dir), env=values, stdout=log, stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("server exited:\n" + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def rss_mb(self) -> float:
        return rss_bytes(self.process.pid) / MB

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log_path.unlink()


# -- attacks: each runs in a thread until ``stop`` is set, holding its sockets ----------------


def _connect(port: int, timeout_s: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.bind((ATTACKER, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _drop_closed(sockets: List[socket.socket]) -> None:
    """Remove (and close) the sockets the server has answered or closed; keep the silent ones."""
    for sock in list(sockets):
        sock.setblocking(False)
        try:
            sock.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            pass
        sock.close()
        sockets.remove(sock)


def _close_all(sockets: List[socket.socket]) -> None:
    for sock in sockets:
        try:
            sock.close()
        except OSError:
            pass


def slow_bodies(port: int, stop: threading.Event) -> None:
    head = b"POST /v1/predict HTTP/1.1\r\nHost: box\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
    sockets: List[socket.socket] = []
    while not stop.is_set():  # reconnect whatever the server cut, keeping 80 open
        sockets = [s for s in sockets if s.fileno() != -1]
        while len(sockets) < 80 and not stop.is_set():
            try:
                sock = _connect(port)
                sock.sendall(head)
                sockets.append(sock)
            except OSError:
                break
        _drop_closed(sockets)  # answered or closed by the server: replace it
        stop.wait(0.2)
    _close_all(sockets)


def slowloris(port: int, stop: threading.Event) -> None:
    sockets: List[socket.socket] = []
    index = 0
    while not stop.is_set():
        sockets = [s for s in sockets if s.fileno() != -1]
        while len(sockets) < 200 and not stop.is_set():
            try:
                sock = _connect(port)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\n")
                sockets.append(sock)
            except OSError:
                break
        index += 1
        for sock in list(sockets):
            try:
                sock.sendall(b"X-%d: 1\r\n" % index)
            except OSError:
                sock.close()
                sockets.remove(sock)
        stop.wait(0.5)
    _close_all(sockets)


def header_flood(port: int, stop: threading.Event) -> None:
    line = b"a" * MIB
    while not stop.is_set():
        try:
            sock = _connect(port, timeout_s=2.0)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\nX-Flood: ")
            for _ in range(100):
                if stop.is_set():
                    break
                sock.sendall(line)
            sock.close()
        except OSError:
            pass
        stop.wait(0.1)


def many_headers(port: int, stop: threading.Event) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: box\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100000)) + b"\r\n"

    def one() -> None:
        while not stop.is_set():
            try:
                sock = _connect(port, timeout_s=2.0)
                sock.sendall(request)
                sock.recv(1024)
                sock.close()
            except OSError:
                pass

    threads = [threading.Thread(target=one, daemon=True) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def idle_sockets(port: int, stop: threading.Event) -> None:
    sockets: List[socket.socket] = []
    while not stop.is_set():
        sockets = [s for s in sockets if s.fileno() != -1]
        while len(sockets) < 1100 and not stop.is_set():
            try:
                sockets.append(_connect(port, timeout_s=1.0))
            except OSError:
                break
        _drop_closed(sockets)  # so the pressure stays at 1100
        stop.wait(0.5)
    _close_all(sockets)


def slow_large_bodies(port: int, stop: threading.Event) -> None:
    size = 2 * MIB
    head = (
        "POST /v1/predict HTTP/1.1\r\nHost: box\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: {}\r\n\r\n".format(size).encode()
    )
    chunk = b"\0" * (64 * 1024)  # 4 chunks per second: 256 KiB/s per socket

    def one() -> None:
        while not stop.is_set():
            try:
                sock = _connect(port)
                sock.sendall(head)
                sent = 0
                while sent < size and not stop.is_set():
                    sock.sendall(chunk)
                    sent += len(chunk)
                    stop.wait(0.25)
                sock.close()
            except OSError:
                stop.wait(0.2)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


ATTACKS: Dict[str, Callable[[int, threading.Event], None]] = {
    "none": lambda port, stop: stop.wait(),
    "slow-bodies": slow_bodies,
    "slowloris": slowloris,
    "header-flood": header_flood,
    "many-headers": many_headers,
    "idle-sockets": idle_sockets,
    "slow-large-bodies": slow_large_bodies,
}


# -- measuring ----------------------------------------------------------------------------------


def measure(server: Server, image: bytes, requests: int, settle_s: float, attack: str) -> Dict[str, Any]:
    import httpx

    with httpx.Client(base_url=server.url, timeout=10) as warm:
        for _ in range(5):
            warm.post("/v1/predict", files={"image": ("a.png", image, "image/png")})
    time.sleep(1.0)
    idle_mb = server.rss_mb()
    stop = threading.Event()
    attacker = threading.Thread(target=ATTACKS[attack], args=(server.port, stop), daemon=True)
    attacker.start()
    peak_mb = idle_mb
    end = time.monotonic() + settle_s
    while time.monotonic() < end:
        peak_mb = max(peak_mb, server.rss_mb())
        time.sleep(0.1)
    predictions: List[Dict[str, Any]] = []
    readyz: List[Dict[str, Any]] = []
    for _ in range(requests):
        # A new connection each time, as a tablet after a pause would open one.
        started = time.perf_counter()
        try:
            status = httpx.post(server.url + "/v1/predict", files={"image": ("a.png", image, "image/png")}, timeout=10).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        predictions.append({"status": status, "s": time.perf_counter() - started})
        started = time.perf_counter()
        try:
            status = httpx.get(server.url + "/readyz", timeout=5).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        readyz.append({"status": status, "s": time.perf_counter() - started})
        peak_mb = max(peak_mb, server.rss_mb())
        time.sleep(0.3)
    stop.set()
    attacker.join(15)
    ok = [p for p in predictions if p["status"] == 200]
    return {
        "attack": attack,
        "predict_200": len(ok),
        "predict_total": len(predictions),
        "predict_statuses": sorted({str(p["status"]) for p in predictions}),
        "predict_max_s": round(max(p["s"] for p in predictions), 3),
        "predict_median_s": round(sorted(p["s"] for p in predictions)[len(predictions) // 2], 3),
        "readyz_200": sum(1 for r in readyz if r["status"] == 200),
        "readyz_statuses": sorted({str(r["status"]) for r in readyz}),
        "readyz_max_s": round(max(r["s"] for r in readyz), 3),
        "idle_rss_mb": round(idle_mb, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "rss_growth_mb": round(peak_mb - idle_mb, 1),
        "holds": len(ok) == len(predictions)
        and max(p["s"] for p in predictions) < 1.0
        and all(r["status"] == 200 for r in readyz)
        and peak_mb - idle_mb < 100,
    }


def to_markdown(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| Attack | Valid predictions 200 | Prediction median / max (s) | /readyz 200 | /readyz max (s) | RSS idle → peak (MB) | Holds |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        statuses = "" if row["predict_statuses"] == ["200"] else " ({})".format(", ".join(row["predict_statuses"]))
        lines.append(
            "| {attack} | {predict_200}/{predict_total}{st} | {predict_median_s} / {predict_max_s} | {readyz_200}/{predict_total} | {readyz_max_s} | {idle_rss_mb} → {peak_rss_mb} (+{rss_growth_mb}) | {h} |".format(
                st=statuses, h="yes" if row["holds"] else "**no**", **row
            )
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project-dir", type=Path, default=PROJECT_ROOT, help="the checkout whose server is attacked")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    parser.add_argument("--attacks", default=",".join(name for name in ATTACKS))
    parser.add_argument("--requests", type=int, default=10, help="valid predictions (and /readyz) per attack")
    parser.add_argument("--settle-s", type=float, default=4.0, help="attack time before measuring")
    parser.add_argument("--nofile", type=int, default=1024, help="the server's descriptor limit")
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--out-md", type=Path)
    args = parser.parse_args(argv)
    image = args.image.read_bytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="edge-engines-") as engine_dir:
        for attack in args.attacks.split(","):
            server = Server(args.project_dir, args.model, Path(engine_dir), args.nofile, {})
            try:
                server.wait_ready()
                row = measure(server, image, args.requests, args.settle_s, attack)
            finally:
                server.stop()
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {
        "project_dir": str(args.project_dir),
        "model": str(args.model),
        "machine": "{} {}, {} CPUs, Python {}".format(platform.system(), platform.machine(), os.cpu_count(), platform.python_version()),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "rows": rows,
    }
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    markdown = to_markdown(rows)
    if args.out_md:
        args.out_md.write_text(markdown)
    print(markdown)
    return 0 if all(row["holds"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
