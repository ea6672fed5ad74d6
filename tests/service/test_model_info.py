"""The operating point and calibration read from the model's metadata, and how /v1/model describes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.errors import EngineError
from service.model_info import (
    KEY_CALIBRATION,
    KEY_OPERATING_POINT,
    Calibration,
    MeasuredRate,
    ModelInfo,
    describe_calibration,
    describe_operating_point,
)
from tests.model_factory import make_test_model, screening_metadata


def test_operating_point_and_calibration_are_read(tmp_path: Path) -> None:
    path = make_test_model(tmp_path / "m.onnx", extra_metadata=screening_metadata(0.4090660535283742))
    info = ModelInfo.from_onnx(path)
    point, calibration = info.operating_point, info.calibration
    assert point is not None and calibration is not None
    assert info.threshold == point.threshold == 0.4090660535283742
    assert point.sensitivity == MeasuredRate(0.9, 0.82, 0.95) and point.specificity.value == 0.48
    assert "427 photographs" in point.measured_on
    assert calibration.method == "platt" and calibration.slope == 0.43 and calibration.brier_after_cross_fold == 0.147
    assert Calibration.from_json(calibration.to_json()) == calibration


def test_a_model_without_them_still_loads_and_says_none_is_known(tmp_path: Path) -> None:
    info = ModelInfo.from_onnx(make_test_model(tmp_path / "m.onnx"))
    assert info.operating_point is None and info.calibration is None
    described = describe_operating_point(info, info.threshold)
    assert described["known"] is False and described["applies"] is False and "not known" in described["note"]
    assert describe_calibration(info)["known"] is False


def test_described_operating_point_applies_only_at_the_models_threshold(tmp_path: Path) -> None:
    info = ModelInfo.from_onnx(make_test_model(tmp_path / "m.onnx", extra_metadata=screening_metadata(0.41)))
    served = describe_operating_point(info, 0.41)
    assert served["known"] is True and served["applies"] is True and served["note"] is None
    assert served["sensitivity"] == {"value": 0.9, "ci_low": 0.82, "ci_high": 0.95} and served["threshold"] == 0.41
    overridden = describe_operating_point(info, 0.3)
    assert overridden["known"] is True and overridden["applies"] is False
    assert "ANEMIA_THRESHOLD=0.3" in overridden["note"] and "do not apply" in overridden["note"]
    assert overridden["sensitivity"] == served["sensitivity"]  # still shown, flagged as not applying
    quantized = describe_operating_point(info, 0.41, "int8")
    assert quantized["applies"] is False and "INT8 engine" in quantized["note"] and "FP32" in quantized["note"]
    assert describe_operating_point(info, 0.41, "fp32")["applies"] is True
    calibration = describe_calibration(info)
    assert calibration["known"] is True and calibration["folded_into"] == "final Gemm"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"threshold": 0.5}, "differs from the model's threshold"),
        ({"sensitivity": {"value": 0.9, "ci_low": 0.95, "ci_high": 0.97}}, "ci_low <= value <= ci_high"),
        ({"specificity": {"value": 1.2, "ci_low": 0.1, "ci_high": 0.2}}, r"must lie in \[0, 1\]"),
        ({"measured_on": ""}, "measured_on must be a non-empty string"),
        ({"target_sensitivity": "0.9"}, "finite number"),
    ],
)
def test_a_damaged_operating_point_is_refused(tmp_path: Path, change: dict, message: str) -> None:
    props = screening_metadata(0.41)
    point = json.loads(props[KEY_OPERATING_POINT])
    point.update(change)
    props[KEY_OPERATING_POINT] = json.dumps(point)
    with pytest.raises(EngineError, match=message):
        ModelInfo.from_onnx(make_test_model(tmp_path / "m.onnx", extra_metadata=props))


def test_calibration_that_is_not_json_is_refused(tmp_path: Path) -> None:
    props = screening_metadata(0.41)
    props[KEY_CALIBRATION] = "platt 0.43"
    with pytest.raises(EngineError, match="calibration is not JSON"):
        ModelInfo.from_onnx(make_test_model(tmp_path / "m.onnx", extra_metadata=props))
