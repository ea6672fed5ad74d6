"""Build small ONNX models with the service's contract, in code, for tests.

The graph is MobileNetV2-shaped (stem conv, depthwise-separable block with a residual, global
pool, linear head, sigmoid) but a few kilobytes, so tests run in milliseconds. Its weights are
random with a fixed seed: the probabilities mean nothing, but they vary with the picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.model_info import (
    INPUT_NAME,
    KEY_CALIBRATION,
    KEY_NAME,
    KEY_OPERATING_POINT,
    KEY_THRESHOLD,
    KEY_VERSION,
    OUTPUT_NAME,
    Calibration,
    MeasuredRate,
    OperatingPoint,
)
from service.preprocess import PreprocessSpec

OPSET = 17


def make_test_model(
    path: Path,
    seed: int = 0,
    width: int = 8,
    spec: PreprocessSpec = PreprocessSpec(),
    threshold: float = 0.5,
    extra_metadata: Optional[Dict[str, str]] = None,
    input_size: Optional[int] = None,
) -> Path:
    rng = np.random.default_rng(seed)
    # input_size: a square canvas of that size; else the spec's H x W
    canvas_h, canvas_w = (input_size, input_size) if input_size else (spec.height, spec.width)

    def weight(name: str, shape: tuple, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    initializers = [
        weight("stem_w", (width, 3, 3, 3)),
        weight("stem_b", (width,), 0.05),
        weight("dw_w", (width, 1, 3, 3)),
        weight("dw_b", (width,), 0.05),
        weight("pw_w", (width, width, 1, 1)),
        weight("pw_b", (width,), 0.05),
        weight("fc_w", (1, width), 1.0),
        weight("fc_b", (1,), 0.1),
        numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"),
        numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"),
    ]
    nodes = [
        helper.make_node("Conv", [INPUT_NAME, "stem_w", "stem_b"], ["stem"], strides=[2, 2], pads=[1, 1, 1, 1], name="stem_conv"),
        helper.make_node("Clip", ["stem", "relu6_min", "relu6_max"], ["stem_act"], name="stem_relu6"),
        helper.make_node("Conv", ["stem_act", "dw_w", "dw_b"], ["dw"], group=width, pads=[1, 1, 1, 1], name="block_dw"),
        helper.make_node("Clip", ["dw", "relu6_min", "relu6_max"], ["dw_act"], name="block_relu6"),
        helper.make_node("Conv", ["dw_act", "pw_w", "pw_b"], ["pw"], name="block_project"),
        helper.make_node("Add", ["stem_act", "pw"], ["block_out"], name="block_residual"),
        helper.make_node("GlobalAveragePool", ["block_out"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logit"], transB=1, name="classifier"),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "anemia_test_model",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, canvas_h, canvas_w])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests")
    model.ir_version = 8
    metadata = dict(spec.to_metadata())
    metadata.update({KEY_NAME: "anemia-test-model", KEY_VERSION: "test-{}".format(seed), KEY_THRESHOLD: str(threshold)})
    metadata.update(extra_metadata or {})
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def screening_metadata(
    threshold: float,
    sensitivity: Tuple[float, float, float] = (0.9, 0.82, 0.95),
    specificity: Tuple[float, float, float] = (0.48, 0.4, 0.57),
    calibrated: bool = True,
) -> Dict[str, str]:
    """``threshold``, ``operating_point`` and ``calibration`` props as the calibration CLI writes them.

    The figures are made up for tests (value, ci_low, ci_high); pass the result as ``extra_metadata``.
    """
    point = OperatingPoint(
        target_sensitivity=0.9,
        threshold=threshold,
        chosen_on="validation splits of the 5 fold models (test fixture)",
        measured_on="grouped out-of-fold predictions of the 5 fold models: 610 images, 427 photographs (test fixture)",
        sensitivity=MeasuredRate(*sensitivity),
        specificity=MeasuredRate(*specificity),
        interval="95% cluster bootstrap over 427 photographs (test fixture)",
    )
    props = {KEY_THRESHOLD: repr(float(threshold)), KEY_OPERATING_POINT: point.to_json()}
    if calibrated:
        calibration = Calibration(
            method="platt", slope=0.43, intercept=-0.01, fitted_on="grouped out-of-fold predictions (test fixture)",
            brier_before=0.158, brier_after=0.145, folded_into="final Gemm", brier_after_cross_fold=0.147,
        )
        props[KEY_CALIBRATION] = calibration.to_json()
    return props
