"""The in-graph colour statistics: ROI only, equal to numpy's, exported and quantized as one graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from engine_build.quantization import graph as g
from engine_build.quantization.int8 import Int8Options, quantize_int8
from service.model_info import INPUT_NAME, OUTPUT_NAME
from service.preprocess import DecodedImage, PreprocessSpec, preprocess_decoded
from training.colour_head import ERYTHEMA_LEVELS, STAT_NAMES, ColourBranch, ColourStats
from training.export import export_onnx
from training.mobilenetv2 import MobileNetV2

SPEC = PreprocessSpec(input_size=64, input_height=32)


def _crop_with_mask(seed: int = 0) -> DecodedImage:
    """An RGBA-style crop: a textured reddish ellipse inside, saturated green outside (masked away)."""
    rng = np.random.default_rng(seed)
    height, width = 40, 100
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[...] = (0, 255, 0)
    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - 20) / 18.0) ** 2 + ((xx - 50) / 45.0) ** 2 <= 1.0
    rgb[inside] = np.stack([rng.integers(150, 230, inside.sum()), rng.integers(60, 120, inside.sum()), rng.integers(60, 110, inside.sum())], 1)
    alpha = np.where(inside, 255, 0).astype(np.uint8)
    return DecodedImage(rgb=rgb, alpha=alpha, format="png")


def test_statistics_read_the_roi_only_and_match_numpy() -> None:
    tensor = preprocess_decoded(_crop_with_mask(), None, SPEC).tensor
    stats = ColourStats(SPEC)(torch.from_numpy(tensor))[0].numpy()
    assert stats.shape == (len(STAT_NAMES),)
    # numpy on the same tensor: pixels that differ from the fill, back in 0..1 RGB
    rgb = tensor[0].transpose(1, 2, 0) * 127.5 / 255.0 + 0.5
    inside = np.abs(tensor[0]).sum(0) > 1e-6
    pixels = rgb[inside].astype(np.float64)
    named = dict(zip(STAT_NAMES, stats))
    np.testing.assert_allclose([named["mean_r"], named["mean_g"], named["mean_b"]], pixels.mean(0), atol=1e-4)
    np.testing.assert_allclose([named["std_r"], named["std_g"], named["std_b"]], pixels.std(0), atol=1e-3)
    log_r_g = np.log(pixels[:, 0] + 1e-3) - np.log(pixels[:, 1] + 1e-3)
    assert named["mean_log_r_g"] == np.float32(named["mean_log_r_g"])
    np.testing.assert_allclose(named["mean_log_r_g"], log_r_g.mean(), atol=1e-4)
    # the green outside the ROI is never counted: a reddish ROI has a clearly positive log(R/G)
    assert named["mean_log_r_g"] > 0.4 and named["mean_g"] < 0.5
    shares = [named["share_log_r_g_over_{:.1f}".format(t)] for t in ERYTHEMA_LEVELS]
    assert all(a >= b for a, b in zip(shares, shares[1:]))  # a higher level is passed by fewer pixels


def test_statistics_do_not_depend_on_canvas_or_letterbox() -> None:
    crop = _crop_with_mask(1)
    wide = ColourStats(SPEC)(torch.from_numpy(preprocess_decoded(crop, None, SPEC).tensor))
    square_spec = PreprocessSpec(input_size=96)
    square = ColourStats(square_spec)(torch.from_numpy(preprocess_decoded(crop, None, square_spec).tensor))
    # the square canvas has far more fill, which must not count: only the resampling of the ROI's
    # edge differs (counted fill would pull the shares of reddish pixels towards 0.4)
    np.testing.assert_allclose(wide.numpy(), square.numpy(), atol=0.06)
    assert square[0, STAT_NAMES.index("share_log_r_g_over_0.1")] > 0.9


def _fusion_model(seed: int = 0) -> MobileNetV2:
    torch.manual_seed(seed)
    branch = ColourBranch(SPEC, hidden=8)
    model = MobileNetV2(width_mult=0.25, colour=branch).eval()
    images = torch.from_numpy(np.concatenate([preprocess_decoded(_crop_with_mask(s), None, SPEC).tensor for s in range(4)]))
    branch.set_standardization(branch.stats(images))
    return model


def test_fusion_model_exports_as_one_graph_ending_in_sigmoid_gemm(tmp_path: Path) -> None:
    model = _fusion_model()
    path = tmp_path / "fusion.onnx"
    assert export_onnx(model, path, SPEC, 0.5, "v", "0" * 64) <= 1e-4
    proto = onnx.load(str(path))
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 32, 64]
    producers = {out: node for node in proto.graph.node for out in node.output}
    sigmoid = producers[OUTPUT_NAME]
    assert sigmoid.op_type == "Sigmoid" and producers[sigmoid.input[0]].op_type == "Gemm"  # Platt folds here
    # ops TensorRT and OpenVINO take as they are
    assert {n.op_type for n in proto.graph.node} <= {
        "Conv", "Clip", "Add", "Pad", "GlobalAveragePool", "Flatten", "Concat", "Gemm", "Sigmoid", "Relu", "Sub", "Abs",
        "ReduceSum", "Greater", "Cast", "Div", "Mul", "Max", "Log", "Sqrt", "Pow", "Reshape", "Unsqueeze", "Constant", "Min", "Slice",
    }
    crops = np.concatenate([preprocess_decoded(_crop_with_mask(s), None, SPEC).tensor for s in range(3)])
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.from_numpy(crops))).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([OUTPUT_NAME], {INPUT_NAME: crops})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_int8_keeps_the_colour_branch_and_head_in_float(tmp_path: Path) -> None:
    path = tmp_path / "fusion.onnx"
    export_onnx(_fusion_model(), path, SPEC, 0.5, "v", "0" * 64)
    float_only = g.float_only_nodes(onnx.load(str(path)))
    assert any("/colour/" in n for n in float_only) and any("classifier" in n for n in float_only)
    assert not any("/features/" in n for n in float_only)
    crops = np.concatenate([preprocess_decoded(_crop_with_mask(s), None, SPEC).tensor for s in range(8)])
    result = quantize_int8(path, tmp_path / "fusion.int8.onnx", crops, Int8Options(method="minmax"))
    quantized = onnx.load(str(result.path))
    dequantized_inputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    for node in quantized.graph.node:
        if "/colour/" in node.name or node.op_type == "Gemm":
            assert not set(node.input) & dequantized_inputs, node.name  # reads float, not a Q/DQ pair
    convs = [n for n in quantized.graph.node if n.op_type == "Conv"]
    assert convs and all(set(n.input[:2]) <= dequantized_inputs for n in convs)  # the CNN is int8
    assert set(result.info["kept_float"]) >= set(n for n in float_only if "/colour/" in n)
