"""Measure the u8 x s8 saturation of x86 CPUs without VNNI with ONNX Runtime's own kernels.

This machine has AVX512-VNNI/AMX, so ONNX Runtime never takes its AVX2 ``vpmaddubsw`` path here.
User-mode QEMU with a Haswell CPU model (AVX2, no VNNI) makes MLAS dispatch to exactly that
path, so scoring under ``qemu-x86_64 -cpu Haswell-v4`` runs the real saturating kernels:

    apt-get install qemu-user
    python tools/non_vnni_check.py --model FP32.onnx --int8 INT8_ORT.onnx --int8-rr INT8_ORT_RR.onnx --int8-u8 INT8_ORT_U8.onnx \
        --data-dir ../shared/data/cp-anemic --limit 200 --out runs/non_vnni.json

It scores the INT8 models natively and under QEMU (slow: seconds per image), FP32 natively, and reports, per model
and CPU, the agreement with native FP32 (same label at the model's threshold, max |dp|).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
QEMU_CPU = "Haswell-v4"


def score(model: Path, inputs: Path, out: Path) -> None:
    """Child mode: probabilities of ``model`` on the saved inputs (runs natively or under QEMU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.load(str(inputs))
    probs = np.concatenate([session.run(None, {"image": x[i : i + 8]})[0].reshape(-1) for i in range(0, len(x), 8)])
    np.save(str(out), probs.astype(np.float32))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--score", nargs=3, metavar=("MODEL", "INPUTS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help="FP32 model (reference, and the preprocessing spec)")
    parser.add_argument("--int8", type=Path, help="INT8 ONNX Runtime form, 8-bit weights")
    parser.add_argument("--int8-rr", type=Path, help="INT8 ONNX Runtime form, reduce_range (7-bit) weights")
    parser.add_argument("--int8-u8", type=Path, help="INT8 ONNX Runtime form with u8 weights (u8 x u8 kernels)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "cp-anemic")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "non_vnni.json")
    args = parser.parse_args(argv)
    if args.score:
        score(Path(args.score[0]), Path(args.score[1]), Path(args.score[2]))
        return 0
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        print("qemu-x86_64 not found: apt-get install qemu-user", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    from service.model_info import ModelInfo
    from engine_build.quantization.calibration import load_tensors, pick_subset
    from evaluation.oof import labelled_images

    info = ModelInfo.from_onnx(args.model)
    images = labelled_images(args.data_dir)
    paths = pick_subset([p for p, _ in images.values()], args.limit, seed=0)
    labels = np.asarray([images[p.stem][1] for p in paths])
    models = {"fp32": args.model, "int8": args.int8, "int8-reduce-range": args.int8_rr, "int8-u8-weights": args.int8_u8}
    results: Dict[str, Dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch) / "x.npy"
        np.save(str(inputs), load_tensors(paths, info.spec))
        probs: Dict[str, np.ndarray] = {}
        for name, model in models.items():
            if model is None:
                continue
            runs = [("native", [])]
            if name != "fp32":  # FP32 has no integer kernels to saturate; emulating it only costs time
                runs.append(("haswell-qemu", [qemu, "-cpu", QEMU_CPU]))
            for cpu, prefix in runs:
                out = Path(scratch) / "{}-{}.npy".format(name, cpu)
                command = prefix + [sys.executable, str(Path(__file__).resolve()), "--score", str(model), str(inputs), str(out)]
                subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
                probs["{}/{}".format(name, cpu)] = np.load(str(out))
        reference = probs["fp32/native"]
        t = info.threshold
        for key, p in probs.items():
            results[key] = {
                "accuracy": float(np.mean((p >= t) == labels)),
                "same_label_as_fp32_native": float(np.mean((p >= t) == (reference >= t))),
                "max_abs_dp_vs_fp32_native": float(np.max(np.abs(p - reference))),
                "mean_abs_dp_vs_fp32_native": float(np.mean(np.abs(p - reference))),
            }
            print("{:28s} acc {:.3f}  same label as FP32 {:.1%}  max|dp| {:.4f}  mean|dp| {:.4f}".format(
                key, results[key]["accuracy"], results[key]["same_label_as_fp32_native"],
                results[key]["max_abs_dp_vs_fp32_native"], results[key]["mean_abs_dp_vs_fp32_native"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": len(paths), "threshold": t, "qemu_cpu": QEMU_CPU, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
