"""INT8 post-training quantization: one calibrated Q/DQ ONNX for ONNX Runtime and TensorRT.

Format (what both runtimes accept): weights per output channel, int8, symmetric, stored as int8
initializers feeding a ``DequantizeLinear`` (no ``QuantizeLinear`` on weights); activations
per tensor, int8, symmetric (zero point 0, as TensorRT's explicit quantization requires); biases
stay float (TensorRT does not take int32 ``DequantizeLinear`` biases; ONNX Runtime still fuses
``DQ -> Conv -> Q`` into ``QLinearConv``). The final Sigmoid is not quantized: a probability on an
int8 grid would move by up to 1/254 and flip decisions that sit on the threshold.

Options: calibration method (entropy, percentile, min-max), named layers kept in float,
weight-quantization bias correction, and ``reduce_range`` (7-bit weights) for x86 CPUs without
VNNI, where ``vpmaddubsw`` adds two u8 x s8 products into a saturating int16 (see
:mod:`evaluation.saturation`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

from engine_build.quantization import graph as g
from engine_build.quantization.calibration import TensorCalibrationReader
from service.model_info import file_sha256

CALIBRATION_METHODS = ("entropy", "percentile", "minmax")
#: Chosen by the out-of-fold comparison in docs/quantization.md: on ONNX Runtime the three methods
#: are within noise of each other; in the committed Q/DQ form (TensorRT's arithmetic) percentile
#: kept 2-3 points more accuracy than min-max, and one model serves both.
DEFAULT_CALIBRATION_METHOD = "percentile"
DEFAULT_PERCENTILE = 99.99
_METHODS = {
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "minmax": CalibrationMethod.MinMax,
}


@dataclass
class Int8Options:
    method: str = DEFAULT_CALIBRATION_METHOD
    percentile: float = DEFAULT_PERCENTILE
    keep_float: Tuple[str, ...] = ()
    #: Off by default: out of fold it did not improve accuracy or agreement (docs/quantization.md).
    bias_correction: bool = False
    reduce_range: bool = False
    per_channel: bool = True
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError("calibration method must be one of {}, got {!r}".format(CALIBRATION_METHODS, self.method))
        if not 90.0 <= self.percentile <= 100.0:
            raise ValueError("percentile must be within 90..100, got {}".format(self.percentile))


@dataclass
class Int8Result:
    path: Path
    seconds: float
    info: Dict[str, Any] = field(default_factory=dict)


def prepare_float_model(source: Path, target: Path) -> onnx.ModelProto:
    """Shape inference and ONNX Runtime's basic fusions (BatchNorm into Conv) before quantizing.

    Calibration ranges then belong to the tensors the quantized graph really has.
    """
    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return onnx.load(str(target))


def _quantize(
    prepared: Path,
    target: Path,
    tensors: np.ndarray,
    options: Int8Options,
    exclude: Sequence[str],
) -> None:
    extra: Dict[str, Any] = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "CalibTensorRangeSymmetric": True,
        # One batch per collection pass: bounded memory for every method (see TensorCalibrationReader.set_range).
        "CalibStridedMinMax": 1,
    }
    if options.method == "percentile":
        extra["CalibPercentile"] = options.percentile
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress to stdout
        quantize_static(
            str(prepared),
            str(target),
            TensorCalibrationReader(tensors, options.batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=options.per_channel,
            reduce_range=options.reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            calibrate_method=_METHODS[options.method],
            extra_options=extra,
        )


def dequantized_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> Optional[np.ndarray]:
    """The float weight a quantized node computes with (its weight DequantizeLinear), else None."""
    producers = {out: n for n in model.graph.node for out in n.output}
    dq = producers.get(node.input[1])
    inits = g.initializer_map(model)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) == 1 else zero
    return (q - zero) * scale


def bias_corrections(
    float_model: onnx.ModelProto, quant_model: onnx.ModelProto, means: Dict[str, np.ndarray]
) -> Dict[str, np.ndarray]:
    """Per node, the shift E[(W_q - W) x] that quantizing the weights adds to each output channel.

    Weight rounding errors do not average out per channel: they move every output channel's
    mean, and depthwise layers (9 weights per channel) move the most. Subtracting the shift from
    the bias (Nagel et al. 2019, "Data-Free Quantization", analytic bias correction with the
    input's per-channel mean measured on the calibration set) removes that bias; zero padding at
    the borders is ignored.
    """
    float_nodes = {n.name: n for n in float_model.graph.node}
    float_inits = g.initializer_map(float_model)
    out: Dict[str, np.ndarray] = {}
    for node in quant_model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.name not in float_nodes:
            continue
        source = float_nodes[node.name]
        if source.input[1] not in float_inits or source.input[0] not in means:
            continue
        w_q = dequantized_weight(quant_model, node)
        if w_q is None:
            continue
        delta = w_q - numpy_helper.to_array(float_inits[source.input[1]]).astype(np.float64)
        mean = means[source.input[0]]
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            summed = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2)  # O x C/g
            per_group = mean.reshape(group, -1)
            owner = np.arange(delta.shape[0]) // (delta.shape[0] // group)
            out[node.name] = (summed * per_group[owner]).sum(axis=1)
        else:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out[node.name] = delta @ mean if trans_b else mean @ delta
    return out


def apply_bias_correction(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, tensors: np.ndarray, batch_size: int) -> Dict[str, float]:
    """Correct the float biases of ``quant_model`` in place; returns max |shift| per corrected node."""
    targets = [n for n in quant_model.graph.node if n.op_type in ("Conv", "Gemm")]
    float_nodes = {n.name: n for n in float_model.graph.node}
    inputs = sorted({float_nodes[n.name].input[0] for n in targets if n.name in float_nodes})
    means = g.channel_means(float_model, inputs, tensors, batch_size)
    shifts = bias_corrections(float_model, quant_model, means)
    inits = g.initializer_map(quant_model)
    applied: Dict[str, float] = {}
    for node in quant_model.graph.node:
        if node.name not in shifts:
            continue
        shift = shifts[node.name]
        if len(node.input) > 2 and node.input[2] in inits:
            bias_init = inits[node.input[2]]
            bias = numpy_helper.to_array(bias_init).astype(np.float64)
            corrected = (bias.reshape(-1) - shift).reshape(bias.shape).astype(np.float32)
            bias_init.CopyFrom(numpy_helper.from_array(corrected, bias_init.name))
        else:
            name = node.name + "_bias_correction"
            quant_model.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = name
        applied[node.name] = float(np.max(np.abs(shift))) if shift.size else 0.0
    return applied


def quantize_int8(
    fp32_path: Path,
    target: Path,
    tensors: np.ndarray,
    options: Optional[Int8Options] = None,
    calibration_note: str = "",
) -> Int8Result:
    """Calibrate on ``tensors`` (preprocessed N x 3 x H x W) and write the Q/DQ model to ``target``.

    Besides ``options.keep_float``, the colour-statistics branch and what it feeds stay float
    (:func:`graph.float_only_nodes`); ``kept_float`` in the metadata lists them all.
    """
    options = options or Int8Options()
    started = time.perf_counter()
    source = onnx.load(str(fp32_path))
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="int8-") as scratch:
        prepared_path = Path(scratch) / "prepared.onnx"
        prepared = prepare_float_model(Path(fp32_path), prepared_path)
        exclude = g.resolve_layers(prepared, options.keep_float)
        exclude += [name for name in g.float_only_nodes(prepared) if name not in exclude]
        out_node = g.output_node(prepared)
        # The probability stays float; see the module docstring.
        excluded_all = exclude + ([out_node.name] if out_node is not None and out_node.op_type == "Sigmoid" and out_node.name not in exclude else [])
        raw_path = Path(scratch) / "quantized.onnx"
        _quantize(prepared_path, raw_path, tensors, options, excluded_all)
        quantized = onnx.load(str(raw_path))
        g.unquantize_branch_inputs(quantized)
        corrected: Dict[str, float] = {}
        if options.bias_correction:
            corrected = apply_bias_correction(prepared, quantized, tensors, options.batch_size)
    info: Dict[str, Any] = {
        "precision": "int8",
        "format": "QDQ: per-channel symmetric int8 weights, per-tensor symmetric int8 activations, float bias",
        "calibration_method": options.method,
        "percentile": options.percentile if options.method == "percentile" else None,
        "calibration_images": int(len(tensors)),
        "calibration": calibration_note,
        "kept_float": exclude,
        "bias_correction": options.bias_correction,
        "bias_corrected_layers": len(corrected),
        "reduce_range": options.reduce_range,
        "source_sha256": file_sha256(Path(fp32_path)),
        "tool": "onnxruntime.quantization {}".format(onnxruntime.__version__),
        "options": asdict(options),
    }
    g.copy_metadata(source, quantized, info)
    g.save_model(quantized, Path(target))
    return Int8Result(path=Path(target), seconds=time.perf_counter() - started, info=info)
