"""The HTTP edge of a real uvicorn process (service/edge.py, service/upload.py) under the attacks
of issue 16: slow heads, slow bodies, header floods, idle sockets under a low descriptor limit,
large uploads, an open /metrics, TLS handshakes that never start, requests cut at shutdown.

Loopback only. Attackers connect from 127.0.0.2 so the per-address cap can tell them from the
honest client on 127.0.0.1 (Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import httpx
import numpy as np
import pytest

from tests.images import encode
from tests.reliability.corpus import valid_png
from tests.reliability.server import LAUNCHER_MODULE, ServerProcess

MIB = 1024 * 1024
ATTACKER = "127.0.0.2"
# Short deadlines keep the tests short; the defaults are in service/config.py.
FAST_EDGE = {
    "ANEMIA_IDLE_TIMEOUT_S": "1",
    "ANEMIA_HEADER_TIMEOUT_S": "1",
    "ANEMIA_BODY_GRACE_S": "1",
    "ANEMIA_MIN_BODY_RATE_BYTES_PER_S": "1024",
}


def connect(server: ServerProcess, source: str = ATTACKER, timeout_s: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", server.port))
    return sock


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the socket (fails after ``timeout_s``)."""
    sock.settimeout(timeout_s)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def is_closed(sock: socket.socket, wait_s: float = 0.05) -> bool:
    """Whether the server closed ``sock`` within ``wait_s`` (what it said before is discarded)."""
    deadline = time.monotonic() + wait_s
    while True:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            if sock.recv(65536, socket.MSG_PEEK) == b"":
                return True
            sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            return False
        except ConnectionResetError:
            return True


def predict_ok(server: ServerProcess, image: bytes, **kwargs: object) -> float:
    """One valid prediction from 127.0.0.1; its latency in seconds (asserts 200)."""
    started = time.perf_counter()
    response = httpx.post(server.url + "/v1/predict", files={"image": ("a.png", image, "image/png")}, timeout=10, **kwargs)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return elapsed


