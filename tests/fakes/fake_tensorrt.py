"""A fake ``tensorrt`` module in two API generations, running the ONNX graph with ONNX Runtime.

``generation="10"``: TensorRT 10 (named tensors: ``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``; ``set_memory_pool_limit``; ``ParserError.node_name``;
``BuilderFlag.INT4``). ``generation="8"``: TensorRT 8.2 as on JetPack 4.6 (bindings only:
``num_bindings``, ``set_binding_shape``, ``execute_async_v2``; ``max_workspace_size``; parser errors
with a node index only; no INT4; the ONNX parser needs an ``EXPLICIT_BATCH`` network). Attributes
of the other generation do not exist, so code that calls the wrong one fails here as it would on
the device.

The "engine" is a JSON header plus the ONNX bytes; execution reads the input from fake device
memory (:mod:`tests.fakes.fake_pycuda`) and writes the output back there.
"""

from __future__ import annotations

import enum
import json
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

ENGINE_MAGIC = b"FAKE-TRT-ENGINE\n"


class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32}


def nptype(dtype: DataType) -> Any:
    return _NP[DataType(dtype)]


class Dims(list):  # TensorRT's Dims behaves as a sequence of ints
    pass


def make_module(
    cuda: types.ModuleType,
    generation: str = "10",
    fast_fp16: bool = True,
    fast_int8: bool = True,
    unsupported_ops: Sequence[str] = (),
) -> types.ModuleType:
    if generation not in ("8", "10"):
        raise ValueError("generation is 8 or 10")
    v10 = generation == "10"
    module = types.ModuleType("tensorrt")
    module.__version__ = "10.3.0.26" if v10 else "8.2.1.8"  # type: ignore[attr-defined]
    log: List[Tuple[str, str]] = []
    builds: List[Dict[str, Any]] = []

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity

        def log(self, severity: int, message: str) -> None:
            log.append((str(severity), message))

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0

    flag_names = ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"] + (["INT4"] if v10 else [])
    BuilderFlag = enum.IntEnum("BuilderFlag", flag_names)  # type: ignore[misc]

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class TensorIOMode(enum.IntEnum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class Network:
        def __init__(self, flags: int) -> None:
            self.explicit_batch = bool(flags & (1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH))) or v10
            self.model: Optional[onnx.ModelProto] = None

    class ParserError:
        def __init__(self, node: int, desc: str, node_name: str, op: str) -> None:
            self._node, self._desc, self._node_name, self._op = node, desc, node_name, op

        def node(self) -> int:
            return self._node

        def desc(self) -> str:
            return self._desc

        def code(self) -> int:
            return 8  # UNSUPPORTED_NODE

    if v10:

        def node_name(self: ParserError) -> str:
            return self._node_name

        def node_operator(self: ParserError) -> str:
            return self._op

        ParserError.node_name = node_name  # type: ignore[attr-defined]
        ParserError.node_operator = node_operator  # type: ignore[attr-defined]

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.network = network
            self.errors: List[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

        def parse(self, data: bytes, path: Optional[str] = None) -> bool:
            self.errors = []
            if not self.network.explicit_batch:
                self.errors.append(ParserError(-1, "network must have explicit batch dimension (EXPLICIT_BATCH)", "", ""))
                return False
            model = onnx.load_from_string(bytes(data))
            inits = {i.name: i for i in model.graph.initializer}
            for index, node in enumerate(model.graph.node):
                reason = ""
                if node.op_type in unsupported_ops:
                    reason = "No importer registered for op: {}".format(node.op_type)
                elif node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].data_type == TensorProto.INT4:
                    if not v10:
                        reason = "Assertion failed: INT4 weights are not supported"
                    elif not any(a.name == "block_size" for a in node.attribute):
                        reason = "INT4 DequantizeLinear must use block quantization"
                if reason:
                    self.errors.append(ParserError(index, reason, node.name, node.op_type))
            if self.errors:
                return False
            self.network.model = model
            return True

    class OptimizationProfile:
        def __init__(self) -> None:
            self.shapes: Dict[str, Tuple[List[int], List[int], List[int]]] = {}

        def set_shape(self, name: str, min: Sequence[int], opt: Sequence[int], max: Sequence[int]) -> None:
            if not (list(min) <= list(opt) <= list(max)):
                raise ValueError("profile shapes must satisfy min <= opt <= max")
            self.shapes[name] = (list(min), list(opt), list(max))

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            text = bytes(data).decode() if data else ""
            self.entries = int(text.split(":")[1]) if text.startswith("FAKE-TIMING-CACHE:") else 0

        def serialize(self) -> bytes:
            return "FAKE-TIMING-CACHE:{}".format(self.entries).encode()

    class BuilderConfig:
        def __init__(self) -> None:
            self.flags: List[str] = []
            self.profiles: List[OptimizationProfile] = []
            self.workspace = 0
            self.cache: Optional[TimingCache] = None

        def set_flag(self, flag: Any) -> None:
            self.flags.append(BuilderFlag(flag).name)

        def add_optimization_profile(self, profile: OptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> TimingCache:
            return TimingCache(data)

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self) -> Optional[TimingCache]:
            return self.cache

    if v10:

        def set_memory_pool_limit(self: BuilderConfig, pool: MemoryPoolType, size: int) -> None:
            self.workspace = int(size)

        BuilderConfig.set_memory_pool_limit = set_memory_pool_limit  # type: ignore[attr-defined]
    else:

        def _get_ws(self: BuilderConfig) -> int:
            return self.workspace

        def _set_ws(self: BuilderConfig, value: int) -> None:
            self.workspace = int(value)

        BuilderConfig.max_workspace_size = property(_get_ws, _set_ws)  # type: ignore[attr-defined]

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger
            self.platform_has_fast_fp16 = fast_fp16
            self.platform_has_fast_int8 = fast_int8

        def create_network(self, flags: int = 0) -> Network:
            return Network(flags)

        def create_builder_config(self) -> BuilderConfig:
            return BuilderConfig()

        def create_optimization_profile(self) -> OptimizationProfile:
            return OptimizationProfile()

        def build_serialized_network(self, network: Network, config: BuilderConfig) -> Optional[bytes]:
            model = network.model
            if model is None or not config.profiles:
                log.append(("ERROR", "network not parsed or no optimization profile for dynamic input"))
                return None
            has_qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
            if has_qdq and "INT8" not in config.flags:
                log.append(("ERROR", "Network has Q/DQ layers but INT8 is not enabled"))
                return None
            if config.cache is not None:
                config.cache.entries += len(model.graph.node)
            name, (lo, opt, hi) = next(iter(config.profiles[0].shapes.items()))
            header = {"version": module.__version__, "flags": config.flags, "workspace": config.workspace, "profile": [lo, opt, hi], "input": name}
            builds.append(header)
            return ENGINE_MAGIC + json.dumps(header).encode() + b"\n" + model.SerializeToString()

    class Engine:
        def __init__(self, header: Dict[str, Any], model: onnx.ModelProto) -> None:
            self.header = header
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.session.get_inputs()] + [o.name for o in self.session.get_outputs()]
            self.inputs = {i.name for i in self.session.get_inputs()}
            self.shapes = {
                v.name: [d if isinstance(d, int) else -1 for d in v.shape] for v in list(self.session.get_inputs()) + list(self.session.get_outputs())
            }

        def _dtype(self, name: str) -> DataType:
            return DataType.FLOAT

        def create_execution_context(self) -> "ExecutionContext":
            if not getattr(cuda._state.local, "stack", None):
                raise cuda.LogicError("create_execution_context: no CUDA context current on this thread")
            return ExecutionContext(self)

    if v10:
        Engine.num_io_tensors = property(lambda self: len(self.names))  # type: ignore[attr-defined]
        Engine.get_tensor_name = lambda self, i: self.names[i]  # type: ignore[attr-defined]
        Engine.get_tensor_mode = lambda self, n: TensorIOMode.INPUT if n in self.inputs else TensorIOMode.OUTPUT  # type: ignore[attr-defined]
        Engine.get_tensor_dtype = lambda self, n: self._dtype(n)  # type: ignore[attr-defined]
        Engine.get_tensor_shape = lambda self, n: Dims(self.shapes[n])  # type: ignore[attr-defined]
        Engine.get_tensor_profile_shape = lambda self, n, p: [Dims(s) for s in self.header["profile"]]  # type: ignore[attr-defined]
    else:
        Engine.num_bindings = property(lambda self: len(self.names))  # type: ignore[attr-defined]
        Engine.get_binding_name = lambda self, i: self.names[i]  # type: ignore[attr-defined]
        Engine.binding_is_input = lambda self, i: self.names[i] in self.inputs  # type: ignore[attr-defined]
        Engine.get_binding_dtype = lambda self, i: self._dtype(self.names[i])  # type: ignore[attr-defined]
        Engine.get_binding_shape = lambda self, i: Dims(self.shapes[self.names[i]])  # type: ignore[attr-defined]
        Engine.get_profile_shape = lambda self, p, i: [Dims(s) for s in self.header["profile"]]  # type: ignore[attr-defined]

    class ExecutionContext:
        def __init__(self, engine: Engine) -> None:
            self.engine = engine
            self.input_shapes: Dict[str, List[int]] = {}
            self.addresses: Dict[str, int] = {}
            self.executions = 0

        def _set_shape(self, name: str, dims: Sequence[int]) -> bool:
            lo, _, hi = self.engine.header["profile"]
            if not (list(lo) <= list(dims) and all(a <= b for a, b in zip(dims, hi))):
                return False
            self.input_shapes[name] = list(dims)
            return True

        def _run(self, stream_handle: int) -> bool:
            engine = self.engine
            feeds = {}
            for name in engine.inputs:
                if name not in self.input_shapes or name not in self.addresses:
                    raise RuntimeError("input {} has no shape or address".format(name))
                feeds[name] = cuda._read(self.addresses[name], tuple(self.input_shapes[name]), np.float32)
            outputs = engine.session.run(None, feeds)
            for meta, value in zip(engine.session.get_outputs(), outputs):
                cuda._write(self.addresses[meta.name], np.asarray(value, np.float32))
            self.executions += 1
            return True

    if v10:
        ExecutionContext.set_input_shape = lambda self, name, dims: self._set_shape(name, list(dims))  # type: ignore[attr-defined]

        def set_tensor_address(self: ExecutionContext, name: str, address: int) -> bool:
            self.addresses[name] = int(address)
            return True

        ExecutionContext.set_tensor_address = set_tensor_address  # type: ignore[attr-defined]
        ExecutionContext.execute_async_v3 = lambda self, stream_handle: self._run(stream_handle)  # type: ignore[attr-defined]
    else:

        def set_binding_shape(self: ExecutionContext, index: int, dims: Sequence[int]) -> bool:
            return self._set_shape(self.engine.names[index], list(dims))

        def execute_async_v2(self: ExecutionContext, bindings: Sequence[int], stream_handle: int) -> bool:
            if len(bindings) != len(self.engine.names):
                raise RuntimeError("expected {} bindings, got {}".format(len(self.engine.names), len(bindings)))
            self.addresses = {name: int(ptr) for name, ptr in zip(self.engine.names, bindings)}
            return self._run(stream_handle)

        ExecutionContext.set_binding_shape = set_binding_shape  # type: ignore[attr-defined]
        ExecutionContext.execute_async_v2 = execute_async_v2  # type: ignore[attr-defined]

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> Optional[Engine]:
            data = bytes(data)
            if not data.startswith(ENGINE_MAGIC):
                log.append(("ERROR", "engine plan file is corrupted"))
                return None
            header_line, _, body = data[len(ENGINE_MAGIC) :].partition(b"\n")
            header = json.loads(header_line)
            if header["version"] != module.__version__:
                log.append(("ERROR", "engine plan built by TensorRT {} cannot be loaded".format(header["version"])))
                return None
            return Engine(header, onnx.load_from_string(body))

    for name, value in {
        "Logger": Logger,
        "NetworkDefinitionCreationFlag": NetworkDefinitionCreationFlag,
        "BuilderFlag": BuilderFlag,
        "DataType": DataType,
        "Dims": Dims,
        "nptype": nptype,
        "OnnxParser": OnnxParser,
        "Builder": Builder,
        "Runtime": Runtime,
        "ParserError": ParserError,
    }.items():
        setattr(module, name, value)
    if v10:
        module.MemoryPoolType = MemoryPoolType  # type: ignore[attr-defined]
        module.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    module._log = log  # type: ignore[attr-defined]
    module._builds = builds  # type: ignore[attr-defined]
    return module
