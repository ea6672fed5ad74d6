"""Raw inference speed: every built precision on every available backend, against this CPU's floor.

For each engine in the manifest that belongs to the model (and whose backend can run here), a fresh
child process opens it through the service's own backend factory and times ``backend.infer`` at
batch 1, 8 and 32 on real CP-AnemiC tensors (random ones when the data set is absent): median and
p90 latency after warm-up, images per second, the child's peak RSS, the engine's file size.

The floor: the model's FLOPs, counted from the ONNX graph (2 x multiply-accumulates of every Conv,
Gemm and MatMul at batch 1), over the best matrix-multiply rate measured on this machine with the
same thread count (NumPy's BLAS and ONNX Runtime's MatMul for float32, ONNX Runtime's
MatMulInteger for INT8). No real network reaches it (depthwise convolutions are memory-bound), so
"x floor" says how far each precision is from what the arithmetic units could do.

    python -m benchmarks.inference --threads 2 --cpus 0,1 --out-json docs/benchmarks/inference.json
    python -m benchmarks.inference --smoke            # CI: a handful of runs, no timing claims
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = PROJECT_ROOT / "models" / "anemia_mobilenetv2.onnx"
STANDIN_MODEL = PROJECT_ROOT / "build" / "bench" / "anemia_mobilenetv2_standin.onnx"
DEFAULT_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "cp-anemic"
PRECISION_ORDER = ("fp32", "fp16", "int8", "int4")


# ---------------------------------------------------------------------------------------------
# FLOPs from the graph


def count_flops(model_path: Path, chw: Sequence[int]) -> Dict[str, Any]:
    """2 x MACs of every Conv, Gemm and MatMul at batch 1, summed by op type.

    The shapes come from running the graph once in ONNX Runtime with every operand exposed as an
    output: the exported TF-"SAME" padding is computed in-graph, which static shape inference
    cannot follow.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    counted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    existing = {o.name for o in model.graph.output}
    initializers = {t.name: list(t.dims) for t in model.graph.initializer}
    wanted: List[str] = []
    for node in counted:
        for name in (node.input[0], node.input[1], node.output[0]):
            if name not in initializers and name not in existing and name not in wanted:
                wanted.append(name)
    model.graph.output.extend([onnx.ValueInfoProto(name=name) for name in wanted])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed: Dict[str, np.ndarray] = {session.get_inputs()[0].name: np.zeros((1,) + tuple(chw), np.float32)}
    shapes: Dict[str, List[int]] = {name: list(value.shape) for name, value in zip(names, session.run(names, feed))}
    shapes.update(initializers)
    by_op: Dict[str, int] = {}
    for node in counted:
        a, b, out = shapes[node.input[0]], shapes[node.input[1]], shapes[node.output[0]]
        if node.op_type == "Conv":
            # weight [Cout, Cin/group, kh, kw]: each output element costs Cin/group*kh*kw MACs.
            macs = int(np.prod(out)) * int(np.prod(b[1:]))
        else:
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            macs = int(np.prod(out)) * int(a[-2] if trans_a else a[-1])
        by_op[node.op_type] = by_op.get(node.op_type, 0) + 2 * macs
    return {"flops_per_image": int(sum(by_op.values())), "by_op": by_op, "method": "2 x MACs of Conv, Gemm, MatMul at batch 1"}


# ---------------------------------------------------------------------------------------------
# Matrix-multiply rates (run in a child with the thread count fixed before NumPy loads)


def _time_best(func: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - started)
    return best