def test_slowloris_and_silent_sockets_are_reaped(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn(**FAST_EDGE)
    silent = connect(server)
    slow = connect(server)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\n")
    started = time.monotonic()
    answer = b""
    # One header every 0.2 s, forever: the head never completes.
    while time.monotonic() - started < 5:
        try:
            slow.sendall(b"X-Slow-%d: 1\r\n" % int((time.monotonic() - started) * 10))
        except (BrokenPipeError, ConnectionResetError):
            break
        slow.settimeout(0.2)
        try:
            answer += slow.recv(65536)
            if answer:
                break
        except socket.timeout:
            pass
    cut_after_s = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert 0.8 < cut_after_s < 2.5, cut_after_s
    assert read_until_closed(slow, 2.0) is not None
    assert is_closed(silent, 2.0), "a socket that sent nothing was still open"
    # A keep-alive socket that goes quiet after a request is closed too.
    idle = connect(server)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\n\r\n")
    idle.settimeout(2)
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    assert is_closed(idle, 2.5)
    assert httpx.get(server.url + "/readyz").status_code == 200
    for sock in (silent, slow, idle):
        sock.close()


def test_slow_bodies_do_not_block_a_valid_prediction(spawn: Callable[..., ServerProcess]) -> None:
    # A small in-flight budget (queue 4 + batch 1): before the fix, 5 slow bodies were enough.
    server = spawn(ANEMIA_QUEUE_SIZE="4", ANEMIA_BATCHING="off", ANEMIA_MAX_CONNECTIONS_PER_CLIENT="0", **FAST_EDGE)
    image = valid_png()
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: box\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 100000\r\n\r\n--b\r\n"
    )
    sockets = [connect(server) for _ in range(80)]
    for sock in sockets:
        sock.sendall(head)
    time.sleep(0.3)
    assert not any(is_closed(sock, 0.0) for sock in sockets)  # all 80 open, none refused
    latencies = [predict_ok(server, image) for _ in range(3)]
    assert max(latencies) < 1.0, latencies
    # The slow bodies are answered 408 once they fall below the minimum rate, and closed.
    answers = [read_until_closed(sock, 4.0) for sock in sockets]
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), {a[:40] for a in answers}
    assert json.loads(answers[0].split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    for sock in sockets:
        sock.close()
    assert httpx.get(server.url + "/readyz").status_code == 200
    print("slow bodies: valid predictions in {} s".format([round(s, 3) for s in latencies]))


def test_header_floods_are_refused_with_431_and_memory_stays_bounded(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn()
    predict_ok(server, valid_png())
    idle_rss = server.rss_bytes()
    # 1. A never-terminated header line: up to 100 MiB offered, cut at 32 KiB.
    flood = connect(server)
    flood.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\nX-Flood: ")
    sent = 0
    line = b"a" * (1 * MIB)
    try:
        while sent < 100 * MIB:
            flood.sendall(line)
            sent += len(line)
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass
    assert sent < 8 * MIB, "the server kept reading a {} byte header".format(sent)
    answer = read_until_closed(flood, 5.0)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:100]
    # 2. Many small terminated headers, and one long line: 431 with the JSON body.
    for head in (
        b"GET /healthz HTTP/1.1\r\nHost: box\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(1000)) + b"\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: box\r\nX-Long: " + b"b" * (64 * 1024) + b"\r\n\r\n",
    ):
        sock = connect(server)
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_until_closed(sock, 5.0)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "headers_too_large"
    growth_mb = (server.rss_bytes() - idle_rss) / 1e6
    assert growth_mb < 20, "RSS grew {:.1f} MB".format(growth_mb)
    # 100 headers (the cap) still pass.
    ok = httpx.get(server.url + "/healthz", headers={"X-H-{}".format(i): "1" for i in range(90)})
    assert ok.status_code == 200
    predict_ok(server, valid_png())
    print("header flood: {} MiB offered before the cut, RSS +{:.1f} MB".format(sent // MIB, growth_mb))


def test_idle_sockets_under_a_low_descriptor_limit_do_not_stop_readyz(base_env: Dict[str, str]) -> None:
    env = dict(base_env, ANEMIA_IDLE_TIMEOUT_S="30", ANEMIA_HEADER_TIMEOUT_S="30")
    # 256 descriptors: connection cap 256 - 64 = 192; per address 64.
    with ServerProcess(env, prefix=["prlimit", "--nofile=256:256", "--"]) as server:
        sockets: List[socket.socket] = []
        for index in range(400):
            try:
                sockets.append(connect(server, source=ATTACKER if index % 2 else "127.0.0.3"))
            except OSError:
                break
        time.sleep(0.5)
        open_count = sum(1 for sock in sockets if not is_closed(sock, 0.0))
        assert open_count <= 2 * 64, open_count  # the rest were refused at once
        started = time.perf_counter()
        ready = httpx.get(server.url + "/readyz", timeout=5)
        readyz_s = time.perf_counter() - started
        assert ready.status_code == 200 and readyz_s < 1.0, (ready.status_code, readyz_s)
        predict_ok(server, valid_png())
        # The refusal was logged (not silent, as EMFILE was).
        records = server.log_records()
        assert any(r["message"] == "connection refused" and r["reason"] == "connections_per_client" for r in records)
        for sock in sockets:
            sock.close()
    # Without the per-address cap the total cap answers: politely, never a hang.
    env["ANEMIA_MAX_CONNECTIONS_PER_CLIENT"] = "0"
    with ServerProcess(env, prefix=["prlimit", "--nofile=256:256", "--"]) as server:
        sockets = [connect(server) for _ in range(300)]
        time.sleep(0.5)
        open_count = sum(1 for sock in sockets if not is_closed(sock, 0.0))
        assert open_count <= 192, open_count
        late = connect(server, source="127.0.0.1")
        late.sendall(b"GET /readyz HTTP/1.1\r\nHost: box\r\n\r\n")
        answer = read_until_closed(late, 2.0)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_connections"
        for sock in sockets:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 200
        assert not [r for r in server.log_records() if r["level"] in ("error", "critical")]


def test_a_large_upload_never_reaches_the_temp_directory(spawn: Callable[..., ServerProcess], tmp_path: Path) -> None:
    temp_dir = tmp_path / "server-tmp"
    temp_dir.mkdir()
    server = spawn(TMPDIR=str(temp_dir))
    # Noise does not compress: a PNG of about 4 MB, as a camera original would be.
    noise = encode(np.random.default_rng(16).integers(0, 256, (1000, 1400, 3), dtype=np.uint8))
    assert len(noise) > 2 * MIB
    seen: List[str] = []
    done = threading.Event()
    before = set(temp_dir.iterdir())  # whatever the libraries made at start-up

    def watch() -> None:
        # Starlette's spooled file is an O_TMPFILE: no name in the directory, but an open descriptor.
        while not done.is_set():
            for fd in os.listdir("/proc/{}/fd".format(server.pid)):
                try:
                    target = os.readlink("/proc/{}/fd/{}".format(server.pid, fd))
                except OSError:
                    continue
                if target.startswith(str(temp_dir)) or target.startswith("/tmp/#"):
                    seen.append(target)
            seen.extend(str(p) for p in set(temp_dir.iterdir()) - before)
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            predict_ok(server, noise)
    finally:
        done.set()
        watcher.join()
    assert not seen, seen


def test_metrics_needs_its_own_token_when_a_key_is_set(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn(ANEMIA_API_KEY="the-api-key", ANEMIA_METRICS_TOKEN="the-metrics-token")
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer the-api-key"}).status_code == 401
    assert httpx.get(server.url + "/metrics", headers={"X-API-Key": "the-api-key"}).status_code == 401
    good = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer the-metrics-token"})
    assert good.status_code == 200 and "anemia_predictions_total" in good.text
    # A 401 sent before the body is all in says it closes the connection (and does).
    sock = connect(server)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: box\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n")
    answer = read_until_closed(sock, 3.0)
    sock.close()
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 401") and b"\r\nconnection: close" in head, head


def test_generated_credentials_serve_https_with_a_key(base_env: Dict[str, str], tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    scrape = tmp_path / "scrape"
    env = dict(
        base_env, ANEMIA_CREDENTIALS_DIR=str(credentials), ANEMIA_SCRAPE_DIR=str(scrape), ANEMIA_TLS_HANDSHAKE_TIMEOUT_S="1",
        ANEMIA_MAX_CONNECTIONS_PER_CLIENT="4",
    )
    server = ServerProcess(env)
    server.url = server.url.replace("http://", "https://")
    server.start(wait_ready=False)
    try:
        cert = credentials / "tls-cert.pem"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(server.url + "/readyz", verify=ssl.create_default_context(cafile=str(cert)), timeout=1).status_code == 200:
                    break
            except (httpx.HTTPError, OSError, ssl.SSLError):
                time.sleep(0.1)
        else:
            raise AssertionError(server.log_text()[-3000:])
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o700
        for name in ("api-key", "metrics-token", "tls-key.pem"):
            assert stat.S_IMODE((credentials / name).stat().st_mode) == 0o600, name
        key = (credentials / "api-key").read_text().strip()
        token = (scrape / "metrics-token").read_text().strip()
        verify = ssl.create_default_context(cafile=str(scrape / "tls-cert.pem"))
        with httpx.Client(base_url=server.url, verify=verify, timeout=10) as client:
            image = valid_png()
            assert client.post("/v1/predict", files={"image": ("a.png", image, "image/png")}).status_code == 401
            ok = client.post("/v1/predict", files={"image": ("a.png", image, "image/png")}, headers={"X-API-Key": key})
            assert ok.status_code == 200, ok.text
            assert client.get("/metrics").status_code == 401
            assert client.get("/metrics", headers={"Authorization": "Bearer " + token}).status_code == 200
        # Plain HTTP on the HTTPS port gets nothing.
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https://", "http://") + "/readyz", timeout=3)
        # A socket that never starts its handshake is closed after the handshake deadline.
        silent = connect(server)
        assert is_closed(silent, 3.0)
        silent.close()
        # TLS sockets count once each against the per-address cap (4), from accept, and are given back.
        def tls_socket() -> ssl.SSLSocket:
            wrapped = verify.wrap_socket(connect(server), server_hostname="127.0.0.1")
            wrapped.sendall(b"GET /healthz HTTP/1.1\r\nHost: box\r\n\r\n")
            assert wrapped.recv(65536).startswith(b"HTTP/1.1 200")
            return wrapped

        for _round in range(2):
            held = [tls_socket() for _ in range(4)]
            fifth = connect(server)
            assert is_closed(fifth, 1.0), "a fifth socket from one address was accepted"
            fifth.close()
            for sock in held:
                sock.close()
            time.sleep(0.3)
        records = server.log_records()
        (shown,) = [r for r in records if "api_key" in r]
        assert shown["api_key"] == key
        (certificate,) = [r for r in records if r["message"] == "TLS certificate"]
        assert len(certificate["sha256_fingerprint"].split(":")) == 32
    finally:
        server.close()
    # The next start reuses everything and never shows the key again.
    again = ServerProcess(env)
    again.url = again.url.replace("http://", "https://")
    again.start(wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while "TLS certificate" not in again.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert key not in again.log_text()
        assert (credentials / "api-key").read_text().strip() == key
    finally:
        again.close()


@pytest.mark.slow
def test_requests_cut_by_the_drain_timeout_get_the_json_503(spawn: Callable[..., ServerProcess]) -> None:
    server = spawn(module=LAUNCHER_MODULE, RELIABILITY_DELAY_SECONDS="3", ANEMIA_BATCHING="off", ANEMIA_SHUTDOWN_TIMEOUT_S="1")
    result: Dict[str, object] = {}

    def slow_request() -> None:
        try:
            response = httpx.post(
                server.url + "/v1/predict", files={"image": ("a.png", valid_png(), "image/png")}, headers={"X-Request-ID": "cut-1"}, timeout=20
            )
            result["status"], result["body"], result["headers"] = response.status_code, response.text, dict(response.headers)
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)
    assert server.process is not None
    server.process.send_signal(15)
    thread.join(30)
    assert result.get("status") == 503, result
    body = json.loads(str(result["body"]))
    assert body["request_id"] == "cut-1" and body["error"]["code"] == "not_ready"
    server.wait_exit(30)


def test_the_body_budget_refuses_uploads_past_it_per_address(spawn: Callable[..., ServerProcess]) -> None:
    # 4 MiB per address: two declared 3 MiB bodies from one address cannot both be held.
    server = spawn(ANEMIA_MAX_BODY_BYTES_IN_FLIGHT_PER_CLIENT=str(4 * MIB), **FAST_EDGE)
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: box\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: 3145728\r\n\r\n"
    )
    first = connect(server)
    first.sendall(head + b"\0" * 4096)
    time.sleep(0.2)
    second = connect(server)
    second.sendall(head)
    answer = read_until_closed(second, 3.0)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "too_many_uploads"
    # Another address is not affected, and the first upload's share comes back when it ends.
    predict_ok(server, valid_png())
    first.close()
    second.close()
    time.sleep(1.5)
    third = connect(server)
    third.sendall(head)
    assert not is_closed(third, 0.3)
    third.close()
