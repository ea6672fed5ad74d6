"""Where does INT8 drift from FP32? A layer-by-layer comparison of activations.

The Q/DQ INT8 model keeps the FP32 graph's tensor names for the float outputs of its Conv, Clip,
Add and Gemm nodes (QuantizeLinear/DequantizeLinear sit around them), so both graphs can expose
the same tensors as outputs and be compared on the same images. Both run on ONNX Runtime with
graph optimisations off, so the INT8 side executes exactly the arithmetic its Q/DQ nodes
specify (the form TensorRT consumes), not a fused kernel's.

Per tensor it reports the signal-to-quantization-noise ratio (SQNR, dB: how large the error is
against the signal) and the mean shift in units of the FP32 tensor's standard deviation (a
systematic offset, which SQNR alone does not tell from noise). A systematic drift in the final
probability shows as a shift that grows, layer after layer, where SQNR falls.

    python -m evaluation.int8_drift --model models/anemia_mobilenetv2.onnx \\
        --int8 models/anemia_mobilenetv2.int8.onnx --data-dir ../shared/data/cp-anemic --limit 96
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from engine_build.quantization.calibration import list_images, load_tensors, pick_subset
from service.model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo

LOG = logging.getLogger("evaluation.int8_drift")
COMPARED_OPS = ("Conv", "Clip", "Add", "Gemm", "GlobalAveragePool", "Sigmoid")


@dataclass(frozen=True)
class LayerDrift:
    tensor: str
    op: str
    sqnr_db: float
    mean_shift_in_std: float  # mean(int8 - fp32) / std(fp32)
    relative_rms_error: float  # rms(int8 - fp32) / rms(fp32)


def compared_tensors(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> List[Dict[str, str]]:
    """The FP32 graph's node outputs (in graph order) that the INT8 graph also computes."""
    produced = {name for node in int8.graph.node for name in node.output}
    rows: List[Dict[str, str]] = []
    for node in fp32.graph.node:
        if node.op_type in COMPARED_OPS:
            for name in node.output:
                if name in produced:
                    rows.append({"tensor": name, "op": node.op_type})
    return rows


def _session_with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> ort.InferenceSession:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def layer_drift(fp32_path: Path, int8_path: Path, inputs: np.ndarray, batch: int = 16) -> Dict[str, object]:
    """Compare every shared tensor of the two models on ``inputs`` (preprocessed NCHW float32)."""
    fp32, int8 = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    rows = compared_tensors(fp32, int8)
    names = [row["tensor"] for row in rows]
    sessions = [_session_with_outputs(model, names + [OUTPUT_NAME]) for model in (fp32, int8)]
    signal = np.zeros(len(names))
    noise = np.zeros(len(names))
    shift = np.zeros(len(names))
    total = np.zeros(len(names))
    count = np.zeros(len(names))
    probs: List[List[np.ndarray]] = [[], []]
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        outputs = [dict(zip([o.name for o in s.get_outputs()], s.run(None, {INPUT_NAME: chunk}))) for s in sessions]
        for side in (0, 1):
            probs[side].append(outputs[side][OUTPUT_NAME].reshape(-1))
        for i, name in enumerate(names):
            f = outputs[0][name].astype(np.float64)
            q = outputs[1][name].astype(np.float64)
            signal[i] += float(np.sum(f * f))
            noise[i] += float(np.sum((q - f) ** 2))
            shift[i] += float(np.sum(q - f))
            total[i] += float(np.sum(f))
            count[i] += f.size
    mean = total / count
    std = np.sqrt(np.maximum(signal / count - mean * mean, 1e-30))  # signal: the sum of squares
    layers = [
        LayerDrift(
            tensor=name,
            op=rows[i]["op"],
            sqnr_db=float(10 * np.log10(signal[i] / noise[i])) if noise[i] > 0 else float("inf"),
            mean_shift_in_std=float(shift[i] / count[i] / std[i]),
            relative_rms_error=float(np.sqrt(noise[i] / signal[i])) if signal[i] > 0 else 0.0,
        )
        for i, name in enumerate(names)
    ]
    p_fp32, p_int8 = np.concatenate(probs[0]), np.concatenate(probs[1])
    return {
        "images": int(len(inputs)),
        "layers": [asdict(layer) for layer in layers],
        "probability": {
            "mean_delta": float(np.mean(p_int8 - p_fp32)),
            "mean_abs_delta": float(np.mean(np.abs(p_int8 - p_fp32))),
            "p90_abs_delta": float(np.percentile(np.abs(p_int8 - p_fp32), 90)),
            "max_abs_delta": float(np.max(np.abs(p_int8 - p_fp32))),
        },
    }


def markdown(report: Dict[str, object], every: int = 1) -> str:
    lines = ["| tensor | op | SQNR (dB) | mean shift (FP32 std) | relative RMS error |", "|---|---|---|---|---|"]
    layers = report["layers"]
    assert isinstance(layers, list)
    for i, layer in enumerate(layers):
        if i % every == 0 or i == len(layers) - 1:
            lines.append("| {tensor} | {op} | {sqnr_db:.1f} | {mean_shift_in_std:+.3f} | {relative_rms_error:.3f} |".format(**layer))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.int8_drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="FP32 ONNX model")
    p.add_argument("--int8", type=Path, required=True, help="its Q/DQ INT8 twin (build_engines.py quantize)")
    p.add_argument("--data-dir", type=Path, required=True, help="images to compare on (searched recursively)")
    p.add_argument("--limit", type=int, default=96)
    p.add_argument("--seed", type=int, default=1, help="image subset seed")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument("--every", type=int, default=1, help="print every N-th tensor")
    a = p.parse_args(argv)
    spec = ModelInfo.from_onnx(a.model).spec
    paths = pick_subset(list_images([a.data_dir]), a.limit, seed=a.seed)
    report = layer_drift(a.model, a.int8, load_tensors(paths, spec))
    report.update({"model": str(a.model), "int8": str(a.int8), "data_dir": str(a.data_dir), "seed": a.seed})
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report, a.every))
    print("\nfinal probability, INT8 - FP32 over {} images: {}".format(report["images"], json.dumps(report["probability"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
