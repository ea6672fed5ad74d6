"""The ONNX Runtime form of the committed INT8 model: same calibration, same int8 weights, u8 activations.

The committed Q/DQ model uses symmetric int8 activations because TensorRT requires them. ONNX
Runtime on x86 runs that form slowly: a ReLU6 between two symmetric int8 tensors cannot be folded
into the quantization range (the range includes negatives), so every ``Clip`` stays a float op
between a DequantizeLinear and a QuantizeLinear, and a third of the convolutions are not fused
into ``QLinearConv`` at all (measured: 29-33 ms vs 17 ms for FP32 at batch 1, one thread).

This derives, without any data, the layout ONNX Runtime fuses completely: every activation keeps
its calibrated range (amax = 127 x the committed scale); tensors that are non-negative (ReLU6
outputs and what pools them) become u8 over [0, amax] — ReLU6 is then the u8 range itself and
disappears — and the others u8 over [-amax, amax]. Weights are quantized by the same routine from
the same FP32 weights (identical int8 values) and the bias-corrected biases are taken from the
committed model; the same layers stay float.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Set

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

from engine_build.quantization import graph as g
from engine_build.quantization.int8 import prepare_float_model
from engine_build.quantization.modes import WEIGHT_MODES

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def x86_without_vnni(cpuinfo: Optional[str] = None, machine: Optional[str] = None) -> bool:
    """True where ONNX Runtime's u8 x s8 kernels saturate: x86 without AVX-VNNI/AVX512-VNNI/AMX.

    ARM (a Jetson's CPU) multiplies with sdot/udot into int32 and has no such problem. An x86
    machine whose flags cannot be read counts as affected (the safe choice).
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            return True
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return not any(flag in flags for flag in VNNI_FLAGS)


_PASS_THROUGH = ("GlobalAveragePool", "MaxPool", "AveragePool", "Flatten", "Reshape", "Transpose", "Pad")


def committed_ranges(committed: onnx.ModelProto) -> Dict[str, float]:
    """amax of every activation the committed model quantizes (symmetric int8: 127 x scale)."""
    inits = g.initializer_map(committed)
    ranges: Dict[str, float] = {}
    for node in committed.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scale = float(numpy_helper.to_array(inits[node.input[1]]).max())
            ranges[node.input[0]] = 127.0 * scale
    return ranges


def non_negative_tensors(model: onnx.ModelProto) -> Set[str]:
    """Tensors >= 0 by construction: Relu / Clip(min >= 0) outputs and what pools or reshapes them."""
    inits = g.initializer_map(model)
    found: Set[str] = set()
    for node in model.graph.node:  # graph order is topological
        if node.op_type == "Relu":
            found.add(node.output[0])
        elif node.op_type == "Clip":
            low = node.input[1] if len(node.input) > 1 else ""
            if low and low in inits and float(numpy_helper.to_array(inits[low])) >= 0.0:
                found.add(node.output[0])
        elif node.op_type in _PASS_THROUGH and node.input and node.input[0] in found:
            found.add(node.output[0])
    return found


def derive_ort_int8(fp32_path: Path, committed_path: Path, target: Path, weights: str = "auto") -> Dict[str, Any]:
    """Write the ONNX Runtime form of ``committed_path`` (made from ``fp32_path``) to ``target``.

    ``weights``: ``s8`` = the committed int8 weights (and their bias-corrected biases);
    ``u8`` = asymmetric u8 weights, which ONNX Runtime runs with its u8 x u8 kernels (exact int32
    sums) - for x86 CPUs without VNNI, where s8 weights saturate the u8 x s8 kernels' int16 pair
    sums (simulated in :mod:`evaluation.saturation`); ``s8-reduce-range`` = 7-bit weights, the other
    classic fix; ``auto`` = ``s8`` (``s8-reduce-range`` if the committed model was made with
    reduce_range). Auto does not switch on CPUs without VNNI because, measured on the shipped model
    with ONNX Runtime's own AVX2 kernels (docs/quantization.md), saturation cost less agreement
    with FP32 than either fix; the build records when the CPU is affected.
    """
    if weights not in WEIGHT_MODES:
        raise ValueError("weights must be one of {}, got {!r}".format(WEIGHT_MODES, weights))
    committed = onnx.load(str(committed_path))
    meta = g.quantization_metadata(committed)
    ranges = committed_ranges(committed)
    committed_rr = bool(meta.get("reduce_range", False))
    affected_cpu = x86_without_vnni()
    if weights == "auto":
        weights = "s8-reduce-range" if committed_rr else "s8"
    u8_weights = weights == "u8"
    use_reduce_range = weights == "s8-reduce-range"
    committed_inits = g.initializer_map(committed)
    committed_nodes = {n.name: n for n in committed.graph.node}
    with tempfile.TemporaryDirectory(prefix="ort-int8-") as scratch:
        prepared = prepare_float_model(Path(fp32_path), Path(scratch) / "prepared.onnx")
        inits = g.initializer_map(prepared)
        # The committed biases carry the bias correction for the committed int8 weights. Weights
        # quantized differently here (7-bit, u8) have other rounding errors: keep the float biases.
        same_weights = not u8_weights and use_reduce_range == committed_rr
        for node in (g.weighted_nodes(prepared) if same_weights else []):
            source = committed_nodes.get(node.name)
            if source is None or len(node.input) < 3 or len(source.input) < 3:
                continue
            if node.input[2] in inits and source.input[2] in committed_inits:
                corrected = numpy_helper.to_array(committed_inits[source.input[2]])
                inits[node.input[2]].CopyFrom(numpy_helper.from_array(corrected.astype(np.float32), node.input[2]))
        positive = non_negative_tensors(prepared)
        data = {
            name: TensorData(lowest=np.float32(0.0 if name in positive else -amax), highest=np.float32(amax))
            for name, amax in ranges.items()
        }
        cache = Path(scratch) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        prepared_path = Path(scratch) / "prepared_corrected.onnx"
        onnx.save(prepared, str(prepared_path))
        kept = [str(n) for n in meta.get("kept_float", [])] if isinstance(meta.get("kept_float"), list) else []
        out_node = g.output_node(prepared)
        exclude = kept + ([out_node.name] if out_node is not None and out_node.op_type == "Sigmoid" else [])
        logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(prepared_path),
                str(Path(scratch) / "ort.onnx"),
                None,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=use_reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QUInt8 if u8_weights else QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": not u8_weights, "QDQDisableWeightAdjustForInt32Bias": True},
                calibration_cache_path=str(cache),
            )
        derived = onnx.load(str(Path(scratch) / "ort.onnx"))
    info = dict(meta)
    info.pop("options", None)
    info["reduce_range"] = use_reduce_range
    info["ort_weights"] = weights
    info["x86_without_vnni"] = affected_cpu
    if weights == "u8":
        info["ort_weights_reason"] = "u8 weights run on u8 x u8 kernels: no int16 saturation on x86 without VNNI"
    elif affected_cpu and weights == "s8":
        info["saturation_note"] = (
            "this x86 CPU has no VNNI: u8 x s8 pair sums can saturate (measured cost on the shipped model: "
            "97.5% vs 98.3% same label as FP32, docs/quantization.md); --ort-int8-weights u8 or s8-reduce-range avoid it"
        )
    info["ort_layout"] = (
        "u8 activations from the committed calibration ({} tensors, {} non-negative over [0, amax]); weights "
        "{}".format(
            len(ranges),
            len([n for n in ranges if n in positive]),
            "int8 and biases as committed" if same_weights else "{} (float biases: the committed correction fits other weights)".format(weights),
        )
    )
    g.copy_metadata(committed, derived, info)
    g.save_model(derived, Path(target))
    return info
