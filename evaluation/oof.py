"""The three measuring commands of build_engines.py: out-of-fold evaluation, engine evaluation, benchmark.

Out-of-fold (``evaluate --mode oof``): for every cross-validation fold k, the fold's FP32 model
(trained without fold k's test images) and its quantized twins, calibrated on fold k's own
training images (train + validation, never the test images), score fold k's test images. Every
image is thus scored once by each precision, by models that never saw it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from engine_build.backends import ONNXRUNTIME, get_backend
from engine_build.onnxruntime_builder import DEFAULT_INT4_KEEP_FLOAT
from engine_build.quantization.calibration import IMAGE_SUFFIXES, load_tensors, pick_subset
from engine_build.quantization.fp16 import convert_fp16
from engine_build.quantization.graph import quantization_metadata
from engine_build.quantization.int4 import Int4Options, quantize_int4_ort
from engine_build.quantization.int8 import Int8Options, quantize_int8
from engine_build.quantization.int8_artifact import int8_artifact_path
from engine_build.quantization.ort_layout import derive_ort_int8
from evaluation import metrics as ev
from evaluation.summary import layer_summary, summary_markdown
from service.config import DEFAULT_ENGINE_DIR, DEFAULT_MODEL_PATH, Settings
from service.engines import EngineManifest, engine_key, locate_engine
from service.model_info import ModelInfo, file_sha256
from service.runtime.base import InferenceBackend
from service.runtime.onnxruntime_backend import OnnxRuntimeBackend

LOG = logging.getLogger("build_engines.evaluate")
CLASS_FOLDERS = (("Anemic", 1), ("Non-anemic", 0))


@dataclass
class Variant:
    """One row of the table: a precision and, for INT8 ablations, its options."""

    name: str
    precision: str
    int8: Dict[str, Any] = field(default_factory=dict)


def labelled_images(data_dir: Path) -> Dict[str, Tuple[Path, int]]:
    found: Dict[str, Tuple[Path, int]] = {}
    for folder, label in CLASS_FOLDERS:
        directory = Path(data_dir) / folder
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found[path.stem] = (path, label)
    return found


def cached_tensors(ids: Sequence[str], images: Dict[str, Tuple[Path, int]], spec: Any, cache_dir: Path) -> np.ndarray:
    """Preprocessed tensors for ``ids``, cached on disk (preprocessing 610 images takes a while)."""
    key = hashlib.sha256(json.dumps([list(ids), json.dumps(spec.to_metadata(), sort_keys=True)]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "inputs-{}.npy".format(key)
    if path.is_file():
        return np.load(str(path))
    tensors = load_tensors([images[i][0] for i in ids], spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(str(path), tensors)
    return tensors


def parse_variants(precisions: Sequence[str], extra: str) -> List[Variant]:
    variants = [Variant(p, p) for p in precisions]
    if "fp32" not in precisions:
        variants.insert(0, Variant("fp32", "fp32"))
    if "int8" in precisions:
        # The committed Q/DQ form (symmetric int8 activations, what TensorRT builds from), scored by ORT.
        variants.insert(variants.index(next(v for v in variants if v.name == "int8")) + 1, Variant("int8[qdq-form]", "int8", {"form": "qdq"}))
    for spec in [s.strip() for s in extra.split(",") if s.strip()]:
        parts = spec.split("+")
        options: Dict[str, Any] = {"method": parts[0]}
        for flag in parts[1:]:
            if flag == "nobc":
                options["bias_correction"] = False
            elif flag == "bc":
                options["bias_correction"] = True
            elif flag == "qdq":
                options["form"] = "qdq"
            elif flag == "rr":
                options["reduce_range"] = True
            elif flag == "keep":
                options["keep_float"] = ("first_conv", "classifier")
            else:
                raise ValueError("unknown INT8 variant flag {!r} in {!r} (bc, nobc, rr, keep, qdq)".format(flag, spec))
        variants.append(Variant("int8[{}]".format(spec), "int8", options))
    return variants


def _int8_options(args: argparse.Namespace, overrides: Dict[str, Any]) -> Any:
    keep = tuple(k.strip() for k in args.keep_float.split(",") if k.strip())
    values: Dict[str, Any] = dict(method=args.method, percentile=args.percentile, keep_float=keep, bias_correction=args.bias_correction, reduce_range=args.reduce_range)
    values.update(overrides)
    return Int8Options(**values)


def make_artifact(variant: Variant, fp32: Path, target_dir: Path, calibration: np.ndarray, args: argparse.Namespace) -> Tuple[Path, Dict[str, Any]]:
    """Build ``variant`` of ``fp32`` into ``target_dir`` (FP32 is the model itself)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    safe = variant.name.replace("[", "-").replace("]", "").replace("+", "-")
    target = target_dir / "{}.onnx".format(safe)
    if variant.precision == "fp32":
        return fp32, {}
    if variant.precision == "fp16":
        _, _, info = convert_fp16(fp32, target)
        return target, info
    if variant.precision == "int8":
        int8_options = _int8_options(args, {k: v for k, v in variant.int8.items() if k != "form"})
        # The Q/DQ model depends on these only: the ORT form and the qdq-form row share one file.
        key = hashlib.sha256(json.dumps([repr(int8_options), file_sha256(fp32), len(calibration), float(np.sum(calibration, dtype=np.float64))]).encode()).hexdigest()[:12]
        committed = target_dir / "int8-{}.qdq.onnx".format(key)
        if committed.is_file():
            info = quantization_metadata(onnx.load(str(committed), load_external_data=False))
        else:
            info = quantize_int8(fp32, committed, calibration, int8_options, calibration_note="fold training images").info
        if variant.int8.get("form") == "qdq":
            return committed, info  # the committed/TensorRT form, run by ONNX Runtime
        return target, derive_ort_int8(fp32, committed, target)  # what the server runs on ONNX Runtime
    rounding = args.int4_rounding or "gptq"
    options = Int4Options(rounding=rounding, keep_float=DEFAULT_INT4_KEEP_FLOAT, skip_depthwise=True)
    result4 = quantize_int4_ort(fp32, target, options, calibration[:32] if rounding == "gptq" else None)
    return target, {k: v for k, v in result4.info.items() if k != "layers"}


