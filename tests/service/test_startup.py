"""Start-up policy: the configured engine is found, or built only where ANEMIA_AUTO_BUILD allows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.config import load_settings
from service.engines import EngineManifest
from service.errors import EngineError
from service.model_info import ModelInfo
from service.runtime.onnxruntime_backend import OnnxRuntimeBackend
from service.startup import backend_factory, resolve_engine


def test_a_missing_engine_is_built_only_when_auto_build_allows(tmp_path: Path, model_path: Path) -> None:
    model = ModelInfo.from_onnx(model_path)
    with pytest.raises(EngineError, match="ANEMIA_AUTO_BUILD=1"):
        resolve_engine(load_settings(model=model_path, engine_dir=tmp_path / "auto", precision="fp16"), model)
    assert not (tmp_path / "auto" / "manifest.json").exists()
    settings = load_settings(model=model_path, engine_dir=tmp_path / "auto", precision="fp16", auto_build=True)
    engine = resolve_engine(settings, model)
    assert engine.path.is_file() and (engine.entry.precision, engine.backend) == ("fp16", "onnxruntime")
    assert EngineManifest.load(tmp_path / "auto").entries == [engine.entry]
    assert resolve_engine(settings, model).entry == engine.entry  # found the second time, not rebuilt


def test_the_factory_opens_the_configured_backend_each_time_it_is_called(engine_dir: Path, model_path: Path) -> None:
    settings = load_settings(model=model_path, engine_dir=engine_dir, intra_op_threads=1)
    engine = resolve_engine(settings, ModelInfo.from_onnx(model_path))
    factory = backend_factory(settings, engine)
    first, second = factory(), factory()
    assert first is not second and all(isinstance(b, OnnxRuntimeBackend) for b in (first, second))
    assert first.precision == "fp32" and first.engine_path == engine.path
    size = ModelInfo.from_onnx(model_path).spec.input_size
    assert first.infer(np.zeros((2, 3, size, size), np.float32)).shape == (2,)
    first.close()
    second.close()
