"""OpenVINO beside ONNX Runtime on the same engine files: speed at batch 1 and label agreement.

Not a backend: docs/benchmarks.md records whether one would pay. For each file (FP32 model, INT8
Q/DQ engine) and thread count, batch-1 latency (median of interleaved timed blocks) for ONNX
Runtime (the server's session options) and OpenVINO with ``INFERENCE_PRECISION_HINT=f32`` and with
its default hint (BF16 on CPUs that have it); then the probabilities of each on real pictures
against ONNX Runtime FP32, and how many labels flip at the model's threshold.

Needs ``pip install openvino`` (kept out of the project's dependencies: it is measured, not used).

    python -m benchmarks.openvino_compare --images ../shared/data/cp-anemic --out-json benchmarks/results/openvino.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from service.model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo
from service.preprocess import preprocess_roi
from service.runtime.onnxruntime_backend import session_options

ROUNDS = 7
CALLS_PER_BLOCK = 10


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), sess_options=session_options(threads, spinning=False), providers=["CPUExecutionProvider"])
    return lambda x: np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]).reshape(len(x))


def openvino_runner(path: Path, threads: int, precision_hint: Optional[str]) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    config: Dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision_hint:
        config["INFERENCE_PRECISION_HINT"] = precision_hint
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer({INPUT_NAME: x})[compiled.output(0)]).reshape(len(x))

    run.precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))  # type: ignore[attr-defined]
    return run


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/anemia_mobilenetv2.onnx"))
    parser.add_argument("--int8", type=Path, default=None, help="INT8 engine (default: the ONNX Runtime one in engines/)")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--out-json", type=Path, default=None)
    args = parser.parse_args(argv)
    model = ModelInfo.from_onnx(args.model)
    int8 = args.int8 or next(Path("engines").glob("anemia-{}-int8-onnxruntime-*.onnx".format(model.sha256[:12])))
    paths = sorted(p for p in args.images.rglob("*.png"))
    # every k-th picture: both classes, not the first folder only
    picked = paths[:: max(1, len(paths) // args.count)][: args.count]
    tensors = np.concatenate([preprocess_roi(p.read_bytes(), None, model.spec).tensor for p in picked])
    reference = ort_runner(args.model, 2)
    ref_p = np.concatenate([reference(t[None]) for t in tensors])
    ref_label = ref_p >= model.threshold
    rows: List[Dict[str, Any]] = []
    x = tensors[:1].copy()
    for threads in [int(t) for t in args.threads.split(",")]:
        runners: Dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        for file_name, path in (("fp32", args.model), ("int8", int8)):
            runners["onnxruntime {}".format(file_name)] = ort_runner(path, threads)
            runners["openvino {} f32".format(file_name)] = openvino_runner(path, threads, "f32")
            runners["openvino {} default".format(file_name)] = openvino_runner(path, threads, None)
        blocks: Dict[str, List[float]] = {name: [] for name in runners}
        for run in runners.values():
            for _ in range(3):
                run(x)
        for _ in range(ROUNDS):
            for name, run in runners.items():
                run(x)
                started = time.perf_counter()
                for _ in range(CALLS_PER_BLOCK):
                    run(x)
                blocks[name].append((time.perf_counter() - started) / CALLS_PER_BLOCK * 1000.0)
        for name, run in runners.items():
            p = np.concatenate([run(t[None]) for t in tensors])
            rows.append(
                {
                    "runtime": name,
                    "threads": threads,
                    "executes_in": getattr(run, "precision", "f32 (ORT CPU)"),
                    "median_ms": float(np.median(blocks[name])),
                    "labels_differing_from_ort_fp32": int(np.sum((p >= model.threshold) != ref_label)),
                    "mean_abs_dp": float(np.mean(np.abs(p - ref_p))),
                    "max_abs_dp": float(np.max(np.abs(p - ref_p))),
                }
            )
            print("{runtime:28s} t={threads} {executes_in:14s} {median_ms:6.2f} ms  labels differing {labels_differing_from_ort_fp32:3d}/{n}  mean|dp| {mean_abs_dp:.4f}".format(n=len(tensors), **rows[-1]), flush=True)
    import openvino as ov

    report = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "openvino": ov.__version__, "images": len(tensors), "threshold": model.threshold,
              "loadavg": Path("/proc/loadavg").read_text().strip(), "rows": rows}
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