def _backend(path: Path, precision: str, threads: int) -> Any:
    return OnnxRuntimeBackend(path, precision, threads)


def _score(path: Path, precision: str, tensors: np.ndarray, threads: int, batch: int = 32) -> np.ndarray:
    backend = _backend(path, precision, threads)
    try:
        return np.concatenate([backend.infer(tensors[i : i + batch]) for i in range(0, len(tensors), batch)])
    finally:
        backend.close()


def _scored_variant(
    variant: Variant,
    model_path: Path,
    model_sha256: str,
    fold_dir: Path,
    calib_ids: Sequence[str],
    test_ids: Sequence[str],
    calib_x: np.ndarray,
    test_x: np.ndarray,
    args: argparse.Namespace,
) -> Dict[str, Any]:
    """A fold's scores for ``variant``, reused from an earlier run when nothing they depend on changed.

    Fold models arrive one by one; re-running the evaluation then only quantizes and scores the new ones.
    """
    options = {
        "variant": variant.name,
        "int8": variant.int8,
        "method": args.method,
        "percentile": args.percentile,
        "keep_float": args.keep_float,
        "bias_correction": args.bias_correction,
        "reduce_range": args.reduce_range,
        "int4_rounding": args.int4_rounding,
        "model_sha256": model_sha256,
        "calibration_ids": list(calib_ids),
        "test_ids": list(test_ids),
    }
    key = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = fold_dir / "scores-{}.json".format(key)
    if cache.is_file():
        return dict(json.loads(cache.read_text()))
    path, info = make_artifact(variant, model_path, fold_dir, calib_x, args)
    scored = {
        "options": options,
        "probs": [float(v) for v in _score(path, variant.precision, test_x, args.threads)],
        "size_bytes": path.stat().st_size,
        "info": {k: v for k, v in info.items() if k != "options"},
    }
    fold_dir.mkdir(parents=True, exist_ok=True)
    ev.write_json(scored, cache)
    return scored


