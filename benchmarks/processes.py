"""Loopback ports and process memory, shared by the benchmarks and the tests that start servers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Dict, Union


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the OS picks it; loopback only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open("/proc/{}/status".format(pid)) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS for pid {}".format(pid))


def ours_env(port: int, model: Union[str, Path], engine_dir: Union[str, Path], precision: str, **extra: str) -> Dict[str, str]:
    """The environment our server starts with in a benchmark: loopback, the model and engines given,
    ONNX Runtime; ``extra`` adds ANEMIA_* settings (``ANEMIA_LOG_LEVEL="warning"``...)."""
    env = {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ANEMIA_MODEL": str(model),
        "ANEMIA_ENGINE_DIR": str(engine_dir),
        "ANEMIA_PRECISION": precision,
        "ANEMIA_BACKEND": "onnxruntime",
    }
    env.update(extra)
    return env
