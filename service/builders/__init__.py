"""Builders turn the ONNX model into per-precision engines and record them in the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from service.config import PRECISIONS
from service.engines import EngineEntry, EngineKey, EngineManifest, reusable_entry
from service.errors import EngineError
from service.model_info import ModelInfo


@dataclass(frozen=True)
class BuildStart:
    """What every builder knows before it builds: the model, the engine's key, the manifest, and
    the manifest's intact engine for that key (``existing``), which the builder returns as is."""

    model: ModelInfo
    key: EngineKey
    manifest: EngineManifest
    existing: Optional[EngineEntry]


def start_build(model_path: Path, precision: str, backend: str, engine_dir: Path, force: bool = False) -> BuildStart:
    """Check the precision, key the engine by model, precision, backend and device, find a reusable one."""
    from service.runtime import engine_key  # the runtime package imports the builders lazily too

    if precision not in PRECISIONS:
        raise EngineError("unknown precision {!r}; use one of {}".format(precision, ", ".join(PRECISIONS)))
    model = ModelInfo.from_onnx(Path(model_path))
    key = engine_key(model, precision, backend)
    manifest = EngineManifest.load(Path(engine_dir))
    return BuildStart(model, key, manifest, reusable_entry(manifest, key, force))


def build_engine(model_path: Path, precision: str, backend: str, engine_dir: Path, **options: object) -> EngineEntry:
    """Build one engine (or return the manifest's matching one) for ``backend`` at ``precision``."""
    if backend == "onnxruntime":
        from service.builders.onnxruntime_builder import build_onnxruntime_engine

        return build_onnxruntime_engine(Path(model_path), precision, Path(engine_dir), **options)
    if backend == "tensorrt":
        from service.builders.tensorrt_builder import build_tensorrt_engine

        return build_tensorrt_engine(Path(model_path), precision, Path(engine_dir), **options)
    raise ValueError("unknown backend {!r}".format(backend))
