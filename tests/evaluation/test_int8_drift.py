from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from engine_build.quantization.int8 import Int8Options, quantize_int8
from evaluation.int8_drift import layer_drift, markdown
from service.model_info import INPUT_NAME
from tests.model_factory import make_test_model


def _probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: x})[0].reshape(-1)


def test_a_model_against_itself_has_no_drift(tmp_path: Path) -> None:
    model = make_test_model(tmp_path / "m.onnx", width=8, input_size=32)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3, 32, 32)).astype(np.float32)
    report = layer_drift(model, model, x, batch=2)
    assert report["layers"] and all(layer["sqnr_db"] == float("inf") and layer["mean_shift_in_std"] == 0 for layer in report["layers"])
    assert report["probability"]["max_abs_delta"] == 0


def test_int8_drift_is_measured_per_layer_and_matches_the_final_probabilities(tmp_path: Path) -> None:
    model = make_test_model(tmp_path / "m.onnx", width=8, input_size=32)
    rng = np.random.default_rng(1)
    calibration = rng.uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)
    int8 = quantize_int8(model, tmp_path / "q.onnx", calibration, Int8Options(method="minmax")).path
    x = rng.uniform(-1, 1, (6, 3, 32, 32)).astype(np.float32)
    report = layer_drift(model, int8, x, batch=4)
    layers = report["layers"]
    ops = [layer["op"] for layer in layers]
    assert "Conv" in ops and ops[-1] == "Sigmoid"  # graph order, ending at the probability
    conv = next(layer for layer in layers if layer["op"] == "Conv")
    assert 0 < conv["sqnr_db"] < 80 and conv["relative_rms_error"] == pytest.approx(10 ** (-conv["sqnr_db"] / 20), rel=1e-6)
    delta = _probabilities(int8, x) - _probabilities(model, x)
    assert report["probability"]["mean_delta"] == pytest.approx(float(delta.mean()), abs=1e-7)
    assert report["probability"]["max_abs_delta"] == pytest.approx(float(np.abs(delta).max()), abs=1e-7)
    assert "| Conv |" in markdown(report)
