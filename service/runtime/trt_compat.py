"""Every TensorRT-version-specific call, TensorRT 8.2 (JetPack 4.6) to 10.x, in one place.

The rest of the code calls these functions and never asks which TensorRT it runs on. The API
generations differ in:

* I/O: TensorRT >= 8.5 has named tensors (``num_io_tensors``, ``set_input_shape``,
  ``set_tensor_address``, ``execute_async_v3``); 8.2-8.4 only bindings (``num_bindings``,
  ``set_binding_shape``, ``execute_async_v2``), which TensorRT 10 removed.
* Builder: ``set_memory_pool_limit`` (>= 8.4) versus ``max_workspace_size`` (removed in 10);
  ``EXPLICIT_BATCH`` required before 10 and ignored (deprecated) in 10.
* Parser errors: ``node_name()`` exists from 8.6/10; before, only the node index.
* INT4 weight-only quantization exists only from TensorRT 10.

This module is type-checked against ``tensorrt-stubs`` (the TensorRT 10 API). Calls that exist only
in TensorRT 8.x are reached with ``getattr`` so that the checker does not flag them, each marked
"8.x only".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import tensorrt as trt

#: TensorRT's first version with INT4 weight-only quantization.
INT4_MIN_VERSION = (10, 0)


@dataclass(frozen=True)
class IOTensor:
    """One engine input or output; ``index`` is its binding index (the bindings API needs it)."""

    name: str
    index: int
    is_input: bool
    dtype: Any  # numpy dtype
    shape: Tuple[int, ...]


def version() -> Tuple[int, int]:
    import tensorrt as trt

    match = re.match(r"(\d+)\.(\d+)", str(trt.__version__))
    if match is None:
        return (0, 0)
    return int(match.group(1)), int(match.group(2))


def version_string() -> str:
    import tensorrt as trt

    return str(trt.__version__)


def supports_int4() -> bool:
    return version() >= INT4_MIN_VERSION


def make_logger(verbose: bool = False) -> trt.Logger:
    import tensorrt as trt

    return trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)


# ---------------------------------------------------------------------------------------------
# Builder


def create_network(builder: trt.Builder) -> trt.INetworkDefinition:
    import tensorrt as trt

    if version() >= (10, 0):
        return builder.create_network(0)
    # 8.x: the ONNX parser needs an explicit-batch network.
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))


def set_workspace(config: trt.IBuilderConfig, workspace_bytes: int) -> None:
    import tensorrt as trt

    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    else:
        setattr(config, "max_workspace_size", int(workspace_bytes))  # 8.2/8.3 only


def platform_has_fast_fp16(builder: trt.Builder) -> bool:
    # Deprecated in 10.x (every supported GPU has it) and may disappear: absent means yes.
    return bool(getattr(builder, "platform_has_fast_fp16", True))


def platform_has_fast_int8(builder: trt.Builder) -> bool:
    return bool(getattr(builder, "platform_has_fast_int8", True))


def set_precision_flags(config: trt.IBuilderConfig, precision: str) -> List[str]:
    """Builder flags for ``precision``; returns their names for the manifest."""
    import tensorrt as trt

    names: List[str] = []
    if precision in ("fp16", "int8", "int4"):
        # FP16 as well for INT8/INT4: layers left unquantized run in half precision, not FP32.
        config.set_flag(trt.BuilderFlag.FP16)
        names.append("FP16")
    if precision == "int8":
        # Explicit quantization: the Q/DQ nodes carry the scales; no calibrator is set.
        config.set_flag(trt.BuilderFlag.INT8)
        names.append("INT8")
    if precision == "int4":
        flag = getattr(trt.BuilderFlag, "INT4", None)
        if flag is not None:
            config.set_flag(flag)
            names.append("INT4")
    return names


def add_profile(builder: trt.Builder, config: trt.IBuilderConfig, input_name: str, shape_chw: Sequence[int], max_batch: int) -> Tuple[int, int, int]:
    """A dynamic-batch optimization profile 1..max_batch, tuned for the middle of the range."""
    import tensorrt as trt

    profile = builder.create_optimization_profile()
    opt = max(1, min(max_batch, max(1, max_batch // 2)))
    chw = [int(v) for v in shape_chw]
    profile.set_shape(input_name, trt.Dims([1] + chw), trt.Dims([opt] + chw), trt.Dims([int(max_batch)] + chw))
    config.add_optimization_profile(profile)
    return 1, opt, int(max_batch)


def load_timing_cache(config: trt.IBuilderConfig, data: bytes) -> trt.ITimingCache:
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, False)
    return cache


def serialize_timing_cache(config: trt.IBuilderConfig) -> bytes:
    cache = config.get_timing_cache()
    if cache is None:
        return b""
    return bytes(memoryview(cache.serialize()))


def parser_errors(parser: trt.OnnxParser, node_names: Sequence[str]) -> List[str]:
    """One line per ONNX parser error, naming the node (by name where TensorRT gives only an index)."""
    lines: List[str] = []
    for index in range(int(parser.num_errors)):
        error = parser.get_error(index)
        node_index = int(error.node())
        name = ""
        if hasattr(error, "node_name"):
            name = str(error.node_name())
        if not name and 0 <= node_index < len(node_names):
            name = node_names[node_index]
        operator = str(error.node_operator()) if hasattr(error, "node_operator") else ""
        where = "node {!r}".format(name) if name else "node #{}".format(node_index) if node_index >= 0 else "the model"
        if operator:
            where += " ({})".format(operator)
        lines.append("{}: {}".format(where, error.desc()))
    return lines


def build_serialized(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig) -> Optional[bytes]:
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return None
    return bytes(memoryview(serialized))


# ---------------------------------------------------------------------------------------------
# Runtime


def deserialize(runtime: trt.Runtime, data: bytes) -> Optional[trt.ICudaEngine]:
    return runtime.deserialize_cuda_engine(data)


def has_named_tensors(engine: trt.ICudaEngine) -> bool:
    return hasattr(engine, "num_io_tensors")


def dims_tuple(dims: trt.Dims) -> Tuple[int, ...]:
    # Dims has __len__/__getitem__ but no __iter__ in the stubs; index it.
    return tuple(int(dims[i]) for i in range(len(dims)))


def io_tensors(engine: trt.ICudaEngine) -> List[IOTensor]:
    import tensorrt as trt

    tensors: List[IOTensor] = []
    if has_named_tensors(engine):
        for index in range(int(engine.num_io_tensors)):
            name = engine.get_tensor_name(index)
            tensors.append(
                IOTensor(
                    name=name,
                    index=index,
                    is_input=engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                    dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))),
                    shape=dims_tuple(engine.get_tensor_shape(name)),
                )
            )
        return tensors
    for index in range(int(getattr(engine, "num_bindings"))):  # 8.x only
        name = getattr(engine, "get_binding_name")(index)
        tensors.append(
            IOTensor(
                name=name,
                index=index,
                is_input=bool(getattr(engine, "binding_is_input")(index)),
                dtype=np.dtype(trt.nptype(getattr(engine, "get_binding_dtype")(index))),
                shape=dims_tuple(getattr(engine, "get_binding_shape")(index)),
            )
        )
    return tensors


def profile_max_batch(engine: trt.ICudaEngine, tensor: IOTensor) -> int:
    """The largest batch of optimization profile 0 (its max shape's first dimension)."""
    if has_named_tensors(engine):
        shapes = engine.get_tensor_profile_shape(tensor.name, 0)
    else:
        shapes = getattr(engine, "get_profile_shape")(0, tensor.index)  # 8.x only
    return int(shapes[2][0])


def create_context(engine: trt.ICudaEngine) -> trt.IExecutionContext:
    return engine.create_execution_context()


def set_input_shape(context: trt.IExecutionContext, tensor: IOTensor, shape: Sequence[int]) -> None:
    dims = [int(v) for v in shape]
    if hasattr(context, "set_input_shape"):
        ok = context.set_input_shape(tensor.name, dims)
    else:
        ok = getattr(context, "set_binding_shape")(tensor.index, dims)  # 8.x only
    if ok is False:
        raise ValueError("TensorRT rejected input shape {} for {}".format(dims, tensor.name))


def execute(context: trt.IExecutionContext, tensors: Sequence[IOTensor], addresses: Dict[str, int], stream_handle: int) -> None:
    """Run one batch on ``stream_handle`` with each tensor at its device address."""
    if hasattr(context, "execute_async_v3"):
        for tensor in tensors:
            context.set_tensor_address(tensor.name, int(addresses[tensor.name]))
        ok = context.execute_async_v3(stream_handle)
    else:
        bindings = [0] * len(tensors)
        for tensor in tensors:
            bindings[tensor.index] = int(addresses[tensor.name])
        ok = getattr(context, "execute_async_v2")(bindings=bindings, stream_handle=stream_handle)  # 8.x only
    if not ok:
        raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
