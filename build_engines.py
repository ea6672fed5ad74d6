"""Build, quantize, evaluate and benchmark the per-precision engines.

    python build_engines.py --backend onnxruntime --precision all            # build (default command)
    python build_engines.py --backend onnxruntime --precision int8 --if-missing
    python build_engines.py quantize --model models/anemia_mobilenetv2.onnx --calibration-dir ../shared/data/cp-anemic
    python build_engines.py evaluate --backend onnxruntime --out-dir reports/quantization
    python build_engines.py benchmark --backend onnxruntime --precision all
    python build_engines.py saturation       # u8 x s8 saturation on x86 without VNNI, simulated

Engines go to ``--engine-dir`` (ANEMIA_ENGINE_DIR, default engines/) and are recorded in its
manifest.json keyed by the FP32 model's sha256, precision, backend, device and tool version.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from engine_build.backends import AUTO, BACKENDS, get_backend
from engine_build.build import build_engine
from engine_build.quantization.calibration import list_images, load_tensors, pick_subset
from engine_build.quantization.int8 import (
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_METHOD,
    DEFAULT_PERCENTILE,
    Int8Options,
    quantize_int8,
)
from engine_build.quantization.int8_artifact import int8_artifact_path
from engine_build.quantization.modes import ROUNDING_MODES, WEIGHT_MODES
from service.config import PRECISIONS, Settings, SettingsError, load_settings
from service.errors import EngineError, ServiceError
from service.model_info import ModelInfo

PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "cp-anemic"
COMMANDS = ("build", "quantize", "evaluate", "benchmark", "saturation")


def _precisions(value: str) -> List[str]:
    if value == "all":
        return list(PRECISIONS)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in PRECISIONS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError("precision must be all or a comma list of {}".format(", ".join(PRECISIONS)))
    return chosen


def _backend(value: str) -> str:
    if value != AUTO and value not in BACKENDS:
        raise argparse.ArgumentTypeError("backend must be {} or {}".format(", ".join(BACKENDS), AUTO))
    return get_backend(value).name


def _add_common(parser: argparse.ArgumentParser, settings: Settings, model_default: Optional[Path]) -> None:
    parser.add_argument("--backend", type=_backend, default="onnxruntime", help="{} or {} (default onnxruntime)".format(", ".join(BACKENDS), AUTO))
    parser.add_argument("--model", type=Path, default=model_default, help="FP32 ONNX model (default: $ANEMIA_MODEL or models/anemia_mobilenetv2.onnx)")
    parser.add_argument("--engine-dir", type=Path, default=settings.engine_dir, help="engine directory (default: $ANEMIA_ENGINE_DIR or engines/)")


def _add_quant_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration-dir", type=Path, action="append", default=None,
                        help="calibration images (repeatable; default ../shared/data/cp-anemic when present)")
    parser.add_argument("--calibration-limit", type=int, default=128, help="at most this many calibration images (random, seed 0)")
    parser.add_argument("--method", choices=CALIBRATION_METHODS, default=DEFAULT_CALIBRATION_METHOD, help="INT8 activation calibration")
    parser.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE)
    parser.add_argument("--keep-float", default="", help="comma list of layers kept in float: node names, first_conv, classifier")
    parser.add_argument("--bias-correction", action="store_true", help="analytic weight-rounding bias correction (off by default: measured no gain)")
    parser.add_argument("--reduce-range", action="store_true", help="7-bit weights: no u8 x s8 saturation on x86 CPUs without VNNI")
    parser.add_argument("--int4-rounding", choices=ROUNDING_MODES, default=None,
                        help="INT4 rounding (default gptq with calibration images, else refuse: data-free INT4 collapses this model)")


def build_parser(settings: Optional[Settings] = None) -> Dict[str, argparse.ArgumentParser]:
    """One parser per command; defaults the server shares (model, engine dir, batch, threads) come from ``settings``."""
    settings = settings or load_settings()
    parsers: Dict[str, argparse.ArgumentParser] = {}
    build = argparse.ArgumentParser(prog="python build_engines.py [build]", description="Build per-precision engines and record them in the manifest.")
    _add_common(build, settings, settings.model)
    build.add_argument("--precision", type=_precisions, default=list(PRECISIONS), help="all (default) or a comma list of fp32,fp16,int8,int4")
    build.add_argument("--if-missing", action="store_true", help="keep engines the manifest already lists with an intact file")
    build.add_argument("--int8-model", type=Path, default=None, help="calibrated INT8 Q/DQ model (default <model>.int8.onnx)")
    build.add_argument("--max-batch", type=int, default=settings.max_batch, help="TensorRT optimization profile maximum batch")
    build.add_argument("--workspace-mib", type=int, default=256, help="TensorRT builder workspace limit")
    build.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache file")
    build.add_argument("--calibration-dir", type=Path, action="append", default=None, help="images for INT4 GPTQ (default ../shared/data/cp-anemic)")
    build.add_argument("--calibration-limit", type=int, default=32)
    build.add_argument("--int4-rounding", choices=ROUNDING_MODES, default=None)
    build.add_argument("--ort-int8-weights", choices=WEIGHT_MODES, default="auto",
                       help="ONNX Runtime INT8 weights: auto/s8 = as committed; u8 or s8-reduce-range avoid the u8 x s8 saturation "
                            "of x86 CPUs without VNNI (measured: both cost more accuracy than the saturation, docs/quantization.md)")
    build.add_argument("--verbose", action="store_true")
    parsers["build"] = build

    quantize = argparse.ArgumentParser(prog="python build_engines.py quantize", description="Calibrate the INT8 Q/DQ model (<model>.int8.onnx).")
    quantize.add_argument("--model", type=Path, default=settings.model)
    quantize.add_argument("--out", type=Path, default=None, help="default <model>.int8.onnx")
    quantize.add_argument("--folds", type=Path, default=None, help="folds.json: calibrate on the images of its training folds only")
    quantize.add_argument("--fold", type=int, default=None, help="with --folds: this fold's train+val images (default: every image in folds.json)")
    _add_quant_options(quantize)
    parsers["quantize"] = quantize

    evaluate = argparse.ArgumentParser(prog="python build_engines.py evaluate", description="Out-of-fold evaluation of every precision, or of built engines.")
    # No default model: the out-of-fold mode times fold 0 unless --model or --latency-model names one.
    _add_common(evaluate, settings, None)
    evaluate.add_argument("--mode", choices=("oof", "engines"), default="oof",
                          help="oof: per-fold models + their quantized twins on CP-AnemiC; engines: built engines on a labelled folder")
    evaluate.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="labelled images: Anemic/ and Non-anemic/")
    evaluate.add_argument("--folds", type=Path, default=PROJECT_ROOT / "models" / "cv" / "folds.json")
    evaluate.add_argument("--fold-models", default=str(PROJECT_ROOT / "runs" / "cv" / "fold{k}" / "model.onnx"), help="pattern with {k}")
    evaluate.add_argument("--oof-csv", type=Path, default=PROJECT_ROOT / "models" / "cv" / "oof_predictions.csv",
                          help="training's OOF predictions, to cross-check the FP32 scores")
    evaluate.add_argument("--operating-point", type=Path, default=None,
                          help="calibration report (python -m training.calibration apply --report): judge each fold at its "
                          "operating-point threshold (target sensitivity on its validation split) instead of its model's metadata threshold")
    evaluate.add_argument("--clusters", type=Path, default=PROJECT_ROOT / "models" / "cv" / "duplicate_clusters.json",
                          help="duplicate clusters (python -m training.duplicates): intervals resample photographs; ignored if missing")
    evaluate.add_argument("--precision", type=_precisions, default=list(PRECISIONS))
    evaluate.add_argument("--int8-variants", default="",
                          help="extra INT8 rows, comma list of method[+bc|+nobc][+rr][+keep][+qdq] e.g. entropy,minmax+bc,percentile+rr,minmax+qdq "
                               "(+qdq: the committed Q/DQ form, TensorRT's arithmetic, instead of ONNX Runtime's layout)")
    evaluate.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / "runs" / "quant-eval")
    evaluate.add_argument("--bootstrap", type=int, default=1000)
    evaluate.add_argument("--latency-model", type=Path, default=None, help="time this model's artifacts (default --model, else fold 0)")
    evaluate.add_argument("--threads", type=int, default=settings.intra_op_threads, help="ONNX Runtime intra-op threads (0 = ORT default)")
    evaluate.add_argument("--no-latency", dest="skip_latency", action="store_true", help="skip the latency measurement")
    _add_quant_options(evaluate)
    parsers["evaluate"] = evaluate

    bench = argparse.ArgumentParser(prog="python build_engines.py benchmark", description="Latency and throughput of built engines with the server's backend.")
    _add_common(bench, settings, settings.model)
    bench.add_argument("--precision", type=_precisions, default=list(PRECISIONS))
    bench.add_argument("--threads", type=int, default=settings.intra_op_threads)
    bench.add_argument("--max-batch", type=int, default=32)
    bench.add_argument("--runs", type=int, default=50)
    bench.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parsers["benchmark"] = bench

    sat = argparse.ArgumentParser(prog="python build_engines.py saturation",
                                  description="Simulate the u8 x s8 int16 saturation of x86 CPUs without VNNI on an INT8 model's real activations.")
    sat.add_argument("--model", type=Path, default=settings.model, help="FP32 model (its <model>.int8.onnx is checked) ")
    sat.add_argument("--int8-model", type=Path, default=None)
    sat.add_argument("--calibration-dir", type=Path, action="append", default=None)
    sat.add_argument("--calibration-limit", type=int, default=8)
    sat.add_argument("--max-positions", type=int, default=2048, help="output positions sampled per layer")
    parsers["saturation"] = sat
    return parsers


# ---------------------------------------------------------------------------------------------
# helpers


def calibration_paths(dirs: Optional[Sequence[Path]], limit: Optional[int], seed: int = 0) -> List[Path]:
    roots = list(dirs) if dirs else ([DEFAULT_DATA_DIR] if DEFAULT_DATA_DIR.is_dir() else [])
    return pick_subset(list_images(roots), limit, seed)


def _int8_options(args: argparse.Namespace) -> Int8Options:
    keep = tuple(k.strip() for k in args.keep_float.split(",") if k.strip())
    return Int8Options(method=args.method, percentile=args.percentile, keep_float=keep, bias_correction=args.bias_correction, reduce_range=args.reduce_range)


def _print_entry(entry: Any, engine_dir: Path) -> None:
    info = entry.build_info
    extra = []
    for key in ("calibration_method", "rounding", "size_vs_fp32"):
        if key in info and info[key] is not None:
            extra.append("{}={}".format(key, info[key]))
    if info.get("int4_layers"):
        extra.append("int4_layers={}".format(len(info["int4_layers"])))
    print("{:5s} {:12s} {} ({:.2f} MB, {:.1f} s) {}".format(
        entry.precision, entry.backend, Path(engine_dir) / entry.file, entry.file_size_bytes / 1e6, entry.build_seconds, " ".join(extra)))


# ---------------------------------------------------------------------------------------------
# commands


def cmd_build(args: argparse.Namespace, command: str) -> int:
    backend = get_backend(args.backend)
    flags: Dict[str, Any] = {
        "int8_model": args.int8_model,
        "int8_weights": args.ort_int8_weights,
        "max_batch": args.max_batch,
        "workspace_mib": args.workspace_mib,
        "timing_cache": args.timing_cache,
        "verbose": args.verbose,
    }
    failures = 0
    for precision in args.precision:
        started = time.perf_counter()
        try:
            values = dict(flags)
            # A backend whose INT4 rounds with calibration images (GPTQ) declares int4_tensors.
            if precision == "int4" and "int4_tensors" in backend.option_names:
                rounding = args.int4_rounding
                paths = calibration_paths(args.calibration_dir, args.calibration_limit) if rounding in (None, "gptq") else []
                if rounding is None:
                    if not paths:
                        raise EngineError(
                            "INT4 needs calibration images for GPTQ rounding (data-free INT4 collapses this model's accuracy, "
                            "see docs/quantization.md); pass --calibration-dir DIR, or --int4-rounding mse to build it anyway"
                        )
                    rounding = "gptq"
                spec = ModelInfo.from_onnx(args.model).spec
                values.update(int4_rounding=rounding, int4_tensors=load_tensors(paths, spec) if paths else None)
            entry = build_engine(args.model, precision, backend, args.engine_dir, backend.options_from_flags(values), force=not args.if_missing)
        except EngineError as exc:
            failures += 1
            print("{:5s} {:12s} FAILED: {}".format(precision, backend.name, exc.message), file=sys.stderr)
            continue
        _print_entry(entry, args.engine_dir)
        logging.getLogger(__name__).debug("%s took %.1f s", precision, time.perf_counter() - started)
    return 1 if failures else 0


def _fold_ids(folds_path: Path, fold: Optional[int]) -> List[str]:
    payload = json.loads(Path(folds_path).read_text())
    ids: List[str] = []
    for entry in payload["folds"]:
        if fold is None:
            ids.extend(entry["train_ids"] + entry["val_ids"] + entry["test_ids"])
        elif int(entry["fold"]) == fold:
            ids.extend(entry["train_ids"] + entry["val_ids"])
    return sorted(set(ids))


def cmd_quantize(args: argparse.Namespace, command: str) -> int:
    model_path = args.model
    model = ModelInfo.from_onnx(model_path)
    roots = list(args.calibration_dir) if args.calibration_dir else [DEFAULT_DATA_DIR]
    images = list_images(roots)
    note = "images under {}".format(", ".join(str(r) for r in roots))
    if args.folds is not None:
        wanted = set(_fold_ids(args.folds, args.fold))
        images = [p for p in images if p.stem in wanted]
        note = "training images of {} ({})".format(args.folds, "fold {} train+val".format(args.fold) if args.fold is not None else "all folds")
    chosen = pick_subset(images, args.calibration_limit, seed=0)
    if not chosen:
        print("no calibration images found under {}".format(", ".join(map(str, roots))), file=sys.stderr)
        return 2
    tensors = load_tensors(chosen, model.spec)
    target = args.out or int8_artifact_path(model_path)
    result = quantize_int8(model_path, target, tensors, _int8_options(args), calibration_note="{} of {} {}".format(len(chosen), len(images), note))
    size = target.stat().st_size
    print("wrote {} ({:.2f} MB, {:.0%} of FP32) in {:.1f} s: {} calibration, {} images, bias correction {}, kept float {}".format(
        target, size / 1e6, size / Path(model_path).stat().st_size, result.seconds, result.info["calibration_method"],
        result.info["calibration_images"], result.info["bias_correction"], result.info["kept_float"] or "none"))
    return 0


# The measuring commands import the offline evaluation package when they run: the server image
# (which builds engines with this script) does not ship it.


def cmd_evaluate(args: argparse.Namespace, command: str) -> int:
    from evaluation.oof import run_engines_evaluation, run_oof_evaluation

    if args.mode == "oof":
        return run_oof_evaluation(args, command)
    return run_engines_evaluation(args, command)


def cmd_benchmark(args: argparse.Namespace, command: str) -> int:
    from evaluation.oof import run_benchmark

    return run_benchmark(args)


def cmd_saturation(args: argparse.Namespace, command: str) -> int:
    from evaluation.saturation import saturation_markdown, saturation_report

    model_path = args.model
    int8 = args.int8_model or int8_artifact_path(model_path)
    paths = calibration_paths(args.calibration_dir, args.calibration_limit)
    if not paths:
        print("no images: pass --calibration-dir", file=sys.stderr)
        return 2
    rows = saturation_report(int8, load_tensors(paths, ModelInfo.from_onnx(model_path).spec), args.max_positions)
    print("u8 x s8 vpmaddubsw simulation on {} ({} images, <= {} positions per layer)".format(int8, len(paths), args.max_positions))
    print(saturation_markdown(rows))
    if rows:
        worst = max(rows, key=lambda r: r["affected_outputs"])
        print("\nlayers with saturation: {} of {}; worst {}: {:.2%} of outputs, max relative error {:.2e}; with reduce_range: {} layers".format(
            sum(r["saturated_pairs"] > 0 for r in rows), len(rows), worst["layer"], worst["affected_outputs"], worst["rel_error_max"],
            sum(r["rr_saturated_pairs"] > 0 for r in rows)))
    return 0


def command_line(argv: Sequence[str]) -> str:
    """How this run was invoked, for the reports: ``python build_engines.py evaluate --data-dir ...``."""
    return " ".join(["python", "build_engines.py"] + [shlex.quote(a) for a in argv])


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    invoked = command_line(argv)
    command = "build"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    args = build_parser(settings)[command].parse_args(argv)
    logging.basicConfig(level=logging.INFO if command != "build" else logging.WARNING, format="%(message)s")
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    try:
        commands = {"build": cmd_build, "quantize": cmd_quantize, "evaluate": cmd_evaluate, "benchmark": cmd_benchmark, "saturation": cmd_saturation}
        return commands[command](args, invoked)
    except ServiceError as exc:
        print("error: {}".format(exc.message), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))
    sys.exit(main())
