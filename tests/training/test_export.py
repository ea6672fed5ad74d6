"""Export: ONNX Runtime equals torch, the contract and metadata are there, ModelInfo reads it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.model_info import INPUT_NAME, OUTPUT_NAME, ModelInfo
from service.preprocess import PreprocessSpec
from training.export import OPSET, export_onnx
from training.mobilenetv2 import MobileNetV2


def test_export_matches_torch_and_carries_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MobileNetV2(num_classes=1, width_mult=0.25).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the folding done by the exporter matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    spec = PreprocessSpec(input_size=96)
    path = tmp_path / "m.onnx"
    diff = export_onnx(model, path, spec, threshold=0.42, version="9.9.9", data_sha256="ab" * 32, cv_metrics={"auc": 0.5})
    assert diff <= 1e-4

    info = ModelInfo.from_onnx(path)
    assert (info.name, info.version, info.threshold, info.spec) == ("anemia-mobilenetv2", "9.9.9", 0.42, spec)
    assert json.loads(info.metadata["cv_metrics"]) == {"auc": 0.5}
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == OPSET and proto.opset_import[0].version >= 17
    ops = {node.op_type for node in proto.graph.node}
    # TF "SAME" padding became plain Pads with constant pads, not shape arithmetic
    assert "Pad" in ops and not ops & {"ConstantOfShape", "Shape", "Slice", "Concat"}

    images = torch.randn(5, 3, 96, 96, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        expected = torch.sigmoid(model(images)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
    assert got.shape == (5, 1)  # a batch of 5 through a model exported with batch 1: dynamic
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_export_refuses_a_graph_that_disagrees(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.export as export

    monkeypatch.setattr(export, "ORT_TOLERANCE", -1.0)  # any difference, even 0, is now too much
    with pytest.raises(RuntimeError, match="differs from torch"):
        export_onnx(MobileNetV2(width_mult=0.25), tmp_path / "m.onnx", PreprocessSpec(input_size=64), 0.5, "v", "0" * 64)


def test_operating_metadata_keeps_threshold_and_operating_point_equal(tmp_path: Path) -> None:
    from service.model_info import KEY_OPERATING_POINT, KEY_THRESHOLD, OperatingPoint
    from tests.model_factory import make_test_model, screening_metadata
    from training.export import operating_metadata

    point = OperatingPoint.from_json(screening_metadata(0.37)[KEY_OPERATING_POINT])
    props = operating_metadata(0.37, point)
    assert float(props[KEY_THRESHOLD]) == json.loads(props[KEY_OPERATING_POINT])["threshold"] == 0.37
    info = ModelInfo.from_onnx(make_test_model(tmp_path / "m.onnx", extra_metadata=props))
    assert info.operating_point == point and info.calibration is None
    with pytest.raises(ValueError, match="differs from the threshold"):
        operating_metadata(0.5, point)
