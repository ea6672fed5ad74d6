"""Weight-only INT4: int4 weights (``DequantizeLinear``, opset 21), float compute.

Two artifacts, because the runtimes allow different things:

* ONNX Runtime: every Conv/Gemm weight (except the layers kept in float) as a per-output-channel
  symmetric int4 initializer feeding a ``DequantizeLinear``; ONNX Runtime dequantizes and
  computes in float. The file is about 1/7 of FP32.
* TensorRT (>= 10): INT4 exists only as weight-only quantization of MatMul/Gemm weights, so for
  this CNN only the classifier; it becomes ``MatMul(x, DQ(int4 W, block-wise)) + bias``, the rest
  of the network runs in FP16. TensorRT < 10 and TX2 have no INT4 at all (refused in
  :mod:`engine_build.tensorrt_builder`).

Rounding (``--int4-rounding``):

* ``rtn``: round-to-nearest with the max-abs scale (the baseline).
* ``mse``: each channel's scale minimises its squared weight error over a grid of clipping ratios
  (MSE-optimal scale, Banner et al. 2019), then round-to-nearest. Data-free.
* ``gptq`` (default when calibration images are given): MSE-optimal scales, then GPTQ (Frantar et
  al. 2022) on every 1x1 convolution and Gemm: weights are rounded one input channel at a time and
  the rounding error is pushed onto the not-yet-rounded channels through the inverse of the
  layer's input Gram matrix E[x x^T] (measured on calibration images), minimising the error of
  the layer's *output* instead of its weights. Other layers (the 3x3 stem, depthwise) use ``mse``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine_build.quantization import graph as g
from engine_build.quantization.int8 import prepare_float_model
from engine_build.quantization.modes import ROUNDING_MODES
from service.model_info import file_sha256

INT4_MIN, INT4_MAX = -8, 7
INT4_OPSET = 21
# Clipping ratios searched per channel: 1.0 is round-to-nearest with the max-abs scale.
CLIP_RATIOS = np.linspace(0.3, 1.0, 71)


@dataclass
class Int4Options:
    rounding: str = "mse"
    keep_float: Tuple[str, ...] = ()
    skip_depthwise: bool = False
    block_size: int = 32  # TensorRT classifier only

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDING_MODES:
            raise ValueError("int4 rounding must be one of {}, got {!r}".format(ROUNDING_MODES, self.rounding))


@dataclass
class Int4Result:
    path: Path
    seconds: float
    info: Dict[str, Any] = field(default_factory=dict)


def channel_scales(weight_rows: np.ndarray, rounding: str) -> np.ndarray:
    """Per-row symmetric int4 scales (rows = output channels / blocks) for ``rounding``."""
    rows = np.asarray(weight_rows, np.float64)
    absmax = np.max(np.abs(rows), axis=1)
    absmax = np.where(absmax > 0, absmax, 1e-12)
    if rounding == "rtn":
        return absmax / INT4_MAX
    best_scale = absmax / INT4_MAX
    best_err = np.full(rows.shape[0], np.inf)
    for ratio in CLIP_RATIOS:
        scale = ratio * absmax / INT4_MAX
        q = np.clip(np.round(rows / scale[:, None]), INT4_MIN, INT4_MAX)
        err = np.sum((q * scale[:, None] - rows) ** 2, axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
    return best_scale


def gptq_rows(weight_rows: np.ndarray, scales: np.ndarray, gram: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """GPTQ rounding of ``weight_rows`` (O x I) with per-row ``scales``, I x I input Gram matrix."""
    w = np.array(weight_rows, np.float64)
    h = np.array(gram, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Largest-variance inputs first ("act order"): their errors get the most room to be absorbed.
    order = np.argsort(-np.diag(h))
    w, h = w[:, order], h[np.ix_(order, order)]
    h += damp * float(np.mean(np.diag(h))) * np.eye(len(h))
    h_inv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    q = np.zeros_like(w)
    for i in range(w.shape[1]):
        column = w[:, i]
        q[:, i] = np.clip(np.round(column / scales), INT4_MIN, INT4_MAX)
        error = (column - q[:, i] * scales) / h_inv[i, i]
        w[:, i:] -= np.outer(error, h_inv[i, i:])
    out = np.empty_like(q)
    out[:, order] = q
    return out.astype(np.int8)


def quantize_rows(weight_rows: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return np.clip(np.round(weight_rows / scales[:, None]), INT4_MIN, INT4_MAX).astype(np.int8)


def relative_error(weight: np.ndarray, dequantized: np.ndarray) -> float:
    denominator = float(np.sum(weight.astype(np.float64) ** 2)) or 1.0
    return float(np.sum((dequantized - weight) ** 2) / denominator)


def _int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), vals=values.reshape(-1).tolist())


def _to_opset21(model: onnx.ModelProto) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current < INT4_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, INT4_OPSET)
        except Exception:  # the converter lacks adapters for some ops; these graphs only need the bump
            for opset in model.opset_import:
                if opset.domain in ("", "ai.onnx"):
                    opset.version = INT4_OPSET
    # INT4 tensors need IR version 10.
    model.ir_version = max(model.ir_version, 10)
    return model


def _is_depthwise(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return node.op_type == "Conv" and group > 1 and weight.shape[1] == 1


def _gptq_eligible(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return not attrs.get("transA", 0)
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return node.op_type == "Conv" and group == 1 and weight.ndim == 4 and weight.shape[2:] == (1, 1)


def quantize_int4_ort(
    fp32_path: Path,
    target: Path,
    options: Optional[Int4Options] = None,
    tensors: Optional[np.ndarray] = None,
) -> Int4Result:
    """The ONNX Runtime INT4 artifact; ``tensors`` (calibration inputs) are needed for GPTQ."""
    options = options or Int4Options()
    if options.rounding == "gptq" and (tensors is None or len(tensors) == 0):
        raise ValueError("GPTQ rounding needs calibration images; pass some or use --int4-rounding mse")
    started = time.perf_counter()
    source = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory(prefix="int4-") as scratch:
        model = prepare_float_model(Path(fp32_path), Path(scratch) / "prepared.onnx")
    grams: Dict[str, np.ndarray] = {}
    if options.rounding == "gptq":
        assert tensors is not None
        inits0 = g.initializer_map(model)
        wanted = sorted(
            {n.input[0] for n in g.weighted_nodes(model) if _gptq_eligible(n, numpy_helper.to_array(inits0[n.input[1]]))}
        )
        grams = g.input_gram(model, wanted, tensors)
    keep = set(g.resolve_layers(model, options.keep_float)) | set(g.float_only_nodes(model))
    inits = g.initializer_map(model)
    uses: Dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    layers: List[Dict[str, Any]] = []
    new_nodes: List[onnx.NodeProto] = []
    for node in g.weighted_nodes(model):
        if node.name in keep or node.op_type not in ("Conv", "Gemm"):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if options.skip_depthwise and _is_depthwise(node, weight):
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 1 if node.op_type == "Gemm" and not trans_b else 0
        moved = np.moveaxis(weight, axis, 0)
        rows = moved.reshape(moved.shape[0], -1)
        scales = channel_scales(rows, "rtn" if options.rounding == "rtn" else "mse")
        method = "rtn" if options.rounding == "rtn" else "mse"
        if options.rounding == "gptq" and node.input[0] in grams and _gptq_eligible(node, weight):
            # GPTQ works on W as O x I with inputs along columns: Gemm(transB=0) stores I x O.
            q_rows = gptq_rows(rows, scales, grams[node.input[0]])
            method = "gptq"
        else:
            q_rows = quantize_rows(rows, scales)
        q = np.moveaxis(q_rows.reshape(moved.shape), 0, axis)
        dequant = np.moveaxis((q_rows * scales[:, None]).reshape(moved.shape), 0, axis)
        rtn_scales = channel_scales(rows, "rtn")
        rtn = np.moveaxis((quantize_rows(rows, rtn_scales) * rtn_scales[:, None]).reshape(moved.shape), 0, axis)
        base = node.name or node.input[1]
        q_name, s_name, dq_out = base + "_w_int4", base + "_w_int4_scale", base + "_w_int4_dq"
        model.graph.initializer.extend([_int4_tensor(q_name, q), numpy_helper.from_array(scales.astype(np.float32), s_name)])
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [dq_out], axis=axis, name=base + "_w_dequantize"))
        old_weight = node.input[1]
        node.input[1] = dq_out
        uses[old_weight] -= 1
        layers.append(
            {
                "layer": node.name,
                "op": node.op_type,
                "bits": 4,
                "granularity": "per-channel",
                "rounding": method,
                "weights": int(weight.size),
                "weight_rel_mse": relative_error(weight, dequant),
                "weight_rel_mse_rtn": relative_error(weight, rtn),
            }
        )
    for name, count in uses.items():
        if count == 0 and name in inits:
            model.graph.initializer.remove(inits[name])
    # DQ nodes first: initializer-only inputs keep the graph topologically sorted.
    nodes = list(new_nodes) + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model = _to_opset21(model)
    info: Dict[str, Any] = {
        "precision": "int4",
        "format": "weight-only int4 DequantizeLinear (opset 21), per-channel symmetric, float compute",
        "rounding": {"gptq": "GPTQ on 1x1 conv/Gemm + MSE-optimal per-channel scales", "mse": "MSE-optimal per-channel scale",
                     "rtn": "round-to-nearest, max-abs scale"}[options.rounding],
        "int4_layers": [layer["layer"] for layer in layers],
        "gptq_layers": [layer["layer"] for layer in layers if layer["rounding"] == "gptq"],
        "calibration_images": int(len(tensors)) if tensors is not None and options.rounding == "gptq" else 0,
        "kept_float": sorted(keep),
        "skip_depthwise": options.skip_depthwise,
        "weight_rel_mse_mean": float(np.mean([l["weight_rel_mse"] for l in layers])) if layers else 0.0,
        "weight_rel_mse_rtn_mean": float(np.mean([l["weight_rel_mse_rtn"] for l in layers])) if layers else 0.0,
        "source_sha256": file_sha256(Path(fp32_path)),
    }
    g.copy_metadata(source, model, info)
    onnx.checker.check_model(model)
    g.save_model(model, Path(target))
    return Int4Result(path=Path(target), seconds=time.perf_counter() - started, info=dict(info, layers=layers))


def quantize_int4_tensorrt(fp32_path: Path, target: Path, options: Optional[Int4Options] = None) -> Int4Result:
    """The TensorRT INT4 artifact: only the classifier Gemm becomes MatMul with block-wise int4 weights."""
    options = options or Int4Options()
    started = time.perf_counter()
    source = onnx.load(str(fp32_path))
    model = onnx.ModelProto()
    model.CopyFrom(source)
    inits = g.initializer_map(model)
    gemms = [n for n in g.weighted_nodes(model) if n.op_type in ("Gemm", "MatMul")]
    if not gemms:
        raise ValueError("{} has no Gemm/MatMul layer; TensorRT INT4 is weight-only on MatMul/Gemm".format(fp32_path))
    layers: List[Dict[str, Any]] = []
    for node in gemms:
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise ValueError("Gemm {} uses transA/alpha/beta; only plain x @ W + b is converted".format(node.name))
            weight_kn = weight.T if attrs.get("transB", 0) else weight
        else:
            weight_kn = weight
        k, n = weight_kn.shape
        block = min(options.block_size, k)
        if k % block:
            block = k  # one block per column: TensorRT needs K divisible by the block size
        blocks = weight_kn.reshape(k // block, block, n).transpose(0, 2, 1).reshape(-1, block)  # (K/B * N) x B
        scales = channel_scales(blocks, options.rounding)
        q_blocks = quantize_rows(blocks, scales)
        q = q_blocks.reshape(k // block, n, block).transpose(0, 2, 1).reshape(k, n)
        scale_kn = scales.reshape(k // block, n).astype(np.float32)
        base = node.name or node.input[1]
        q_name, s_name, dq_out, mm_out = base + "_w_int4", base + "_w_int4_scale", base + "_w_int4_dq", base + "_matmul"
        model.graph.initializer.extend([_int4_tensor(q_name, q), numpy_helper.from_array(scale_kn, s_name)])
        dq = helper.make_node("DequantizeLinear", [q_name, s_name], [dq_out], axis=0, block_size=block, name=base + "_w_dequantize")
        out = node.output[0]
        matmul = helper.make_node("MatMul", [node.input[0], dq_out], [mm_out if len(node.input) > 2 else out], name=base)
        replacement = [dq, matmul]
        if len(node.input) > 2 and node.input[2]:
            replacement.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=base + "_bias"))
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for offset, new in enumerate(replacement):
            model.graph.node.insert(index + offset, new)
        dequant = (q_blocks * scales[:, None]).reshape(k // block, n, block).transpose(0, 2, 1).reshape(k, n)
        layers.append(
            {"layer": base, "op": "MatMul", "bits": 4, "granularity": "block {} along K".format(block), "weights": int(weight.size),
             "weight_rel_mse": relative_error(weight_kn, dequant)}
        )
    used = {name for node in model.graph.node for name in node.input}
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)
    model = _to_opset21(model)
    info: Dict[str, Any] = {
        "precision": "int4",
        "format": "TensorRT weight-only int4 on MatMul (block-wise DequantizeLinear, opset 21); other layers FP16",
        "rounding": "MSE-optimal per-block scale" if options.rounding == "mse" else "round-to-nearest, max-abs scale",
        "int4_layers": [layer["layer"] for layer in layers],
        "source_sha256": file_sha256(Path(fp32_path)),
    }
    g.copy_metadata(source, model, info)
    onnx.checker.check_model(model)
    g.save_model(model, Path(target))
    return Int4Result(path=Path(target), seconds=time.perf_counter() - started, info=dict(info, layers=layers))


def int4_layer_names(model_path: Path) -> Sequence[str]:
    meta = g.quantization_metadata(onnx.load(str(model_path), load_external_data=False))
    layers = meta.get("int4_layers", [])
    return [str(x) for x in layers] if isinstance(layers, list) else []
