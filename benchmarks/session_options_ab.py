"""ONNX Runtime session options side by side on one engine file, interleaved in one process.

Batch-1 latency (median and best of timed blocks, the sessions taking turns so a burst of other
load hits all alike) and the resident memory each configuration leaves after a batch-8 run:
intra-op threads, spinning, and the CPU memory arena (docs/benchmarks.md, memory).

    python -m benchmarks.session_options_ab engines/anemia-…-int8-onnxruntime-cpu-1.32.0.onnx
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

ROUNDS = 12
CALLS_PER_BLOCK = 10
CONFIGS = {  # name: (threads, spinning, arena)
    "1 thread, no spin, arena": (1, False, True),
    "1 thread, no spin, no arena (server, load session)": (1, False, False),
    "2 threads, spin, arena (ORT default; the server's idle session)": (2, True, True),
    "2 threads, spin, no arena": (2, True, False),
    "2 threads, no spin, no arena": (2, False, False),
    "2 threads, no spin, arena": (2, False, True),
}


def session(path: str, threads: int, spinning: bool, arena: bool):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    from service.runtime.onnxruntime_backend import session_options

    return ort.InferenceSession(path, sess_options=session_options(threads, spinning, memory_arena=arena), providers=["CPUExecutionProvider"])


def rss_after_batch8(path: str, name: str) -> float:
    """Resident MB of a fresh process holding one such session after batch 1 and batch 8 runs."""
    code = (
        "import numpy as np, sys; from benchmarks.session_options_ab import session, CONFIGS\n"
        "s = session(sys.argv[1], *CONFIGS[sys.argv[2]])\n"
        "[s.run(None, {'image': np.zeros((b, 3, 224, 224), np.float32)}) for b in (1, 8, 8, 1)]\n"
        "print(int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) / 1024)"
    )
    done = subprocess.run([sys.executable, "-c", code, path, name], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0]
    sessions = {name: session(path, *config) for name, config in CONFIGS.items()}
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    blocks: Dict[str, List[float]] = {name: [] for name in sessions}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, {"image": x})
    for _ in range(ROUNDS):
        for name, s in sessions.items():
            s.run(None, {"image": x})
            started = time.perf_counter()
            for _ in range(CALLS_PER_BLOCK):
                s.run(None, {"image": x})
            blocks[name].append((time.perf_counter() - started) / CALLS_PER_BLOCK * 1000.0)
    print("load average: " + open("/proc/loadavg").read().strip())
    print("| session options | batch-1 median ms | best block ms | RSS after batch 8, own process, MB |")
    print("|---|---:|---:|---:|")
    for name, values in blocks.items():
        print("| {} | {:.2f} | {:.2f} | {:.0f} |".format(name, float(np.median(values)), min(values), rss_after_batch8(path, name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
