from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engine_build.backends import ONNXRUNTIME
from engine_build.build import build_engine
from engine_build.onnxruntime_builder import OnnxRuntimeBuildOptions
from engine_build.quantization import graph as g
from engine_build.quantization.int8 import Int8Options, quantize_int8
from engine_build.quantization.int8_artifact import int8_artifact_path
from service.engines import EngineManifest
from service.errors import EngineError
from service.model_info import ModelInfo, file_sha256
from service.runtime.onnxruntime_backend import OnnxRuntimeBackend
from engine_build.quantization.ort_layout import x86_without_vnni
from tests.model_factory import make_test_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ort_build")
    path = make_test_model(directory / "anemia.onnx", width=16, input_size=32)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32)
    quantize_int8(path, int8_artifact_path(path), x, Int8Options(method="minmax"))
    return path


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)


#: Largest |probability - FP32's| per precision on these 8 inputs, about 5x what was measured
#: (2026-12-02: fp16 6.2e-5, int8 2.1e-3, int4 1.3e-3) and well under the spread of FP32's own
#: outputs (0.026), so a broken quantization cannot pass. FP32 is the model itself, bit for bit.
MAX_ABS_DIFF = {"fp32": 0.0, "fp16": 5e-4, "int8": 1e-2, "int4": 1e-2}


def test_every_precision_builds_runs_and_is_manifested_against_the_fp32_sha(model: Path, inputs: np.ndarray, tmp_path: Path) -> None:
    sha = ModelInfo.from_onnx(model).sha256
    reference = g.run_batches(g.session(model), inputs)
    assert np.ptp(reference) > 0.02  # the inputs move the output: the tolerances below mean something
    # On x86 without VNNI ONNX Runtime's u8 x s8 kernels saturate their int16 pair sums (measured
    # here: 0.08 off on these inputs): the builder's u8-weight mode is the fix it offers there.
    int8_weights = "u8" if x86_without_vnni() else "auto"
    for precision in ("fp32", "fp16", "int8", "int4"):
        entry = build_engine(model, precision, "onnxruntime", tmp_path, OnnxRuntimeBuildOptions(int4_tensors=inputs, int8_weights=int8_weights))
        assert entry.model_sha256 == sha and entry.precision == precision
        assert entry.file.startswith("anemia-{}-{}-onnxruntime-cpu-".format(sha[:12], precision))
        with OnnxRuntimeBackend(tmp_path / entry.file, precision, 1) as backend:
            out = backend.infer(inputs)
        assert out.shape == (8,) and float(np.max(np.abs(out - reference))) <= MAX_ABS_DIFF[precision], precision
        if precision == "fp32":
            assert entry.sha256 == file_sha256(model)
        else:
            assert entry.sha256 != file_sha256(model), precision  # a quantized graph, not a copy
    entries = {e.precision: e for e in EngineManifest.load(tmp_path).entries}
    assert set(entries) == {"fp32", "fp16", "int8", "int4"}
    assert entries["int8"].build_info["calibration_method"] == "minmax"
    assert entries["int4"].build_info["int4_layers"] and "classifier" in entries["int4"].build_info["kept_float"]
    assert entries["fp16"].build_info["format"].startswith("float16")
    fp16 = onnx.load(str(tmp_path / entries["fp16"].file))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept


def test_int8_artifact_must_exist_and_belong_to_the_model(model: Path, tmp_path: Path) -> None:
    lonely = make_test_model(tmp_path / "lonely.onnx", seed=3, width=16, input_size=32)
    with pytest.raises(EngineError, match=r"no calibrated INT8 model .*lonely\.int8\.onnx.*build_engines\.py quantize"):
        build_engine(lonely, "int8", "onnxruntime", tmp_path / "e")
    with pytest.raises(EngineError, match="was calibrated from model"):
        build_engine(lonely, "int8", "onnxruntime", tmp_path / "e", OnnxRuntimeBuildOptions(int8_model=int8_artifact_path(model)))


def test_int4_without_calibration_images_is_refused_with_the_fix(model: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="needs calibration images .*--calibration-dir"):
        build_engine(model, "int4", "onnxruntime", tmp_path)
    entry = build_engine(model, "int4", "onnxruntime", tmp_path, OnnxRuntimeBuildOptions(int4_rounding="mse"))  # explicit data-free choice
    assert entry.build_info["rounding"] == "MSE-optimal per-channel scale"


def test_existing_engine_is_reused_and_a_damaged_one_rebuilt(model: Path, tmp_path: Path) -> None:
    first = build_engine(model, "fp16", "onnxruntime", tmp_path)
    written_ns = (tmp_path / first.file).stat().st_mtime_ns
    assert build_engine(model, "fp16", "onnxruntime", tmp_path) == first
    assert (tmp_path / first.file).stat().st_mtime_ns == written_ns  # not rewritten
    (tmp_path / first.file).write_bytes(b"garbage")
    rebuilt = build_engine(model, "fp16", "onnxruntime", tmp_path)
    assert (tmp_path / rebuilt.file).stat().st_size == rebuilt.file_size_bytes > 100


def test_unknown_or_bad_options_are_refused_when_made() -> None:
    with pytest.raises(EngineError, match="unknown OnnxRuntimeBuildOptions option.*int4_round"):
        ONNXRUNTIME.options(int4_round="mse")
    with pytest.raises(EngineError, match="int8_weights must be one of"):
        OnnxRuntimeBuildOptions(int8_weights="s4")


def test_options_of_another_backend_are_refused(model: Path, tmp_path: Path) -> None:
    from engine_build.tensorrt_builder import TensorRTBuildOptions

    with pytest.raises(EngineError, match="onnxruntime engines are built with OnnxRuntimeBuildOptions"):
        build_engine(model, "fp32", "onnxruntime", tmp_path, TensorRTBuildOptions())