def _read_oof_csv(path: Path) -> Dict[str, float]:
    if not Path(path).is_file():
        return {}
    with open(path, newline="") as handle:
        return {row["image_id"]: float(row["probability"]) for row in csv.DictReader(handle)}


def summarize(
    variants: Sequence[Variant],
    probs: Dict[str, np.ndarray],
    labels: np.ndarray,
    thresholds: np.ndarray,
    sizes: Dict[str, List[int]],
    bootstrap: int,
    groups: Optional[np.ndarray] = None,
) -> Dict[str, Dict[str, Any]]:
    results: Dict[str, Dict[str, Any]] = {}
    reference = probs["fp32"]
    fp32_size = float(np.mean(sizes["fp32"])) if sizes.get("fp32") else 0.0
    for variant in variants:
        if variant.name not in probs:
            continue
        p = probs[variant.name]
        size = float(np.mean(sizes[variant.name])) if sizes.get(variant.name) else 0.0
        results[variant.name] = {
            "precision": variant.precision,
            "options": variant.int8,
            "metrics": ev.binary_metrics(labels, p, thresholds),
            "intervals": ev.bootstrap_intervals(labels, p, thresholds, bootstrap, groups=groups) if bootstrap else {},
            "agreement": ev.agreement(reference, p, thresholds) if variant.name != "fp32" else {},
            "size_bytes": size,
            "size_vs_fp32": size / fp32_size if fp32_size else None,
            "probs": p,
        }
    return results


def latency_section(
    model_path: Path,
    variants: Sequence[Variant],
    calibration: np.ndarray,
    sample: np.ndarray,
    args: argparse.Namespace,
    out_dir: Path,
    artifact_dir: Optional[Path] = None,
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, List[Dict[str, Any]]]]:
    """Latency of each variant of ``model_path`` (with the server's backend) and its layer summary."""
    latency: Dict[str, Dict[str, float]] = {}
    layers: Dict[str, List[Dict[str, Any]]] = {}
    for variant in variants:
        committed = int8_artifact_path(model_path)
        if variant.name == "int8[qdq-form]" and committed.is_file():
            path = committed
        elif variant.name == "int8" and committed.is_file():
            # What `build_engines.py --precision int8` makes from the committed artifact.
            path = out_dir / "latency" / "int8-from-committed.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            derive_ort_int8(model_path, committed, path)
        else:
            path, _ = make_artifact(variant, model_path, artifact_dir or out_dir / "latency", calibration, args)
        if not args.skip_latency:
            backend = _backend(path, variant.precision, args.threads)
            try:
                latency[variant.name] = ev.measure_latency(backend.infer, sample)
            finally:
                backend.close()
            LOG.info("latency %s: %s", variant.name, {k: round(v, 2) for k, v in latency[variant.name].items()})
        if variant.precision != "fp32":
            layers[variant.name] = layer_summary(path)
    return latency, layers


def write_report(
    out_dir: Path,
    title: str,
    command: str,
    results: Dict[str, Dict[str, Any]],
    labels: np.ndarray,
    latency: Dict[str, Dict[str, float]],
    layers: Dict[str, List[Dict[str, Any]]],
    notes: List[str],
    extra: Dict[str, Any],
    interval_unit: str = "images",
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = ev.plot_curves(results, labels, out_dir, title)
    lines = ["# {}".format(title), "", "Command: `{}`".format(command), ""]
    lines += ["- " + note for note in notes] + [""]
    lines += ["## Classification (95% bootstrap intervals over {})".format(interval_unit), "", ev.markdown_table(results), ""]
    if latency:
        lines += ["## Latency (server backend, after warm-up)", "", ev.latency_table(latency), ""]
    for name, rows in layers.items():
        lines += ["## Per-layer quantization: {}".format(name), "", "<details><summary>{} layers</summary>".format(len(rows)), "", summary_markdown(rows), "", "</details>", ""]
    if pictures:
        lines += ["Curves: " + ", ".join(p.name for p in pictures), ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    payload = {
        "title": title,
        "command": command,
        "notes": notes,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "probs"} for k, v in results.items()},
        "latency": latency,
        "layers": layers,
    }
    payload.update(extra)
    ev.write_json(payload, out_dir / "report.json")
    return report


