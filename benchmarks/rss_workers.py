"""RSS of our server after warm-up, per engine-worker configuration (docs/benchmarks.md 0.10).

Each configuration starts ``python -m service`` (its own process, the thread budget's defaults plus
the configuration's settings), waits for ``/readyz`` (warm-up done), sends ``--requests``
sequential predictions, and reads the process's RSS and peak RSS (VmHWM: warm-up's batch-8
timing) from ``/proc`` and ``/v1/model``'s ``threads`` (workers, whether warm-up kept the idle
session). Sequential requests only: this is a memory measurement, not a load test, and it says
nothing about speed. Each extra ONNX Runtime session costs what it holds (weights after graph
optimisation, kernels' packed weights); the load sessions have no CPU arena, the idle session has
one.

    python -m benchmarks.rss_workers --precision fp32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.load import DEFAULT_IMAGES, DEFAULT_MODEL, PROJECT_ROOT, RunningServer, ServerSpec, load_images
from benchmarks.processes import free_port, ours_env

MIB = 1024 * 1024

#: name -> settings on top of the thread budget's (each one process). "no-idle": no idle session
#: (ANEMIA_IDLE_INTRA_OP_THREADS=1 equals the load session's count); without it, warm-up decides.
CONFIGURATIONS: Dict[str, Dict[str, str]] = {
    "budget": {},
    "1-worker": {"ANEMIA_ENGINE_WORKERS": "1"},
    "1-worker-no-idle": {"ANEMIA_ENGINE_WORKERS": "1", "ANEMIA_IDLE_INTRA_OP_THREADS": "1"},
    "2-workers-no-idle": {"ANEMIA_ENGINE_WORKERS": "2", "ANEMIA_IDLE_INTRA_OP_THREADS": "1"},
    "3-workers-no-idle": {"ANEMIA_ENGINE_WORKERS": "3", "ANEMIA_IDLE_INTRA_OP_THREADS": "1"},
}


def measure(name: str, settings: Dict[str, str], args: argparse.Namespace, images: List[Tuple[str, bytes]], work: Path) -> Dict[str, Any]:
    import httpx

    port = free_port()
    env = ours_env(port, args.model, args.engine_dir, args.precision, ANEMIA_LOG_LEVEL="warning")
    env.update(settings)
    spec = ServerSpec(name, [sys.executable, "-m", "service"], "/readyz", "/v1/predict", sys.executable, "/metrics", env)
    server = RunningServer(spec, port, None, work / "server-{}.log".format(port))
    try:
        server.wait_ready(args.ready_timeout)
        ready_rss, _ = server.rss_bytes()
        with httpx.Client(base_url=server.base_url, timeout=30.0) as client:
            for index in range(args.requests):
                file_name, data = images[index % len(images)]
                response = client.post("/v1/predict", files={"image": (file_name, data, "image/png")})
                if response.status_code != 200:
                    raise RuntimeError("{}: {} {}".format(name, response.status_code, response.text[:300]))
            threads = client.get("/v1/model").json()["threads"]
        rss, peak = server.rss_bytes()
    finally:
        server.stop()
    return {
        "configuration": name,
        "settings": settings,
        "engine_workers": threads["engine_workers"],
        "idle_session": threads["idle_session"],
        "warmup_ms": threads["warmup_ms"],
        "rss_ready_mb": round(ready_rss / MIB, 1),
        "rss_after_requests_mb": round(rss / MIB, 1),
        "peak_rss_mb": round(peak / MIB, 1),
    }


def markdown(rows: List[Dict[str, Any]], requests: int) -> str:
    lines = [
        "| configuration | engine workers | idle session kept | RSS ready MB | RSS after {} requests MB | peak MB |".format(requests),
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            "| {} | {} | {} | {} | {} | {} |".format(
                row["configuration"], row["engine_workers"], {True: "yes", False: "no", None: "-"}[row["idle_session"]],
                row["rss_ready_mb"], row["rss_after_requests_mb"], row["peak_rss_mb"],
            )
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Our server's RSS after warm-up, per engine-worker configuration.")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--engine-dir", type=Path, default=None, help="default: engines/ for the shipped model, else beside the model")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--requests", type=int, default=20, help="sequential predictions after warm-up")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS), help="of {}".format(", ".join(CONFIGURATIONS)))
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--smoke", action="store_true", help="2 requests, one round (CI)")
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.engine_dir is None:
        args.engine_dir = PROJECT_ROOT / "engines" if args.model.resolve() == DEFAULT_MODEL.resolve() else args.model.resolve().parent / "engines"
    args.model, args.engine_dir = args.model.resolve(), args.engine_dir.resolve()
    if args.smoke:
        args.requests, args.rounds = min(args.requests, 2), 1
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from benchmarks.inference import code_version, machine_info
    from service.config import load_settings
    from service.model_info import ModelInfo
    from service.startup import resolve_engine

    names = [name for name in args.configurations.split(",") if name]
    unknown = [name for name in names if name not in CONFIGURATIONS]
    if unknown:
        raise SystemExit("unknown configuration(s) {}; use {}".format(unknown, ", ".join(CONFIGURATIONS)))
    settings = load_settings(model=args.model, engine_dir=args.engine_dir, precision=args.precision, backend="onnxruntime", auto_build=True)
    resolve_engine(settings, ModelInfo.from_onnx(args.model))  # build it once, before any server starts
    images = load_images(args.images, max(1, args.requests))
    work = Path(tempfile.mkdtemp(prefix="bench-rss-"))
    rows = []
    for round_index in range(args.rounds):
        for name in names:
            row = measure(name, CONFIGURATIONS[name], args, images, work)
            row["round"] = round_index
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    report = {"precision": args.precision, "requests": args.requests, "rows": rows, "machine": machine_info(), "code": code_version()}
    if args.out_json is not None:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(rows, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
