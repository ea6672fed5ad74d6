"""A real uvicorn process on a loopback port, for tests that need real sockets and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import httpx
from benchmarks.processes import free_port, rss_bytes

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
SERVICE_MODULE = "service"
LAUNCHER_MODULE = "tests.reliability.launcher"






class ServerProcess:
    """``python -m service`` (or the test launcher) with ANEMIA_* settings from ``env``.

    stderr (the JSON logs) goes to a file so a chatty server can never block on a full pipe.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        module: str = SERVICE_MODULE,
        prefix: Sequence[str] = (),
        startup_timeout_seconds: float = 60.0,
    ) -> None:
        self.port = free_port()
        self.url = "http://127.0.0.1:{}".format(self.port)
        self.module = module
        self.prefix = list(prefix)
        self.startup_timeout_seconds = startup_timeout_seconds
        self.env = dict(os.environ)
        # One ONNX Runtime thread: the machine has 2 cores and the client runs beside the server.
        self.env.setdefault("ANEMIA_INTRA_OP_THREADS", "1")
        self.env.setdefault("ANEMIA_PREPROCESS_THREADS", "1")
        self.env.update(env)
        self.env.update({"HOST": "127.0.0.1", "PORT": str(self.port), "PYTHONUNBUFFERED": "1"})
        self.log_path = Path(tempfile.mkstemp(prefix="anemia-server-", suffix=".log")[1])
        self.process: Optional["subprocess.Popen[bytes]"] = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait_ready: bool = True) -> "ServerProcess":
        with open(str(self.log_path), "wb") as log:
            self.process = subprocess.Popen(
                self.prefix + [sys.executable, "-m", self.module],
                cwd=str(PROJECT_ROOT),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError("the server exited with {}:\n{}".format(self.process.returncode, self.log_text()))
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server was not ready in {} s:\n{}".format(self.startup_timeout_seconds, self.log_text()))

    def wait_exit(self, timeout_seconds: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout_seconds)

    def terminate(self, timeout_seconds: float = 40.0) -> int:
        """SIGTERM, as systemd or Docker stop it, and wait for the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> List[Dict[str, Any]]:
        """Every stderr line parsed as JSON; a line that is not JSON fails the caller's test."""
        records = []
        for line in self.log_text().splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise AssertionError("a log line is not JSON: {!r}".format(line[:300])) from None
        return records

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
        try:
            self.log_path.unlink()
        except OSError:
            pass

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.close()


def metric(url: str, name: str) -> float:
    """One unlabelled sample from /metrics."""
    for line in httpx.get(url + "/metrics", timeout=5.0).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError("metric {} not exposed".format(name))