def _machine(backend_name: str = "onnxruntime") -> str:
    backend = get_backend(backend_name)
    return "{} ({} CPUs), {} on {}, {} {}, Python {}".format(
        platform.processor() or platform.machine(), os.cpu_count(), backend.name, backend.device(), backend.name,
        backend.tool_version(), platform.python_version())


def operating_point_thresholds(report_path: Path) -> Tuple[Dict[int, float], float]:
    """Per fold, the uncalibrated threshold the served operating point was chosen with, and the
    target sensitivity it was chosen for (the calibration report)."""
    report = json.loads(Path(report_path).read_text())
    per_fold = {int(row["fold"]): float(row["threshold_uncalibrated"]) for row in report["per_fold"]}
    return per_fold, float(report["target_sensitivity"])


def run_oof_evaluation(args: argparse.Namespace, command: str) -> int:
    """``command``: how the evaluation was invoked, recorded in the report."""
    if args.backend != ONNXRUNTIME.name:  # the fold artifacts are ONNX Runtime's (make_artifact)
        LOG.error("--mode oof runs on ONNX Runtime; on TensorRT use --mode engines")
        return 2
    folds = json.loads(Path(args.folds).read_text())["folds"]
    images = labelled_images(args.data_dir)
    variants = parse_variants(args.precision, args.int8_variants)
    out_dir = Path(args.out_dir)
    all_ids: List[str] = []
    probs: Dict[str, List[np.ndarray]] = {v.name: [] for v in variants}
    sizes: Dict[str, List[int]] = {v.name: [] for v in variants}
    labels: List[int] = []
    thresholds: List[float] = []
    image_folds: List[int] = []
    used_folds: List[int] = []
    notes: List[str] = []
    spec = None
    calibration_for_latency: Optional[np.ndarray] = None
    for fold in folds:
        k = int(fold["fold"])
        model_path = Path(str(args.fold_models).format(k=k))
        if not model_path.is_file():
            notes.append("fold {} skipped: {} not found".format(k, model_path))
            LOG.warning("fold %d: %s not found, skipped", k, model_path)
            continue
        info = ModelInfo.from_onnx(model_path)
        spec = info.spec
        test_ids = [i for i in fold["test_ids"] if i in images]
        train_ids = [i for i in fold["train_ids"] + fold["val_ids"] if i in images]
        calib_ids = [p.stem for p in pick_subset([images[i][0] for i in train_ids], args.calibration_limit, seed=k)]
        test_x = cached_tensors(test_ids, images, spec, out_dir / "cache")
        calib_x = cached_tensors(calib_ids, images, spec, out_dir / "cache")
        if calibration_for_latency is None:
            calibration_for_latency = calib_x
        started = time.perf_counter()
        for variant in variants:
            scored = _scored_variant(variant, model_path, info.sha256, out_dir / "fold{}".format(k), calib_ids, test_ids, calib_x, test_x, args)
            probs[variant.name].append(np.asarray(scored["probs"], np.float32))
            sizes[variant.name].append(int(scored["size_bytes"]))
        LOG.info("fold %d: %d test images, %d calibration images, %.0f s", k, len(test_ids), len(calib_ids), time.perf_counter() - started)
        all_ids += test_ids
        labels += [images[i][1] for i in test_ids]
        thresholds += [info.threshold] * len(test_ids)
        image_folds += [k] * len(test_ids)
        used_folds.append(k)
    if not used_folds:
        LOG.error("no fold model found (pattern %s)", args.fold_models)
        return 2
    operating_point = getattr(args, "operating_point", None)
    target_sensitivity: Optional[float] = None
    if operating_point is not None:
        fold_threshold, target_sensitivity = operating_point_thresholds(Path(operating_point))
        missing = [k for k in used_folds if k not in fold_threshold]
        if missing:
            LOG.error("%s has no threshold for folds %s", operating_point, missing)
            return 2
        thresholds = [fold_threshold[k] for k in image_folds]
    y, t = np.asarray(labels), np.asarray(thresholds)
    merged = {name: np.concatenate(parts) for name, parts in probs.items() if parts}
    clusters = getattr(args, "clusters", None)
    groups = ev.photograph_groups(Path(clusters), all_ids) if clusters is not None and Path(clusters).is_file() else None
    results = summarize(variants, merged, y, t, sizes, args.bootstrap, groups)
    training_oof = _read_oof_csv(args.oof_csv)
    if training_oof:
        common = [i for i, image_id in enumerate(all_ids) if image_id in training_oof]
        if common:
            delta = np.abs(merged["fp32"][common] - np.asarray([training_oof[all_ids[i]] for i in common]))
            notes.append("FP32 cross-check: ONNX Runtime scores vs training's {} on {} images: max |dp| {:.2e}".format(args.oof_csv.name, len(common), float(delta.max())))
    latency_model = args.latency_model or (args.model if args.model is not None and Path(args.model).is_file() else Path(str(args.fold_models).format(k=used_folds[0])))
    assert calibration_for_latency is not None
    sample = cached_tensors(all_ids[:32], images, spec, out_dir / "cache")
    first_fold_model = Path(str(args.fold_models).format(k=used_folds[0]))
    # Timing a fold model reuses that fold's artifacts (same model, same calibration images).
    reuse = out_dir / "fold{}".format(used_folds[0]) if Path(latency_model) == first_fold_model else None
    latency, layers = latency_section(Path(latency_model), variants, calibration_for_latency, sample, args, out_dir, reuse)
    notes += [
        "out-of-fold on {} images of {} ({} anemic), folds {} of {}".format(len(y), args.data_dir, int(y.sum()), used_folds, len(folds)),
        "each fold's threshold ({}) applies to that fold's FP32 model and its quantized twins".format(
            "its operating-point threshold from {}: target sensitivity {} on its validation split, uncalibrated scale".format(
                Path(operating_point).name, target_sensitivity) if operating_point is not None else "from its model's metadata"),
        "intervals resample {}".format("photographs ({} of them, from {})".format(len(set(groups.tolist())), Path(clusters).name)
                                       if groups is not None else "images (no cluster file: too narrow where images are copies)"),
        "INT8/INT4 calibrated on at most {} of the fold's own train+val images (never its test images)".format(args.calibration_limit),
        "latency and per-layer tables: {} ({} intra-op threads; 0 = ORT default)".format(latency_model, args.threads),
        "machine: {}; date {}".format(_machine(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
    ]
    report = write_report(out_dir, "Out-of-fold evaluation per precision (ONNX Runtime, CPU)", command, results, y, latency, layers, notes,
                          {"folds_used": used_folds, "image_ids": all_ids}, "photographs" if groups is not None else "images")
    print(report.read_text())
    return 0


def run_engines_evaluation(args: argparse.Namespace, command: str) -> int:
    """Built engines of the served model on a labelled folder (a Jetson's acceptance check)."""
    model = ModelInfo.from_onnx(args.model or DEFAULT_MODEL_PATH)
    engine_dir = Path(args.engine_dir or DEFAULT_ENGINE_DIR)
    manifest = EngineManifest.load(engine_dir)
    images = labelled_images(args.data_dir)
    ids = sorted(images)
    if not ids:
        LOG.error("no labelled images (Anemic/, Non-anemic/) under %s", args.data_dir)
        return 2
    x = cached_tensors(ids, images, model.spec, Path(args.out_dir) / "cache")
    y = np.asarray([images[i][1] for i in ids])
    variants = [Variant(p, p) for p in (["fp32"] + [p for p in args.precision if p != "fp32"])]
    probs: Dict[str, np.ndarray] = {}
    sizes: Dict[str, List[int]] = {}
    latency: Dict[str, Dict[str, float]] = {}
    layers: Dict[str, List[Dict[str, Any]]] = {}
    notes: List[str] = []
    for variant in variants:
        try:
            entry = locate_engine(manifest, engine_key(model, variant.precision, get_backend(args.backend)))
        except Exception as exc:  # a missing precision is reported, the others still measured
            notes.append("{}: not evaluated ({})".format(variant.name, getattr(exc, "message", exc)))
            continue
        path = engine_dir / entry.file
        backend = open_backend(args.backend, path, variant.precision, args.threads, 32)
        try:
            probs[variant.name] = np.concatenate([backend.infer(x[i : i + backend_batch(backend)]) for i in range(0, len(x), backend_batch(backend))])
            if not args.skip_latency:
                latency[variant.name] = ev.measure_latency(backend.infer, x[:32])
        finally:
            backend.close()
        sizes[variant.name] = [entry.file_size_bytes]
        # An ONNX artifact carries its own quantization; an engine (TensorRT) was built from the ONNX
        # its build info names, which for FP16 (a builder flag) is the FP32 graph: nothing to summarize.
        source = path if path.suffix == ".onnx" else Path(str(entry.build_info.get("source", "")))
        if variant.precision != "fp32" and source.is_file() and source.suffix == ".onnx" and source.resolve() != model.path.resolve():
            layers[variant.name] = layer_summary(source)
    if "fp32" not in probs:
        LOG.error("the fp32 engine is needed as the reference: %s", "; ".join(notes))
        return 2
    results = summarize(variants, probs, y, np.full(len(y), model.threshold), sizes, args.bootstrap)
    notes += ["{} images of {} ({} anemic), threshold {}".format(len(y), args.data_dir, int(y.sum()), model.threshold),
              "backend {}, engines from {}; {}".format(args.backend, manifest.path, _machine(args.backend)),
              "date {}".format(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))]
    report = write_report(Path(args.out_dir), "Engine evaluation ({})".format(args.backend), command, results, y, latency, layers, notes, {})
    print(report.read_text())
    return 0


def backend_batch(backend: Any) -> int:
    return int(min(32, backend.max_batch_size))


def open_backend(backend_name: str, path: Path, precision: str, threads: int, max_batch: int) -> InferenceBackend:
    settings = Settings(intra_op_threads=threads, intra_op_spinning=True, max_batch=max_batch)
    return get_backend(backend_name).load(path, precision, settings)


def run_benchmark(args: argparse.Namespace) -> int:
    """Latency/throughput of each built engine of the served model; prints a markdown table."""
    model = ModelInfo.from_onnx(args.model or DEFAULT_MODEL_PATH)
    engine_dir = Path(args.engine_dir or DEFAULT_ENGINE_DIR)
    manifest = EngineManifest.load(engine_dir)
    sample = np.random.default_rng(0).uniform(-1, 1, (32,) + model.spec.chw).astype(np.float32)
    latency: Dict[str, Dict[str, float]] = {}
    failed = 0
    for precision in args.precision:
        try:
            entry = locate_engine(manifest, engine_key(model, precision, get_backend(args.backend)))
        except Exception as exc:
            print("{}: {}".format(precision, getattr(exc, "message", exc)))
            failed += 1
            continue
        backend = open_backend(args.backend, engine_dir / entry.file, precision, args.threads, args.max_batch)
        try:
            # Batches above the engine's profile maximum are split by the backend, as in the server.
            latency[precision] = ev.measure_latency(backend.infer, sample, runs_batch1=args.runs)
        finally:
            backend.close()
    print("Benchmark: {} backend, engines in {}, {}".format(args.backend, engine_dir, _machine(args.backend)))
    print(ev.latency_table(latency))
    if args.json:
        ev.write_json({"backend": args.backend, "latency": latency, "machine": _machine(args.backend)}, args.json)
    return 1 if failed and not latency else 0
