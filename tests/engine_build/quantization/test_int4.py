from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from engine_build.quantization import graph as g
from engine_build.quantization.int4 import (
    INT4_MAX,
    INT4_MIN,
    Int4Options,
    channel_scales,
    gptq_rows,
    int4_layer_names,
    quantize_int4_ort,
    quantize_int4_tensorrt,
    quantize_rows,
)
from tests.model_factory import make_test_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("int4") / "m.onnx", width=32, input_size=32)


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(3).uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32)


def _weight_error(rows: np.ndarray, rounding: str) -> np.ndarray:
    scales = channel_scales(rows, rounding)
    return np.sum((quantize_rows(rows, scales) * scales[:, None] - rows) ** 2, axis=1)


def test_mse_scales_never_worse_than_round_to_nearest_and_better_on_heavy_tails() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_t(df=3, size=(64, 144))  # heavy-tailed, like real conv weights
    mse, rtn = _weight_error(rows, "mse"), _weight_error(rows, "rtn")
    assert np.all(mse <= rtn + 1e-12)
    assert mse.sum() < 0.8 * rtn.sum()
    q = quantize_rows(rows, channel_scales(rows, "mse"))
    assert q.min() >= INT4_MIN and q.max() <= INT4_MAX


def test_gptq_lowers_the_layer_output_error_with_correlated_inputs() -> None:
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(48, 48))
    x = rng.normal(size=(4000, 48)) @ mix  # strongly correlated input channels
    w = rng.normal(size=(16, 48))
    scales = channel_scales(w, "mse")
    gram = x.T @ x / len(x)

    def output_error(q: np.ndarray) -> float:
        return float(np.mean((x @ (q * scales[:, None] - w).T) ** 2))

    rtn_error = output_error(quantize_rows(w, scales))
    gptq_error = output_error(gptq_rows(w, scales, gram).astype(np.float64))
    assert gptq_error < 0.7 * rtn_error


def test_ort_int4_artifact_is_int4_dequantize_opset21_and_lists_its_layers(model: Path, inputs: np.ndarray, tmp_path: Path) -> None:
    result = quantize_int4_ort(model, tmp_path / "i4.onnx", Int4Options(rounding="gptq", keep_float=("first_conv",)), inputs)
    q = onnx.load(str(result.path))
    assert next(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 21
    int4 = [i for i in q.graph.initializer if i.data_type == TensorProto.INT4]
    assert len(int4) == len(result.info["int4_layers"]) == 3  # depthwise, project, classifier; stem kept float
    assert "stem_conv" in result.info["kept_float"] and "stem_conv" not in result.info["int4_layers"]
    assert set(result.info["gptq_layers"]) == {"block_project", "classifier"}  # 1x1 conv and Gemm
    assert list(int4_layer_names(result.path)) == result.info["int4_layers"]
    reference = g.run_batches(g.session(model), inputs)
    out = g.run_batches(g.session(result.path), inputs)
    assert np.isfinite(out).all() and np.max(np.abs(out - reference)) < 0.2


def test_gptq_without_calibration_data_is_refused(model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration images"):
        quantize_int4_ort(model, tmp_path / "x.onnx", Int4Options(rounding="gptq"))


def test_skip_depthwise(model: Path, tmp_path: Path) -> None:
    result = quantize_int4_ort(model, tmp_path / "i4.onnx", Int4Options(rounding="mse", skip_depthwise=True))
    assert "block_dw" not in result.info["int4_layers"] and "block_project" in result.info["int4_layers"]


def test_tensorrt_int4_artifact_quantizes_only_the_classifier_blockwise(model: Path, inputs: np.ndarray, tmp_path: Path) -> None:
    result = quantize_int4_tensorrt(model, tmp_path / "trt_i4.onnx", Int4Options(block_size=16))
    q = onnx.load(str(result.path))
    assert result.info["int4_layers"] == ["classifier"]
    assert not any(n.op_type == "Gemm" for n in q.graph.node)
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and any(a.name == "block_size" and a.i == 16 for a in dq[0].attribute)
    reference = g.run_batches(g.session(model), inputs)
    out = g.run_batches(g.session(result.path), inputs)
    assert np.max(np.abs(out - reference)) < 0.2
