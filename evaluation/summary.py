"""Per-layer quantization summary of an ONNX artifact: bit-width, granularity, scale and amax ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from engine_build.quantization import graph as g

_BITS = {TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT16: 16, TensorProto.FLOAT: 32}
_QMAX = {8: 127.0, 4: 7.0}


def layer_summary(model_path: Path) -> List[Dict[str, Any]]:
    """One row per Conv/Gemm/MatMul: weight bits, per-channel or per-tensor, scale range, input amax."""
    model = onnx.load(str(model_path))
    inits = g.initializer_map(model)
    producers = {out: n for n in model.graph.node for out in n.output}
    rows: List[Dict[str, Any]] = []
    for node in model.graph.node:
        if node.op_type not in g.WEIGHTED_OPS or len(node.input) < 2:
            continue
        row: Dict[str, Any] = {"layer": node.name, "op": node.op_type}
        weight_src = producers.get(node.input[1])
        if node.input[1] in inits:
            bits = _BITS.get(inits[node.input[1]].data_type, 32)
            row.update(weight_bits=bits, granularity="-", weight_scale_min=None, weight_scale_max=None)
        elif weight_src is not None and weight_src.op_type == "DequantizeLinear" and weight_src.input[0] in inits:
            q = inits[weight_src.input[0]]
            scale = numpy_helper.to_array(inits[weight_src.input[1]]).astype(np.float64)
            block = next((a.i for a in weight_src.attribute if a.name == "block_size"), 0)
            granularity = "block {}".format(block) if block else ("per-channel" if scale.size > 1 else "per-tensor")
            row.update(
                weight_bits=_BITS.get(q.data_type, 8),
                granularity=granularity,
                weight_scale_min=float(scale.min()),
                weight_scale_max=float(scale.max()),
            )
        elif weight_src is not None and weight_src.op_type == "Cast":
            row.update(weight_bits=16, granularity="-", weight_scale_min=None, weight_scale_max=None)
        else:
            continue
        row["input_amax"] = _activation_amax(node.input[0], producers, inits)
        rows.append(row)
    return rows


def _activation_amax(tensor: str, producers: Dict[str, onnx.NodeProto], inits: Dict[str, onnx.TensorProto]) -> Optional[float]:
    """Largest |value| the per-tensor quantization feeding ``tensor`` can represent, if any.

    int8 with zero point 0: 127 x scale; u8 with zero point z: max(z, 255 - z) x scale.
    """
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
        return None
    scale = float(numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64).max())
    if len(dq.input) > 2 and dq.input[2] in inits:
        zero = numpy_helper.to_array(inits[dq.input[2]])
        if zero.dtype == np.uint8:
            return scale * float(max(int(zero.max()), 255 - int(zero.min())))
        return scale * float(127 + abs(int(zero.max())))
    return scale * _QMAX[8]


def summary_markdown(rows: List[Dict[str, Any]]) -> str:
    """A markdown table; consecutive float layers are listed individually (the model is small)."""
    lines = ["| layer | op | weight bits | granularity | weight scale range | input amax |", "|---|---|---|---|---|---|"]
    for row in rows:
        scales = "-" if row.get("weight_scale_min") is None else "{:.3g} .. {:.3g}".format(row["weight_scale_min"], row["weight_scale_max"])
        amax = "-" if row.get("input_amax") is None else "{:.3g}".format(row["input_amax"])
        lines.append("| {} | {} | {} | {} | {} | {} |".format(row["layer"], row["op"], row["weight_bits"], row["granularity"], scales, amax))
    return "\n".join(lines)


def bit_counts(rows: List[Dict[str, Any]]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for row in rows:
        key = "{}-bit".format(row["weight_bits"])
        counts[key] = counts.get(key, 0) + 1
    return counts
