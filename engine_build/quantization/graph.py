"""Small ONNX graph helpers shared by the quantizers: metadata, layer aliases, intermediate means."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service.model_info import INPUT_NAME, OUTPUT_NAME

#: ``--keep-float`` accepts these aliases besides node names: the layers whose quantization
#: error hurts most in a small classifier (the stem sees raw pixels, the head makes the decision).
LAYER_ALIASES = ("first_conv", "classifier")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
METADATA_QUANT_PREFIX = "quantization."


def copy_metadata(source: onnx.ModelProto, target: onnx.ModelProto, extra: Mapping[str, object]) -> None:
    """Give ``target`` the service metadata of ``source`` plus ``quantization.*`` keys (JSON values)."""
    props = {p.key: p.value for p in source.metadata_props if not p.key.startswith(METADATA_QUANT_PREFIX)}
    for key, value in extra.items():
        props[METADATA_QUANT_PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    del target.metadata_props[:]
    helper.set_model_props(target, props)


def quantization_metadata(model: onnx.ModelProto) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_QUANT_PREFIX):
            try:
                out[prop.key[len(METADATA_QUANT_PREFIX) :]] = json.loads(prop.value)
            except ValueError:
                out[prop.key[len(METADATA_QUANT_PREFIX) :]] = prop.value
    return out


def initializer_map(model: onnx.ModelProto) -> Dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def weighted_nodes(model: onnx.ModelProto) -> List[onnx.NodeProto]:
    """Conv/Gemm/MatMul nodes whose weight (input 1) is a constant initializer, in graph order."""
    inits = initializer_map(model)
    return [n for n in model.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in inits]


#: Name scope of the in-graph colour-statistics branch: ``training.colour_head`` is the model's
#: ``colour`` attribute, which the exporter names ``/model/colour/...``.
COLOUR_BRANCH_SCOPE = "/colour/"


def float_only_nodes(model: onnx.ModelProto) -> List[str]:
    """The colour-statistics branch and every node it feeds (the head's Concat, Gemm, Sigmoid).

    Every quantizer keeps them in float: the branch's tensors (pixel counts, log-ratios, shares in
    0..1, standardized statistics) share no scale that one int8 grid per tensor could hold, the
    head's input mixes them with the CNN's features, and together they are a few thousand
    multiply-adds of the model's hundreds of millions. Graph order is topological in ONNX.
    """
    tainted: set = set()
    names: List[str] = []
    for node in model.graph.node:
        if COLOUR_BRANCH_SCOPE in node.name or any(name in tainted for name in node.input if name):
            names.append(node.name)
            tainted.update(node.output)
    return names


def unquantize_branch_inputs(model: onnx.ModelProto) -> int:
    """Let the colour branch read the float tensors its Q/DQ pairs came from; return how many inputs.

    A quantizer puts one QuantizeLinear/DequantizeLinear pair on a tensor that an int8 layer reads
    (the input image feeds the int8 stem), and every other reader of that tensor then reads the
    rounded copy too. The branch's ROI test (a pixel differs from the fill) and its statistics
    want the exact input, so its nodes are rewired to the pair's source.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    rewired = 0
    for node in model.graph.node:
        if COLOUR_BRANCH_SCOPE not in node.name:
            continue
        for position, name in enumerate(node.input):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producers.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[position] = q.input[0]
                rewired += 1
    return rewired


def resolve_layers(model: onnx.ModelProto, names: Iterable[str]) -> List[str]:
    """Node names for ``names``, expanding the aliases; an unknown name is an error that lists the choices."""
    nodes = weighted_nodes(model)
    all_names = {n.name for n in model.graph.node}
    resolved: List[str] = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name == "first_conv":
            convs = [n for n in nodes if n.op_type == "Conv"]
            if not convs:
                raise ValueError("the model has no Conv node for the alias first_conv")
            resolved.append(convs[0].name)
        elif name == "classifier":
            if not nodes:
                raise ValueError("the model has no Conv/Gemm/MatMul node for the alias classifier")
            resolved.append(nodes[-1].name)
        elif name in all_names:
            resolved.append(name)
        else:
            raise ValueError(
                "no node named {!r}; use {} or one of the weighted layers: {}".format(
                    name, " or ".join(LAYER_ALIASES), ", ".join(n.name for n in nodes[:8]) + (", ..." if len(nodes) > 8 else "")
                )
            )
    return sorted(set(resolved), key=resolved.index)


def output_node(model: onnx.ModelProto) -> Optional[onnx.NodeProto]:
    for node in model.graph.node:
        if OUTPUT_NAME in node.output:
            return node
    return None


def session(model: object, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with few threads: the machine is shared and calibration is not latency-bound."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def run_batches(sess: ort.InferenceSession, tensors: np.ndarray, batch_size: int = 16, input_name: str = INPUT_NAME) -> np.ndarray:
    """Probabilities (N,) for ``tensors``; float16 inputs are handled by the model's input type."""
    dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    out: List[np.ndarray] = []
    for start in range(0, len(tensors), batch_size):
        (probs,) = sess.run([OUTPUT_NAME], {input_name: np.ascontiguousarray(tensors[start : start + batch_size], dtype=dtype)})
        out.append(np.asarray(probs, np.float32).reshape(-1))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def probe_session(model: onnx.ModelProto, tensor_names: Sequence[str]) -> ort.InferenceSession:
    """A session of ``model`` that also outputs the named intermediate float tensors."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensor_names:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return session(probe)


def channel_means(model: onnx.ModelProto, tensor_names: Sequence[str], tensors: np.ndarray, batch_size: int = 16) -> Dict[str, np.ndarray]:
    """Per-channel mean (axis 1) of intermediate float tensors of ``model`` over ``tensors``."""
    sess = probe_session(model, tensor_names)
    sums: Dict[str, np.ndarray] = {}
    count = 0
    names = list(tensor_names)
    for start in range(0, len(tensors), batch_size):
        batch = tensors[start : start + batch_size]
        values = sess.run(names, {INPUT_NAME: batch})
        for name, value in zip(names, values):
            arr = np.asarray(value, np.float64)
            axes = tuple(i for i in range(arr.ndim) if i != 1)
            total = arr.sum(axis=axes) / (arr.size / arr.shape[1]) * len(batch)
            sums[name] = sums.get(name, 0.0) + total
        count += len(batch)
    return {name: (value / max(count, 1)).astype(np.float64) for name, value in sums.items()}


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def input_gram(model: onnx.ModelProto, tensor_names: Sequence[str], tensors: np.ndarray, batch_size: int = 8) -> Dict[str, np.ndarray]:
    """Per tensor, E[x x^T] over samples, a sample being one position's channel vector (axis 1).

    GPTQ's Hessian of a 1x1 convolution or a Gemm is this matrix of its input.
    """
    sess = probe_session(model, tensor_names)
    grams: Dict[str, np.ndarray] = {}
    counts: Dict[str, int] = {}
    names = list(tensor_names)
    for start in range(0, len(tensors), batch_size):
        values = sess.run(names, {INPUT_NAME: tensors[start : start + batch_size]})
        for name, value in zip(names, values):
            arr = np.asarray(value, np.float64)
            rows = np.moveaxis(arr, 1, -1).reshape(-1, arr.shape[1])
            grams[name] = grams.get(name, 0.0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]
    return {name: grams[name] / max(1, counts[name]) for name in grams}
