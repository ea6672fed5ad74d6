"""Backend selection: the configured precision and backend name become an engine and a backend."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from service.config import Settings
from service.engines import EngineEntry, EngineKey, EngineManifest, locate_engine
from service.errors import EngineError
from service.model_info import ModelInfo
from service.runtime.base import InferenceBackend

BackendFactory = Callable[[], InferenceBackend]


def _importable(name: str) -> bool:
    # ``pip install tensorrt-stubs`` (for mypy) leaves a ``tensorrt/`` folder of .pyi files only,
    # which imports as an empty namespace package (origin None): that is not TensorRT.
    try:
        spec = importlib.util.find_spec(name)
    except ValueError:  # already imported without a spec (a test's fake module)
        return True
    return spec is not None and spec.origin not in (None, "namespace")


def tensorrt_available() -> bool:
    return _importable("tensorrt") and _importable("pycuda")


def select_backend_name(requested: str) -> str:
    """``auto`` means TensorRT where it is installed (a Jetson, an NVIDIA image), else ONNX Runtime."""
    if requested != "auto":
        return requested
    return "tensorrt" if tensorrt_available() else "onnxruntime"


def engine_key(model: ModelInfo, precision: str, backend: str) -> EngineKey:
    if backend == "onnxruntime":
        from service.runtime import onnxruntime_backend as ort_backend

        return EngineKey(model.sha256, precision, backend, ort_backend.device_name(), ort_backend.tool_version())
    if backend == "tensorrt":
        from service.runtime import tensorrt_backend as trt_backend

        return EngineKey(model.sha256, precision, backend, trt_backend.device_name(), trt_backend.tool_version())
    raise EngineError("unknown backend {!r}; use onnxruntime or tensorrt".format(backend))


@dataclass
class ResolvedEngine:
    entry: EngineEntry
    path: Path
    backend: str


def resolve_engine(settings: Settings, model: ModelInfo) -> ResolvedEngine:
    """Find the engine for this model, precision, backend and device, building it if allowed."""
    backend = select_backend_name(settings.backend)
    key = engine_key(model, settings.precision, backend)
    manifest = EngineManifest.load(settings.engine_dir)
    try:
        entry = locate_engine(manifest, key)
    except EngineError:
        if not settings.auto_build:
            raise
        from service.builders import build_engine

        # A TensorRT engine's optimization profile must cover the server's largest batch.
        options = {"max_batch": settings.max_batch} if backend == "tensorrt" else {}
        entry = build_engine(model.path, settings.precision, backend, settings.engine_dir, **options)
    return ResolvedEngine(entry=entry, path=Path(settings.engine_dir) / entry.file, backend=backend)


def backend_factory(settings: Settings, engine: ResolvedEngine) -> BackendFactory:
    """A callable that opens the backend; the inference thread calls it, so it owns the context."""

    def open_backend() -> InferenceBackend:
        if engine.backend == "onnxruntime":
            from service.runtime.onnxruntime_backend import OnnxRuntimeBackend

            return OnnxRuntimeBackend(engine.path, settings.precision, settings.intra_op_threads, settings.intra_op_spinning)
        from service.runtime.tensorrt_backend import TensorRTBackend

        return TensorRTBackend(engine.path, settings.precision, settings.max_batch)

    return open_backend
