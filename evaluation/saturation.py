"""The u8 x s8 saturation of x86 CPUs without VNNI, simulated bit-exactly on real activations.

On x86, ONNX Runtime runs int8 convolutions as u8 activations x s8 weights (the committed form's
symmetric s8 activations are turned into u8 by adding 128, zero point 128; the ONNX Runtime form
built from it has u8 activations already). Without VNNI, MLAS's AVX2/AVX-512BW kernels
multiply with ``vpmaddubsw``: it adds two adjacent u8 x s8 products into a *saturating int16*
before widening, so a pair sum beyond +-32767 is clipped. 255 x 127 x 2 = 64770 can overflow;
with ``reduce_range`` (7-bit weights, |w| <= 64) the worst case 255 x 64 x 2 = 32640 cannot. With
VNNI (``vpdpbusd``, this project's Sapphire Rapids CPU) the products accumulate in int32 directly,
so the problem cannot be observed by running ONNX Runtime here: this module reproduces the
arithmetic instead, with the activations the quantized model really produces on calibration
images, for every layer that goes through the u8 x s8 GEMM (regular convolutions and Gemm;
depthwise convolutions use a separate kernel that widens to 16 bit before multiplying).

Pairing follows the GEMM's K order: ONNX Runtime's im2col lays K out as (channel, kernel row,
kernel column), and ``vpmaddubsw`` pairs K indices 2k and 2k+1.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine_build.quantization import graph as g
from engine_build.quantization.ort_layout import VNNI_FLAGS, x86_without_vnni
from service.model_info import INPUT_NAME

__all__ = ["INT16_MAX", "VNNI_FLAGS", "saturation_markdown", "saturation_report", "x86_without_vnni"]

INT16_MAX = 32767
def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _im2col(x: np.ndarray, kernel: tuple, strides: tuple, pads: tuple, pad_value: int) -> np.ndarray:
    """N x C x H x W -> (positions, C*kh*kw), K ordered (c, kh, kw) as ONNX Runtime's im2col."""
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=pad_value)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))[:, :, :: strides[0], :: strides[1]]
    n, c, oh, ow = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


def _pair_sums(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """(positions, O, K/2) int32 sums of adjacent u8 x s8 products (what vpmaddubsw computes)."""
    k = a_u8.shape[1]
    if k % 2:
        a_u8 = np.concatenate([a_u8, np.zeros((a_u8.shape[0], 1), a_u8.dtype)], axis=1)
        w_s8 = np.concatenate([w_s8, np.zeros((w_s8.shape[0], 1), w_s8.dtype)], axis=1)
    products = a_u8[:, None, :].astype(np.int32) * w_s8[None, :, :].astype(np.int32)
    return products[:, :, 0::2] + products[:, :, 1::2]


def saturation_report(qdq_path: Any, tensors: np.ndarray, max_positions: int = 2048, seed: int = 0) -> List[Dict[str, Any]]:
    """Per u8 x s8 GEMM layer: how often pair sums saturate, and the worst output error it causes.

    ``rel_error_max`` is max |saturated - exact| / max |exact| of the layer's int32 accumulators
    over the sampled output positions; ``rr_*`` are the same with reduce_range weights (rounded to
    7 bits from the 8-bit ones, which is what reduce_range quantization yields up to rounding).
    """
    model = onnx.load(str(qdq_path))
    inits = g.initializer_map(model)
    producers = {out: n for n in model.graph.node for out in n.output}
    layers = []
    probes: List[str] = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or _attr(node, "group", 1) != 1:
            continue
        act_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
        if act_dq is None or w_dq is None or act_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        if w_dq.input[0] not in inits or act_dq.input[0] in inits:
            continue
        if inits[w_dq.input[0]].data_type != TensorProto.INT8:
            continue  # u8 weights run on the u8 x u8 kernels, which widen before multiplying
        zero = numpy_helper.to_array(inits[act_dq.input[2]]) if len(act_dq.input) > 2 and act_dq.input[2] in inits else np.int8(0)
        # s8 activations reach the kernel shifted to u8 (+128, zero point 128); u8 ones as they are.
        shift, pad = (128, 128 + int(zero)) if zero.dtype == np.int8 else (0, int(zero))
        layers.append((node, act_dq.input[0], numpy_helper.to_array(inits[w_dq.input[0]]).astype(np.int8), shift, pad, zero.dtype))
        probes.append(act_dq.input[0])
    if not layers:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    types = {layer[1]: (TensorProto.UINT8 if layer[5] == np.uint8 else TensorProto.INT8) for layer in layers}
    for name in sorted(set(probes)):
        probe.graph.output.append(helper.make_tensor_value_info(name, types[name], None))
    session = g.session(probe)
    names = sorted(set(probes))
    values = dict(zip(names, session.run(names, {INPUT_NAME: np.ascontiguousarray(tensors, np.float32)})))
    rng = np.random.default_rng(seed)
    rows: List[Dict[str, Any]] = []
    for node, act_name, w_s8, shift, pad_value, _dtype in layers:
        a_u8 = values[act_name].astype(np.int16) + shift
        if node.op_type == "Conv":
            kernel = tuple(w_s8.shape[2:])
            pads = tuple(_attr(node, "pads", [0, 0, 0, 0]))
            strides = tuple(_attr(node, "strides", [1, 1]))
            # Padding is the zero point (u8 128 for shifted s8 activations).
            cols = _im2col(a_u8, kernel, strides, pads, pad_value)
            weights = w_s8.reshape(w_s8.shape[0], -1)
        else:
            cols = a_u8.reshape(a_u8.shape[0], -1)
            weights = w_s8 if _attr(node, "transB", 0) else w_s8.T
        if len(cols) > max_positions:
            cols = cols[rng.choice(len(cols), max_positions, replace=False)]
        result: Dict[str, Any] = {"layer": node.name, "k": int(weights.shape[1]), "outputs": int(weights.shape[0])}
        # Chunks of output positions keep the (positions x O x K/2) pair tensor near 100 MB.
        chunk = max(1, int(2.5e7 // max(1, weights.shape[0] * weights.shape[1])))
        for tag, w in (("", weights), ("rr_", np.clip(np.round(weights.astype(np.float64) / 2.0), -64, 64).astype(np.int8))):
            saturated_pairs = affected = total_pairs = total_outputs = 0
            max_error, max_exact = 0.0, 0.0
            for start in range(0, len(cols), chunk):
                pairs = _pair_sums(cols[start : start + chunk], w)
                exact = pairs.sum(axis=2, dtype=np.int64)
                saturated = np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(axis=2, dtype=np.int64)
                saturated_pairs += int(np.count_nonzero(np.abs(pairs) > INT16_MAX))
                total_pairs += pairs.size
                affected += int(np.count_nonzero(saturated != exact))
                total_outputs += exact.size
                max_error = max(max_error, float(np.max(np.abs(saturated - exact))))
                max_exact = max(max_exact, float(np.max(np.abs(exact))))
            result[tag + "saturated_pairs"] = saturated_pairs / max(1, total_pairs)
            result[tag + "affected_outputs"] = affected / max(1, total_outputs)
            result[tag + "rel_error_max"] = max_error / (max_exact or 1.0)
        rows.append(result)
    return rows


def saturation_markdown(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| layer | K | saturating pairs | outputs affected | max rel. error | with reduce_range: saturating pairs |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            "| {} | {} | {:.3%} | {:.3%} | {:.2e} | {:.3%} |".format(
                row["layer"], row["k"], row["saturated_pairs"], row["affected_outputs"], row["rel_error_max"], row["rr_saturated_pairs"]
            )
        )
    return "\n".join(lines)
