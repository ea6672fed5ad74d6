"""ONNX Runtime artifacts. FP32 is the model itself; the quantized twins come from quantization."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from service.engines import EngineEntry, EngineManifest, make_entry
from service.errors import EngineError
from service.model_info import ModelInfo
from service.runtime import engine_key


def build_onnxruntime_engine(model_path: Path, precision: str, engine_dir: Path, force: bool = False) -> EngineEntry:
    model = ModelInfo.from_onnx(model_path)
    key = engine_key(model, precision, "onnxruntime")
    manifest = EngineManifest.load(engine_dir)
    existing = manifest.find(key)
    if existing is not None and not force and (engine_dir / existing.file).is_file():
        return existing
    engine_dir.mkdir(parents=True, exist_ok=True)
    target = engine_dir / key.file_name(".onnx")
    started = time.perf_counter()
    if precision == "fp32":
        shutil.copyfile(str(model_path), str(target))
        info = {"source": str(model_path), "method": "copy of the FP32 model"}
    else:
        raise EngineError("precision {} is not available for onnxruntime yet".format(precision))
    entry = make_entry(key, target, time.perf_counter() - started, info)
    manifest.record(entry)
    return entry
