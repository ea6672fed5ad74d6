"""Builders turn the ONNX model into per-precision engines and record them in the manifest."""

from __future__ import annotations

from pathlib import Path

from service.engines import EngineEntry


def build_engine(model_path: Path, precision: str, backend: str, engine_dir: Path, **options: object) -> EngineEntry:
    """Build one engine (or return the manifest's matching one) for ``backend`` at ``precision``."""
    if backend == "onnxruntime":
        from service.builders.onnxruntime_builder import build_onnxruntime_engine

        return build_onnxruntime_engine(Path(model_path), precision, Path(engine_dir), **options)
    if backend == "tensorrt":
        from service.builders.tensorrt_builder import build_tensorrt_engine

        return build_tensorrt_engine(Path(model_path), precision, Path(engine_dir), **options)
    raise ValueError("unknown backend {!r}".format(backend))
