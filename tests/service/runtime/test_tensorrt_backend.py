"""TensorRTBackend against the fake TensorRT + pycuda, in both API generations."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import pytest

from engine_build.build import build_engine
from engine_build.quantization import graph as g
from engine_build.tensorrt_builder import TensorRTBuildOptions
from service.errors import EngineError
from tests.fakes import install_fakes
from tests.model_factory import make_test_model

GENERATIONS = ("10", "8")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("trt") / "m.onnx", width=8, input_size=32)


@pytest.fixture(params=GENERATIONS, ids=["trt10-named-tensors", "trt8.2-bindings"])
def fakes(request: Any, monkeypatch: pytest.MonkeyPatch) -> Tuple[Any, Any]:
    return install_fakes(monkeypatch, request.param)


def _engine(model: Path, tmp_path: Path, precision: str = "fp16", max_batch: int = 4) -> Path:
    entry = build_engine(model, precision, "tensorrt", tmp_path / "engines", TensorRTBuildOptions(max_batch=max_batch))
    return tmp_path / "engines" / entry.file


def test_inference_matches_the_model_and_splits_batches_above_the_profile(model: Path, tmp_path: Path, fakes: Tuple[Any, Any]) -> None:
    from service.runtime.tensorrt_backend import TensorRTBackend

    trt, cuda = fakes
    backend = TensorRTBackend(_engine(model, tmp_path), "fp16", max_batch=8)
    assert backend.max_batch_size == 4  # capped by the engine's optimization profile
    allocations = [e for e in cuda._state.events if e[0] in ("mem_alloc", "pagelocked_empty")]
    x = np.random.default_rng(0).uniform(-1, 1, (7, 3, 32, 32)).astype(np.float32)
    out = backend.infer(x)
    np.testing.assert_allclose(out, g.run_batches(g.session(model), x), atol=1e-6)
    assert out.shape == (7,) and out.dtype == np.float32
    assert backend.infer(x[:1]).shape == (1,)
    # buffers were allocated once, in the constructor; every copy used page-locked host memory
    assert [e for e in cuda._state.events if e[0] in ("mem_alloc", "pagelocked_empty")] == allocations
    copies = [e for e in cuda._state.events if e[0] in ("htod", "dtoh")]
    assert len(copies) == 2 * 3 and all(pagelocked for _, pagelocked in copies)  # 7 = 4 + 3, then 1
    backend.close()
    backend.close()  # idempotent
    assert cuda._state.contexts_alive == 0
    with pytest.raises(RuntimeError, match="closed"):
        backend.infer(x)


def test_the_cuda_context_belongs_to_the_thread_that_created_the_backend(model: Path, tmp_path: Path, fakes: Tuple[Any, Any]) -> None:
    """The batching worker builds the backend through backend_factory and is the only caller."""
    from service.config import load_settings
    from service.engines import EngineManifest
    from service.startup import ResolvedEngine, backend_factory

    engine_path = _engine(model, tmp_path)
    entry = EngineManifest.load(engine_path.parent).entries[-1]
    settings = load_settings(model=model, engine_dir=engine_path.parent, backend="tensorrt", precision="fp16", max_batch=4)
    factory = backend_factory(settings, ResolvedEngine(entry=entry, path=engine_path, backend="tensorrt"))
    x = np.zeros((2, 3, 32, 32), np.float32)
    results: Dict[str, Any] = {}

    def worker() -> None:
        backend = factory()
        results["backend"] = backend
        results["out"] = backend.infer(x)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert results["out"].shape == (2,)
    # Any other thread is refused before it touches CUDA (on real hardware: invalid context).
    with pytest.raises(RuntimeError, match="created on thread"):
        results["backend"].infer(x)


def test_a_damaged_or_foreign_engine_is_an_engine_error(model: Path, tmp_path: Path, fakes: Tuple[Any, Any]) -> None:
    from service.runtime.tensorrt_backend import TensorRTBackend

    trt, cuda = fakes
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine")
    with pytest.raises(EngineError, match="could not load engine .*bad.engine.*rebuild"):
        TensorRTBackend(bad, "fp16")
    assert cuda._state.contexts_alive == 0  # the context is released on failure too


def test_wrong_shaped_batch_is_rejected(model: Path, tmp_path: Path, fakes: Tuple[Any, Any]) -> None:
    from service.runtime.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend(_engine(model, tmp_path), "fp16")
    with pytest.raises(ValueError, match="expected a batch"):
        backend.infer(np.zeros((1, 3, 16, 16), np.float32))
    backend.close()


def test_device_name_and_tool_version_key_the_engine(fakes: Tuple[Any, Any]) -> None:
    from service.runtime import tensorrt_backend

    trt, _ = fakes
    assert tensorrt_backend.device_name() == "Fake Orin sm_87"
    assert tensorrt_backend.tool_version() == "tensorrt-" + trt.__version__


def test_stub_only_tensorrt_is_not_mistaken_for_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pip install tensorrt-stubs`` leaves tensorrt/__init__.pyi: auto must still pick ONNX Runtime."""
    import importlib
    import sys

    from engine_build.backends import get_backend, tensorrt_available

    for name in ("tensorrt", "pycuda"):
        monkeypatch.delitem(sys.modules, name, raising=False)
        (tmp_path / name).mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("")
    (tmp_path / "pycuda" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert not tensorrt_available() and get_backend("auto").name == "onnxruntime"
    (tmp_path / "tensorrt" / "__init__.py").write_text("")
    importlib.invalidate_caches()
    assert tensorrt_available() and get_backend("auto").name == "tensorrt"


def test_auto_build_makes_a_profile_covering_the_server_batch(model: Path, tmp_path: Path, fakes: Tuple[Any, Any]) -> None:
    from service.config import load_settings
    from service.model_info import ModelInfo
    from service.startup import backend_factory, resolve_engine

    settings = load_settings(model=model, engine_dir=tmp_path / "auto", backend="tensorrt", precision="fp16", max_batch=12, auto_build=True)
    engine = resolve_engine(settings, ModelInfo.from_onnx(model))
    assert engine.entry.build_info["optimization_profile"]["batch_min_opt_max"][2] == 12
    backend = backend_factory(settings, engine)()
    assert backend.max_batch_size == 12
    backend.close()


def test_a_conjunctiva_shaped_canvas_builds_its_profile_and_runs(tmp_path: Path, fakes: Tuple[Any, Any]) -> None:
    """The optimisation profile and the buffers follow the model's H x W (issue 13's 96 x 224
    canvas, here 16 x 40), and a square batch is refused rather than reshaped."""
    from service.preprocess import PreprocessSpec
    from service.runtime.tensorrt_backend import TensorRTBackend

    wide = make_test_model(tmp_path / "wide.onnx", width=8, spec=PreprocessSpec(input_size=40, input_height=16))
    backend = TensorRTBackend(_engine(wide, tmp_path, max_batch=3), "fp16", max_batch=3)
    x = np.random.default_rng(2).uniform(-1, 1, (5, 3, 16, 40)).astype(np.float32)
    np.testing.assert_allclose(backend.infer(x), g.run_batches(g.session(wide), x), atol=1e-6)
    with pytest.raises(ValueError, match="3 x 16 x 40"):
        backend.infer(np.zeros((1, 3, 40, 40), np.float32))
    backend.close()
