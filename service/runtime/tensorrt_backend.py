"""TensorRT on an NVIDIA GPU (Jetson TX2 NX / Orin, or a dGPU), TensorRT 8.2 .. 10.x.

One backend = one CUDA context, one execution context, one stream, and page-locked host plus
device buffers sized for the largest batch, all allocated once in the constructor. The
micro-batching worker thread constructs it (through ``backend_factory``) and is the only thread
that calls it: a CUDA context is current on one thread, so creating it here, in that thread,
and refusing calls from any other thread keeps every CUDA call on the thread that owns it.
Version differences (named tensors vs bindings) live in :mod:`service.runtime.trt_compat`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from service.errors import EngineError
from service.model_info import INPUT_NAME, OUTPUT_NAME
from service.runtime import trt_compat as compat
from service.runtime.base import InferenceBackend

BACKEND_NAME = "tensorrt"


def device_name(device_index: int = 0) -> str:
    """GPU name and compute capability, e.g. ``Orin sm_87``: an engine is valid for one of them."""
    import pycuda.driver as cuda

    cuda.init()
    device = cuda.Device(device_index)
    major, minor = device.compute_capability()
    return "{} sm_{}{}".format(device.name(), major, minor)


def tool_version() -> str:
    return "tensorrt-" + compat.version_string()


class TensorRTBackend(InferenceBackend):
    name = BACKEND_NAME

    def __init__(self, engine_path: Path, precision: str, max_batch: int = 8, device_index: int = 0) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        self.precision = precision
        self.engine_path = Path(engine_path)
        self._cuda = cuda
        self._owner_thread = threading.get_ident()
        self._closed = False
        self._device_buffers: List[Any] = []
        cuda.init()
        # make_context() creates the context and makes it current on this (the worker) thread.
        self._cuda_context = cuda.Device(device_index).make_context()
        try:
            self._logger = compat.make_logger()
            self._runtime = trt.Runtime(self._logger)
            engine = compat.deserialize(self._runtime, self.engine_path.read_bytes())
            if engine is None:
                raise EngineError(
                    "TensorRT {} could not load engine {} (built by another TensorRT version or for another GPU?); "
                    "rebuild it with `python build_engines.py --backend tensorrt --precision {}`".format(
                        compat.version_string(), self.engine_path, precision
                    )
                )
            self._engine = engine
            self._context = compat.create_context(engine)
            self._tensors = compat.io_tensors(engine)
            by_name = {t.name: t for t in self._tensors}
            if INPUT_NAME not in by_name or OUTPUT_NAME not in by_name:
                raise EngineError(
                    "engine {} has tensors {}; the service needs input '{}' and output '{}'".format(
                        self.engine_path, sorted(by_name), INPUT_NAME, OUTPUT_NAME
                    )
                )
            self._input, self._output = by_name[INPUT_NAME], by_name[OUTPUT_NAME]
            self.max_batch_size = max(1, min(int(max_batch), compat.profile_max_batch(engine, self._input)))
            self._chw = tuple(int(v) for v in self._input.shape[1:])
            out_tail = tuple(max(1, int(v)) for v in self._output.shape[1:])
            # Allocated once: page-locked host buffers make the async copies truly asynchronous.
            self._host: Dict[str, np.ndarray] = {
                INPUT_NAME: cuda.pagelocked_empty((self.max_batch_size,) + self._chw, self._input.dtype),
                OUTPUT_NAME: cuda.pagelocked_empty((self.max_batch_size,) + out_tail, self._output.dtype),
            }
            self._device: Dict[str, Any] = {}
            for name, host in self._host.items():
                allocation = cuda.mem_alloc(host.nbytes)
                self._device_buffers.append(allocation)
                self._device[name] = allocation
            self._stream = cuda.Stream()
        except BaseException:
            self._release()
            raise

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner_thread:
            raise RuntimeError(
                "the TensorRT backend was created on thread {} and its CUDA context is current there only; "
                "call it from that thread (the batching worker)".format(self._owner_thread)
            )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError("the TensorRT backend is closed")
        self._check_thread()
        batch = np.asarray(batch)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self._chw:
            raise ValueError("expected a batch N x {}, got {}".format(" x ".join(map(str, self._chw)), batch.shape))
        results = [self._infer_chunk(batch[start : start + self.max_batch_size]) for start in range(0, len(batch), self.max_batch_size)]
        return np.concatenate(results) if results else np.zeros((0,), np.float32)

    def _infer_chunk(self, chunk: np.ndarray) -> np.ndarray:
        cuda = self._cuda
        count = len(chunk)
        host_in, host_out = self._host[INPUT_NAME], self._host[OUTPUT_NAME]
        np.copyto(host_in[:count], chunk, casting="same_kind")
        compat.set_input_shape(self._context, self._input, (count,) + self._chw)
        cuda.memcpy_htod_async(self._device[INPUT_NAME], host_in[:count], self._stream)
        addresses = {t.name: int(self._device[t.name]) for t in self._tensors}
        compat.execute(self._context, self._tensors, addresses, int(self._stream.handle))
        cuda.memcpy_dtoh_async(host_out[:count], self._device[OUTPUT_NAME], self._stream)
        self._stream.synchronize()
        return np.asarray(host_out[:count], dtype=np.float32).reshape(count).copy()

    def _release(self) -> None:
        for allocation in self._device_buffers:
            try:
                allocation.free()
            except Exception:  # freeing during teardown must not hide the original error
                pass
        self._device_buffers = []
        # Engine objects hold CUDA resources: drop them while the context is still current.
        for attribute in ("_context", "_engine", "_runtime"):
            if hasattr(self, attribute):
                delattr(self, attribute)
        context: Optional[Any] = getattr(self, "_cuda_context", None)
        if context is not None:
            context.pop()
            context.detach()
            self._cuda_context = None

    def close(self) -> None:
        if self._closed:
            return
        self._check_thread()
        self._closed = True
        self._release()