def _matmul_model(path: Path, n: int, integer: bool) -> None:
    import onnx
    from onnx import TensorProto, helper

    if integer:
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    else:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
    model = helper.make_model(helper.make_graph([node], "gemm", [a, b], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def measure_gemm(threads: int, n: int, repeats: int) -> Dict[str, Any]:
    import onnxruntime as ort

    flops = 2.0 * n * n * n
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    np.dot(a, b)
    numpy_seconds = _time_best(lambda: np.dot(a, b), repeats)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    result: Dict[str, Any] = {"n": n, "threads": threads, "numpy_fp32_gflops": flops / numpy_seconds / 1e9}
    with tempfile.TemporaryDirectory() as scratch:
        for integer in (False, True):
            path = Path(scratch) / ("int.onnx" if integer else "float.onnx")
            _matmul_model(path, n, integer)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            feed: Dict[str, np.ndarray]
            if integer:
                feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
            else:
                feed = {"a": a, "b": b}
            session.run(None, feed)
            seconds = _time_best(lambda: session.run(None, feed), repeats)
            result["ort_int8_gops" if integer else "ort_fp32_gflops"] = flops / seconds / 1e9
    result["fp32_gflops"] = max(result["numpy_fp32_gflops"], result["ort_fp32_gflops"])
    return result


# ---------------------------------------------------------------------------------------------
# One engine, in a child process (its peak RSS is its own)


def load_tensors(images: Optional[Path], count: int, spec: Any) -> np.ndarray:
    """``count`` real CP-AnemiC tensors (repeated when fewer), else uniform noise in [-1, 1]."""
    if images is not None and images.is_dir():
        from service.preprocess import preprocess_roi

        # Plain preprocess_roi (not engine_build.quantization's loader): that module imports
        # onnxruntime.quantization, whose dependencies would inflate the peak RSS measured here.
        paths = sorted(p for p in images.rglob("*.png"))[:count]
        if paths:
            tensors = np.concatenate([preprocess_roi(p.read_bytes(), None, spec).tensor for p in paths], axis=0)
            reps = -(-count // len(tensors))
            return np.concatenate([tensors] * reps, axis=0)[:count]
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (count,) + tuple(spec.chw)).astype(np.float32)


def peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def bench_engine(args: argparse.Namespace) -> Dict[str, Any]:
    from service.config import load_settings
    from service.model_info import ModelInfo
    from service.startup import backend_factory, resolve_engine

    rss_before_bytes = peak_rss_bytes()
    model = ModelInfo.from_onnx(Path(args.model))
    batches = [int(b) for b in args.batches.split(",")]
    settings = load_settings(
        model=Path(args.model),
        engine_dir=Path(args.engine_dir),
        precision=args.precision,
        backend=args.backend,
        intra_op_threads=args.threads,
        max_batch=max(batches),
    )
    engine = resolve_engine(settings, model)
    tensors = load_tensors(Path(args.images) if args.images else None, max(batches), model.spec)
    rss_loaded_inputs_bytes = peak_rss_bytes()
    opened = time.perf_counter()
    backend = backend_factory(settings, engine)()
    open_seconds = time.perf_counter() - opened
    rows: List[Dict[str, Any]] = []
    try:
        for batch in batches:
            feed = np.ascontiguousarray(tensors[:batch])
            for _ in range(args.warmup):
                backend.infer(feed)
            times: List[float] = []
            deadline = time.perf_counter() + args.max_seconds
            while len(times) < args.min_iterations or (len(times) < args.iterations and time.perf_counter() < deadline):
                started = time.perf_counter()
                backend.infer(feed)
                times.append(time.perf_counter() - started)
            ms = np.asarray(times) * 1000.0
            median_ms = float(np.median(ms))
            rows.append(
                {
                    "batch": batch,
                    "iterations": len(times),
                    "median_ms": median_ms,
                    "p90_ms": float(np.percentile(ms, 90)),
                    "min_ms": float(ms.min()),
                    "images_per_second": batch / (median_ms / 1000.0),
                    # Batches run in ascending order, so this is the peak up to this batch size
                    # (ONNX Runtime's arena grows with the batch's activations).
                    "peak_rss_bytes": peak_rss_bytes(),
                }
            )
    finally:
        backend.close()
    return {
        "precision": args.precision,
        "backend": engine.backend,
        "engine_file": engine.entry.file,
        "file_size_bytes": engine.entry.file_size_bytes,
        "threads": args.threads,
        "open_seconds": open_seconds,
        "rss_before_model_bytes": rss_loaded_inputs_bytes,
        "rss_interpreter_bytes": rss_before_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# The parent: which engines, children, tables


def child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(argv: Sequence[str], threads: int, cpus: Optional[str], timeout_seconds: float) -> Dict[str, Any]:
    from benchmarks.load import machine_busy_seconds

    command = [sys.executable, "-m", "benchmarks.inference"] + list(argv)
    if cpus:
        command = ["taskset", "-c", cpus] + command
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, started = machine_busy_seconds(), time.perf_counter()
    done = subprocess.run(command, env=child_env(threads), cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=timeout_seconds)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    if done.returncode != 0:
        raise RuntimeError("{} failed ({}):\n{}".format(" ".join(command), done.returncode, done.stderr[-3000:]))
    result = dict(json.loads(done.stdout.strip().splitlines()[-1]))
    # Other processes' CPU while this child ran, in cores: contention that would skew the timing.
    result["other_load_cores"] = max(0.0, machine_busy_seconds() - busy_before - own) / wall
    return result


def available_backends() -> List[str]:
    from engine_build.backends import tensorrt_available

    return ["onnxruntime"] + (["tensorrt"] if tensorrt_available() else [])


def built_engines(model_path: Path, engine_dir: Path, backends: Sequence[str]) -> List[Dict[str, Any]]:
    from service.engines import EngineManifest
    from service.model_info import ModelInfo

    model = ModelInfo.from_onnx(model_path)
    manifest = EngineManifest.load(engine_dir)
    found = [e.to_dict() for e in manifest.entries if e.model_sha256 == model.sha256 and e.backend in backends]
    return sorted(found, key=lambda e: (e["backend"], PRECISION_ORDER.index(e["precision"]) if e["precision"] in PRECISION_ORDER else 9))


def build_missing(model_path: Path, engine_dir: Path, backends: Sequence[str]) -> List[str]:
    """Build every precision that can be built without a data set; say why the others were not."""
    from engine_build.build import build_engine

    notes: List[str] = []
    for backend in backends:
        for precision in PRECISION_ORDER:
            try:
                build_engine(model_path, precision, backend, engine_dir)
            except Exception as exc:  # a precision that cannot be built here is reported, not fatal
                notes.append("{} {} not built: {}".format(backend, precision, str(exc).splitlines()[0][:200]))
    return notes


def display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def code_version() -> Dict[str, Any]:
    """The commit measured, and whether service/ had uncommitted changes (then the numbers are of those)."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git"] + list(args), cwd=str(PROJECT_ROOT), capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD"), "service_uncommitted_changes": bool(git("status", "--porcelain", "service"))}


def machine_info() -> Dict[str, Any]:
    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return {
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else None,
        "cpu": model_name,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def markdown(result: Dict[str, Any]) -> str:
    gemm = result["gemm"]
    flops = result["flops"]["flops_per_image"]
    lines = [
        "Model `{}` ({}), {:.3f} GFLOPs per image; threads {}, CPUs {}.".format(
            result["model"], result["model_note"], flops / 1e9, result["threads"], result["cpus"] or "all"
        ),
        "Matrix-multiply rate ({} threads, n={}): NumPy fp32 {:.1f} GFLOP/s, ONNX Runtime fp32 {:.1f} GFLOP/s, "
        "ONNX Runtime int8 (MatMulInteger) {:.1f} GOP/s.".format(
            gemm["threads"], gemm["n"], gemm["numpy_fp32_gflops"], gemm["ort_fp32_gflops"], gemm["ort_int8_gops"]
        ),
        "",
        "| precision | backend | file MB | batch | median ms | p90 ms | images/s | peak RSS MB (process, up to this batch) | floor ms | x floor | other load (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine in result["engines"]:
        for row in engine["rows"]:
            lines.append(
                "| {} | {} | {:.2f} | {} | {:.2f} | {:.2f} | {:.1f} | {:.0f} | {:.2f} | {:.1f} | {:.2f} |".format(
                    engine["precision"],
                    engine["backend"],
                    engine["file_size_bytes"] / 1e6,
                    row["batch"],
                    row["median_ms"],
                    row["p90_ms"],
                    row["images_per_second"],
                    row.get("peak_rss_bytes", engine["peak_rss_bytes"]) / 2**20,
                    row["floor_ms"],
                    row["x_floor"],
                    engine.get("other_load_cores", 0.0),
                )
            )
    for note in result.get("notes", []):
        lines.append("")
        lines.append("Note: " + note)
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Raw inference speed per precision and backend.")
    parser.add_argument("--model", type=Path, default=None, help="FP32 ONNX (default: models/anemia_mobilenetv2.onnx, else the stand-in)")
    parser.add_argument("--engine-dir", type=Path, default=None, help="default: engines/ for models/anemia_mobilenetv2.onnx, else engines/ beside the model")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (and BLAS threads for the GEMM rate)")
    parser.add_argument("--cpus", default=None, help="taskset CPU list for the children, e.g. 0 or 0,1")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200, help="at most this many timed runs per batch")
    parser.add_argument("--min-iterations", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=6.0, help="stop adding runs after this long per batch")
    parser.add_argument("--gemm-n", type=int, default=1024)
    parser.add_argument("--build", action="store_true", help="build the missing precisions first")
    parser.add_argument("--smoke", action="store_true", help="a handful of runs at batch 1 and 2 (CI)")
    parser.add_argument("--out-json", type=Path, default=None)
    parser.add_argument("--out-md", type=Path, default=None)
    # child modes
    parser.add_argument("--child-engine", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-gemm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="onnxruntime", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_gemm:
        print(json.dumps(measure_gemm(args.threads, args.gemm_n, 3 if args.smoke else 10)))
        return 0
    if args.child_engine:
        print(json.dumps(bench_engine(args)))
        return 0

    model_path = args.model
    if model_path is None:
        model_path = DEFAULT_MODEL if DEFAULT_MODEL.is_file() else STANDIN_MODEL
    if not model_path.is_file():
        parser.error("no model at {}; train one or run `python -m benchmarks.standin_model --int8`".format(model_path))
    engine_dir = args.engine_dir or (PROJECT_ROOT / "engines" if model_path.resolve() == DEFAULT_MODEL.resolve() else model_path.resolve().parent / "engines")
    if args.smoke:
        args.batches, args.warmup, args.iterations, args.min_iterations, args.gemm_n = "1,2", 1, 3, 3, 256
    from service.model_info import ModelInfo

    model = ModelInfo.from_onnx(model_path)
    backends = available_backends()
    notes = build_missing(model_path, engine_dir, backends) if args.build else []
    engines = built_engines(model_path, engine_dir, backends)
    if not engines:
        parser.error("no engines for {} in {}; run with --build or `python build_engines.py`".format(model_path, engine_dir))
    flops = count_flops(model_path, model.spec.chw)
    common = ["--threads", str(args.threads)] + (["--smoke"] if args.smoke else [])
    gemm = run_child(["--child-gemm", "--gemm-n", str(args.gemm_n)] + common, args.threads, args.cpus, 600)
    results: List[Dict[str, Any]] = []
    for entry in engines:
        child_argv = [
            "--child-engine",
            "--model", str(model_path),
            "--engine-dir", str(engine_dir),
            "--images", str(args.images) if args.images else "",
            "--precision", entry["precision"],
            "--backend", entry["backend"],
            "--batches", args.batches,
            "--warmup", str(args.warmup),
            "--iterations", str(args.iterations),
            "--min-iterations", str(args.min_iterations),
            "--max-seconds", str(args.max_seconds),
        ] + common
        engine = run_child(child_argv, args.threads, args.cpus, 900)
        rate = gemm["ort_int8_gops"] if entry["precision"] == "int8" else gemm["fp32_gflops"]
        for row in engine["rows"]:
            row["floor_ms"] = flops["flops_per_image"] * row["batch"] / (rate * 1e9) * 1000.0
            row["x_floor"] = row["median_ms"] / row["floor_ms"]
        engine["floor_rate_g_per_s"] = rate
        results.append(engine)
        print("{:5s} {:12s} ".format(entry["precision"], entry["backend"]) + "  ".join(
            "b{}: {:.2f} ms".format(r["batch"], r["median_ms"]) for r in engine["rows"]
        ), file=sys.stderr)
    note = model.metadata.get("benchmark_note")
    result = {
        "model": display_path(model_path),
        "model_note": note or "{} {}".format(model.name, model.version),
        "model_sha256": model.sha256,
        "threads": args.threads,
        "cpus": args.cpus,
        "smoke": args.smoke,
        "machine": machine_info(),
        "code": code_version(),
        "flops": flops,
        "gemm": gemm,
        "engines": results,
        "notes": notes,
        "command": " ".join(["python", "-m", "benchmarks.inference"] + (argv if argv is not None else sys.argv[1:])),
    }
    text = markdown(result)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(result, indent=2) + "\n")
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
